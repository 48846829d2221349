"""The loss-of-plasticity baselines and figures (onnxfib.train.plasticity) against independent
truths: torch's own optimiser on the regulariser they stand for, planted spectra and activity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from onnxfib.errors import UsageError  # noqa: E402
from onnxfib.train.plasticity import L2Init, ShrinkPerturb, effective_rank, unit_activity  # noqa: E402


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, extra=None) -> None:
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    if extra is not None:
        loss = loss + extra()
    loss.backward()
    optimizer.step()


def test_l2_init_is_sgd_on_the_distance_to_the_initial_weights() -> None:
    lr, strength = 0.1, 0.5
    helped, truth = _net(), _net()
    initial = [p.detach().clone() for p in truth.parameters()]
    helper = L2Init(helped, pull=lr * strength)
    noise = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move both away from the initial weights in the same way
        for p, q in zip(helped.parameters(), truth.parameters()):
            offset = torch.randn(p.shape, generator=noise)
            p.add_(offset)
            q.add_(offset)
    optimizer = torch.optim.SGD(truth.parameters(), lr=lr)
    for _ in range(4):
        helper.step()
        optimizer.zero_grad()
        (strength / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(truth.parameters(), initial))).backward()
        optimizer.step()
    for p, q, p0 in zip(helped.parameters(), truth.parameters(), initial):
        torch.testing.assert_close(p, q)
        assert not torch.allclose(p, p0, atol=0.1)  # pulled, not yet back
    with pytest.raises(UsageError):
        L2Init(helped, pull=1.0)


def test_shrink_perturb_without_noise_is_torch_weight_decay() -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    lr, decay = 0.1, 0.01
    helped, truth = _net(), _net()
    helper = ShrinkPerturb(helped, shrink=lr * decay, noise=0.0)
    opt_h = torch.optim.SGD(helped.parameters(), lr=lr)
    opt_t = torch.optim.SGD(truth.parameters(), lr=lr, weight_decay=decay)
    for _ in range(5):
        _step(helped, opt_h, x)
        helper.step()
        _step(truth, opt_t, x)
    for p, q in zip(helped.parameters(), truth.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


def test_shrink_perturb_noise_has_the_requested_spread() -> None:
    model = nn.Linear(400, 500)
    before = model.weight.detach().clone()
    ShrinkPerturb(model, shrink=0.0, noise=0.01, seed=3).step()
    change = (model.weight.detach() - before).numpy().ravel()
    assert abs(change.mean()) < 1e-4 and change.std() == pytest.approx(0.01, rel=0.02)
    with pytest.raises(UsageError):
        ShrinkPerturb(model, shrink=-0.1, noise=0.0)


def test_effective_rank_of_planted_spectra() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
    r, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    for k in (1, 4, 20):
        spectrum = np.zeros(20)
        spectrum[:k] = 3.0
        matrix = q[:, :20] @ np.diag(spectrum) @ r.T
        assert effective_rank(matrix) == pytest.approx(k, rel=1e-6)
    uneven = q[:, :2] @ np.diag([3.0, 1.0]) @ r[:, :2].T
    p = np.array([0.75, 0.25])
    assert effective_rank(uneven) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert effective_rank(np.zeros((5, 4))) == 0.0


def test_unit_activity_counts_dead_and_always_active_units() -> None:
    features = np.array([[0.0, 1.0, 0.0, 2.0],
                         [0.0, 2.0, 1.0, 0.0],
                         [0.0, 3.0, 0.0, 1.0]])
    assert unit_activity(features) == (0.25, 0.25)
    with pytest.raises(UsageError):
        unit_activity(np.zeros((0, 3)))
