"""Algorithm 1 (``onnxfib.train.collapse_retrain``) against planted truths: a lifted network
collapses back to its base and keeps its loss (torch, and ONNX Runtime on the base's export),
the greedy thresholds stop at the planted copies, and the stop rule."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402
from train_planted import planted_mlp  # noqa: E402
from transformer_lifting import lift_transformer_ffn, transformer_stack  # noqa: E402

from onnxfib.errors import UsageError  # noqa: E402
from onnxfib.train import (  # noqa: E402
    EarlyStopping,
    FeedForwardLayers,
    OnnxLayers,
    collapse_retrain,
    export_onnx,
    greedy_thresholds,
    parameter_count,
)

EXTRA = 8  # planted copies per feed-forward block


def _lifted_stack(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    base = transformer_stack("encoder", seed, d_model=16, nhead=2, dim_feedforward=24, num_layers=2)
    lifted, _ = lift_transformer_ffn(base, EXTRA, np.random.default_rng(seed))
    return base, lifted.eval()


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(seed))


def _ort(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(export_onnx(model, x).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _mse_to(target_model: nn.Module, x: torch.Tensor, noise: float = 0.1):
    """A validation loss: MSE to the target's outputs plus fixed noise (so the loss is not zero)."""
    with torch.no_grad():
        y = target_model(x)
        y = y + noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(7))

    def validate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(((m(x) - y) ** 2).mean())

    return validate, y


def test_feedforward_lift_collapses_to_base_in_torch_and_onnx_runtime() -> None:
    base, lifted = _lifted_stack()
    x = _tokens(4, 1)
    assert parameter_count(lifted) > parameter_count(base)
    collapsed = FeedForwardLayers().collapse(lifted, {})
    assert parameter_count(collapsed) == parameter_count(base)
    assert [b.linear1.out_features for b in FeedForwardLayers.blocks(collapsed).values()] == [24, 24]
    with torch.no_grad():
        torch.testing.assert_close(collapsed(x), base(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_ort(base, x), collapsed(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert parameter_count(lifted) - parameter_count(collapsed) == 2 * EXTRA * (2 * 16 + 1)


def test_greedy_thresholds_stop_at_the_planted_copies() -> None:
    base, lifted = _lifted_stack()
    validate, _ = _mse_to(lifted, _tokens(32, 2))
    layers = FeedForwardLayers()
    thresholds = greedy_thresholds(lifted, layers, validate, slack=0.0)
    at = layers.collapse(lifted, thresholds)
    assert parameter_count(at) == parameter_count(base)  # every copy merged, nothing more
    assert validate(at) == pytest.approx(validate(lifted), rel=1e-5)
    more = layers.collapse(lifted, {k: v * 1.05 for k, v in thresholds.items()})
    assert parameter_count(more) < parameter_count(base)  # a raised threshold merges beyond the base


def test_greedy_thresholds_on_a_planted_mlp_through_the_onnx_analysis() -> None:
    model, planted = planted_mlp([6, 4, 4, 3], [[2, 1, 3, 1], [1, 2, 2, 1]], activation=nn.Tanh,
                                 dtype=torch.float32, seed=0)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    validate, _ = _mse_to(model, x)
    layers = OnnxLayers(x[:1])
    thresholds = greedy_thresholds(model, layers, validate)
    at = layers.collapse(model, thresholds)
    assert [m.out_features for m in at if isinstance(m, nn.Linear)] == [4, 4, 3]
    assert validate(at) == pytest.approx(validate(model), rel=1e-5)


def test_collapse_retrain_stops_when_retraining_cannot_recover() -> None:
    _, lifted = _lifted_stack()
    validate, _ = _mse_to(lifted, _tokens(32, 2))
    result = collapse_retrain(lifted, layers=FeedForwardLayers(), validate=validate, retrain=lambda m: 0,
                              tolerance=0.0)
    assert len(result.rounds) == 1 and not result.rounds[0].accepted
    assert result.rounds[0].loss_retrained > result.loss_before
    assert result.model is lifted and result.stopped == "validation loss not recovered"


@pytest.mark.slow
def test_collapse_retrain_on_a_transformer_keeps_the_validation_loss() -> None:
    base, lifted = _lifted_stack()
    x_train, x_val = _tokens(64, 3), _tokens(32, 2)
    validate, _ = _mse_to(lifted, x_val)
    with torch.no_grad():
        y_train = lifted(x_train)

    def step(m: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        ((m(x_train) - y_train) ** 2).mean().backward()
        optimizer.step()

    retrain = EarlyStopping(step, validate, lambda p: torch.optim.Adam(p, lr=3e-3), every=10, patience=2,
                            max_steps=200)
    tolerance = 0.05
    result = collapse_retrain(lifted, layers=FeedForwardLayers(), validate=validate, retrain=retrain,
                              tolerance=tolerance, max_rounds=4)
    accepted = [r for r in result.rounds if r.accepted]
    assert accepted and parameter_count(result.model) == accepted[-1].params < parameter_count(base)
    assert [r.params for r in result.rounds] == sorted((r.params for r in result.rounds), reverse=True)
    assert validate(result.model) <= (1 + tolerance) * result.loss_before
    assert all(r.accepted == (r.loss_retrained <= (1 + tolerance) * result.loss_before) for r in result.rounds)
    x = _tokens(2, 9)
    np.testing.assert_allclose(_ort(result.model, x), result.model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_bad_collapse_retrain_arguments() -> None:
    _, lifted = _lifted_stack()
    with pytest.raises(UsageError):
        collapse_retrain(lifted, layers=FeedForwardLayers(), validate=lambda m: 1.0, retrain=lambda m: 0,
                         raise_by=0.0)
    with pytest.raises(UsageError):
        FeedForwardLayers().collapse(lifted, {"nope": 0.1})
    with pytest.raises(UsageError):
        FeedForwardLayers().collapse(nn.Linear(2, 2), {})
