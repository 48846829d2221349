"""The paper's theorems as executable checks on torch networks with planted symmetries.

Each test measures the property on real forward/backward passes, with the partitions the
analysis finds (not the planted ones), and a negative control shows the check fails once the
symmetry is broken, so no assertion is vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from train_planted import planted_mlp  # noqa: E402

from onnxfib.partition import Partition  # noqa: E402
from onnxfib.train import (  # noqa: E402
    TorchAnalysis,
    activity_partition,
    collapse_to_base,
    layer_outputs,
    synchronized,
    synchronized_blocks,
)

WIDTHS = [5, 3, 3, 2]
MULTIPLICITIES = [[2, 1, 3], [2, 2, 1]]


def _data(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, WIDTHS[0], generator=g, dtype=torch.float64),
            torch.randn(n, WIDTHS[-1], generator=g, dtype=torch.float64))


def _mse(target: torch.Tensor):
    return lambda y: ((y - target) ** 2).sum()


def _figures(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    analysis = TorchAnalysis(model, x, eps=0.0)
    return {layer.name: analysis.figures(layer) for layer in analysis.layers}


def test_analysis_finds_the_planted_covers() -> None:
    model, planted = planted_mlp(WIDTHS, MULTIPLICITIES)
    x, _ = _data()
    figures = _figures(model, x)
    for name, partition in zip(("0", "2"), planted):
        assert figures[name].fibers == partition
        assert figures[name].opfibers == partition
        assert figures[name].covers == partition


def test_activity_synchronization_eq4() -> None:
    model, _ = planted_mlp(WIDTHS, MULTIPLICITIES)
    x, _ = _data()
    fibers = {n: f.fibers for n, f in _figures(model, x).items()}
    outputs, _ = layer_outputs(model, x)
    for name in ("0", "2"):
        assert not fibers[name].is_discrete
        assert synchronized(outputs[name], fibers[name])
        assert synchronized(torch.tanh(outputs[name]), fibers[name])
    with torch.no_grad():  # negative control: one input weight of one copy moves
        model[0].weight[1, 0] += 0.1
    outputs, _ = layer_outputs(model, x)
    assert not synchronized(outputs["0"], fibers["0"])
    assert _figures(model, x)["0"].fibers != fibers["0"]


def test_error_synchronization_eq6() -> None:
    model, _ = planted_mlp(WIDTHS, MULTIPLICITIES)
    x, target = _data()
    opfibers = {n: f.opfibers for n, f in _figures(model, x).items()}
    _, errors = layer_outputs(model, x, loss=_mse(target))
    for name in ("0", "2"):
        assert not opfibers[name].is_discrete
        assert synchronized(errors[name], opfibers[name])
    with torch.no_grad():  # negative control: one outgoing weight of one copy moves
        model[2].weight[0, 0] += 0.1
    _, errors = layer_outputs(model, x, loss=_mse(target))
    assert not synchronized(errors["0"], opfibers["0"])
    assert _figures(model, x)["0"].opfibers != opfibers["0"]


def test_synchronized_learning_eq9() -> None:
    model, _ = planted_mlp(WIDTHS, MULTIPLICITIES)
    x, target = _data()
    figures = _figures(model, x)
    layer_outputs(model, x, loss=_mse(target))
    # gradient of W2 (rows: layer-2 opfibers, columns: layer-1 fibers) is constant on blocks
    assert synchronized_blocks(model[2].weight.grad, figures["2"].opfibers, figures["0"].fibers)
    assert synchronized_blocks(model[4].weight.grad, Partition.discrete(2), figures["2"].fibers)
    with torch.no_grad():  # negative control: a copy's input weight moves, its activity with it
        model[0].weight[1, 0] += 0.1
    layer_outputs(model, x, loss=_mse(target))
    assert not synchronized_blocks(model[2].weight.grad, figures["2"].opfibers, figures["0"].fibers)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "weight_decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, noise: float = 0.0) -> list[dict]:
    """Covers after every step (the first entry before training)."""
    g = torch.Generator().manual_seed(7)
    history = [{n: f.covers for n, f in _figures(model, _data()[0]).items()}]
    for step in range(steps):
        x, target = _data(seed=100 + step)
        layer_outputs(model, x, loss=_mse(target))
        if noise:
            for p in model.parameters():
                p.grad += noise * torch.randn(p.shape, generator=g, dtype=p.dtype)
        optimizer.step()
        history.append({n: f.covers for n, f in _figures(model, x).items()})
    return history


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_covers_invariant_under_gradient_steps_theorem_3_1(name: str) -> None:
    model, planted = planted_mlp(WIDTHS, MULTIPLICITIES)
    history = _train(model, OPTIMIZERS[name](model.parameters()), steps=4)
    for before, after in zip(history, history[1:]):
        for layer in before:
            assert before[layer].is_finer_than(after[layer]), (layer, before[layer], after[layer])
    assert history[-1]["0"] == planted[0] and history[-1]["2"] == planted[1]


def test_noisy_steps_break_covers_negative_control() -> None:
    model, planted = planted_mlp(WIDTHS, MULTIPLICITIES)
    history = _train(model, OPTIMIZERS["sgd"](model.parameters()), steps=1, noise=1e-3)
    assert not planted[0].is_finer_than(history[-1]["0"])


def _gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    layer_outputs(model, x, loss=_mse(target))
    return [m.weight.grad.clone() for m in model if isinstance(m, nn.Linear)]


def _direction_preserved(model: nn.Module, symmetry: str) -> bool:
    """Eq. 18: dL/dW[i, j] in the network equals (1/|c'|) dL/dW_base[c', c] for i in c', j in c."""
    x, target = _data()
    analysis = TorchAnalysis(model, x, eps=0.0, symmetry=symmetry)
    partitions = [Partition.discrete(WIDTHS[0])] + [analysis.figures(layer).collapse for layer in analysis.layers]
    base = collapse_to_base(model, x, eps=0.0, symmetry=symmetry)
    assert torch.allclose(base(x), model(x), rtol=1e-10, atol=1e-12)
    ok = True
    for k, (g, g_base) in enumerate(zip(_gradients(model, x, target), _gradients(base, x, target))):
        rows, columns = partitions[k + 1], partitions[k]
        expected = g_base.numpy()[np.ix_(rows.labels, columns.labels)] / rows.sizes()[rows.labels][:, None]
        ok &= bool(np.allclose(g.numpy(), expected, rtol=1e-9, atol=1e-12))
    return ok


def test_gradient_direction_preserved_in_cover_base_eq18() -> None:
    model, _ = planted_mlp(WIDTHS, MULTIPLICITIES)
    assert _direction_preserved(model, "cover")


def test_fiber_base_without_opfibers_loses_gradient_direction_negative_control() -> None:
    model, planted = planted_mlp(WIDTHS, MULTIPLICITIES, uneven=True)
    figures = _figures(model, _data()[0])
    assert figures["0"].fibers == planted[0] and figures["0"].covers != planted[0]
    assert not _direction_preserved(model, "fiber")


def test_linear_synchronization_implies_fibers_sec_9_2() -> None:
    """Linear activations: neurons synchronized on every input are exactly the fibers (also
    those whose input rows differ but whose sums over the previous fibers agree)."""
    model, _ = planted_mlp(WIDTHS, MULTIPLICITIES, uneven=True, activation=nn.Identity)
    x = torch.randn(64, WIDTHS[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    figures = _figures(model, x)
    outputs, _ = layer_outputs(model, x)
    assert not torch.equal(model[2].weight[0], model[2].weight[1])  # rows differ, sums agree
    for name in ("0", "2"):
        assert activity_partition(outputs[name]) == figures[name].fibers


def test_relu_synchronization_does_not_imply_fibers_negative_control() -> None:
    """The converse needs linearity: two ReLU neurons silent on all the data are synchronized
    but have different input weights, so they are no fiber; without the ReLU they differ."""
    layer = nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]]))
        layer.bias.fill_(-0.1)
    x = torch.rand(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    relu, linear = nn.Sequential(layer, nn.ReLU(), nn.Linear(2, 1).double()), nn.Sequential(layer, nn.Linear(2, 1).double())
    fibers = _figures(relu, x)["0"].fibers
    assert fibers.is_discrete
    assert activity_partition(torch.relu(layer_outputs(relu, x)[0]["0"])).n_colors == 1
    assert activity_partition(layer_outputs(linear, x)[0]["0"]) == fibers


@pytest.mark.parametrize("activation, flavored", [(nn.Tanh, True), (nn.Identity, False)])
def test_opfibers_are_flavored_by_fibers_only_when_nonlinear_eq5(activation: type[nn.Module],
                                                                 flavored: bool) -> None:
    """Two neurons with equal outgoing weights but different inputs: their errors differ through
    sigma'(z) in a tanh network, so Eq. 5's flavor must keep them apart; with a linear activation
    (q = 1) their errors agree and they share an opfiber."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), activation(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[2].weight[:, 1] = model[2].weight[:, 0]
    x, target = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opfibers = _figures(model, x)["0"].opfibers
    pair = Partition([0, 0, 1])
    _, errors = layer_outputs(model, x, loss=_mse(target))
    assert synchronized(errors["0"], pair) is not flavored
    assert (opfibers == pair) is not flavored
    assert opfibers.is_discrete is flavored
