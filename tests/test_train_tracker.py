"""The cover tracker's figures and its fast path: a plain stack written straight as ONNX gives
the same model (ONNX Runtime against torch) and the same figures as torch's exporter; on a short
seeded training on real data (scikit-learn's digits), fibers fall over training and later layers
are coarser (the paper's Fig. 8), as the records say and as the core's analysis of exported
snapshots recomputes."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
datasets = pytest.importorskip("sklearn.datasets")
from torch import nn  # noqa: E402

import onnxfib  # noqa: E402
from onnxfib.train import CoverTracker, TorchAnalysis  # noqa: E402
from onnxfib.train.adapter import stack_onnx  # noqa: E402

EPS = 0.5
EVERY = 50
STEPS = 400


class Wrapped(nn.Module):
    """A stack behind a wrapper: not a plain ``nn.Sequential``, so it goes through torch's exporter."""

    def __init__(self, stack: nn.Module) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)


def _traced(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = datasets.load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained() -> tuple[CoverTracker, dict[int, dict], torch.Tensor]:
    """The tracker's records over a seeded SGD run, and a copy of the weights at every record."""
    x, y = _digits()
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = CoverTracker(model, x[:1], eps=EPS, every=EVERY)
    generator = torch.Generator().manual_seed(0)
    snapshots = {}
    for step in range(STEPS + 1):
        if tracker.maybe_record(step):
            snapshots[step] = copy.deepcopy(model.state_dict())
        batch = torch.randint(0, len(x), (64,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return tracker, snapshots, x[:1]


def test_stack_onnx_is_the_model_and_gives_the_exporters_figures(trained) -> None:
    _, snapshots, example = trained
    model = _mlp()
    model.load_state_dict(snapshots[STEPS])
    direct = stack_onnx(model, example)
    assert direct is not None
    onnx.checker.check_model(direct, full_check=True)
    x = _digits()[0][5:6]
    session = ort.InferenceSession(direct.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    for eps in (0.0, 0.3, EPS):
        fast, traced = TorchAnalysis(model, example, eps=eps), TorchAnalysis(Wrapped(model), example, eps=eps)
        assert len(fast.layers) == len(traced.layers) == 4
        for a, b in zip(fast.layers, traced.layers):
            fa, fb = fast.figures(a), traced.figures(b)
            assert (fa.fibers, fa.opfibers, fa.covers) == (fb.fibers, fb.opfibers, fb.covers)


def test_stack_onnx_declines_other_models() -> None:
    example = torch.zeros(1, 4)
    assert stack_onnx(Wrapped(nn.Sequential(nn.Linear(4, 2))), example) is None
    assert stack_onnx(nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(), nn.Linear(3, 2)), example) is None
    assert stack_onnx(nn.Sequential(nn.Linear(4, 2)).double(), example.double()) is None
    assert stack_onnx(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 3, 4)) is None


def test_fibers_fall_over_training_and_later_layers_are_coarser(trained) -> None:
    tracker, snapshots, example = trained
    layers = tracker.layers()[:-1]  # hidden layers; the output layer's ten classes stay apart
    counts = {layer: [r.fibers for r in tracker.records if r.layer == layer] for layer in layers}
    steps = tracker.steps()
    assert steps == list(range(0, STEPS + 1, EVERY))
    late = {layer: float(np.mean(c[len(c) // 2:])) for layer, c in counts.items()}
    for layer, c in counts.items():
        assert c[0] == 64 and late[layer] < 0.8 * c[0], (layer, c)  # fibers fall over training
    assert [late[layer] for layer in layers] == sorted(late.values(), reverse=True), late  # later: coarser
    assert late[layers[-1]] < late[layers[0]] - 5
    for step in (steps[0], steps[len(steps) // 2], steps[-1]):  # the core's analysis of an exported snapshot
        model = _mlp()
        model.load_state_dict(snapshots[step])
        reports = onnxfib.inspect(_traced(model, example), eps=EPS)
        assert [r.fibers for r in reports] == [r.fibers for r in tracker.records if r.step == step]
