"""onnxfib.train tools on real torch models: the cover tracker, symmetry breaking (outputs kept
at the moment of breaking), continual backprop, and collapse to the base / collapse–retrain."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from train_planted import planted_mlp  # noqa: E402

import onnxfib  # noqa: E402
from onnxfib.errors import UsageError  # noqa: E402
from onnxfib.partition import Partition  # noqa: E402
from onnxfib.train import (  # noqa: E402
    ContinualBackprop,
    CoverTracker,
    EarlyStopping,
    OnnxLayers,
    SymmetryBreaker,
    TorchAnalysis,
    break_covers,
    collapse_retrain,
    collapse_to_base,
    export_onnx,
    parameter_count,
)
from onnxfib.train.surgery import reinitialize  # noqa: E402
from onnxfib.train.tracker import splits  # noqa: E402

WIDTHS = [6, 4, 4, 3]
MULTIPLICITIES = [[2, 1, 3, 1], [1, 2, 2, 1]]


def _planted(activation: type[nn.Module] = nn.ReLU, seed: int = 0) -> tuple[nn.Sequential, list[Partition]]:
    model, planted = planted_mlp(WIDTHS, MULTIPLICITIES, activation=activation, dtype=torch.float32, seed=seed)
    return model, planted


def _x(n: int = 32, width: int = WIDTHS[0], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


class PlantedCNN(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-Flatten-Linear with channel 1 a copy of channel 0 in both
    convolutions (weights, BatchNorm statistics and the columns that read them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(5 * 4 * 4, 3)
        with torch.no_grad():
            for conv, bn in ((self.features[0], self.features[1]), (self.features[3], self.features[4])):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t[1] = t[0]
            second = self.features[3].weight
            second[:, 0] = second[:, 1] = (second[:, 0] + second[:, 1]) / 2
            head = self.head.weight.view(3, 5, 16)
            head[:, 0] = head[:, 1] = (head[:, 0] + head[:, 1]) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Residual(nn.Module):
    """A block with a residual Add (torch.fx traceable, not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + self.b(torch.relu(self.a(h)))
        return self.out(torch.relu(h))


@pytest.mark.slow
def test_tracker_records_planted_counts_and_writes_files(tmp_path) -> None:
    model, planted = _planted()
    tracker = CoverTracker(model, _x(), eps=0.0, every=2)
    assert tracker.maybe_record(1) == []
    records = tracker.maybe_record(2, epoch=0)
    by_layer = {r.layer: r for r in records}
    assert [by_layer[n].covers for n in ("0", "2")] == [p.n_colors for p in planted]
    assert by_layer["0"].cover_sizes == sorted(planted[0].sizes().tolist(), reverse=True)
    assert by_layer["0"].merged == len(planted[0]) - planted[0].n_colors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3, 7):
        loss = model(_x(seed=step)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracker.maybe_record(step)
    assert all(r.splits == 0 for r in tracker.records)  # Theorem 3.1 on real training
    assert tracker.seconds > 0
    rows = (tmp_path / "c.csv")
    tracker.to_csv(rows)
    assert len(rows.read_text().splitlines()) == 1 + len(tracker.records)
    data = json.loads(tracker.to_json(tmp_path / "c.json").read_text())
    assert len(data["records"]) == len(tracker.records) == 3 * 3
    for path in (tracker.plot_counts(tmp_path / "f.png"), tracker.plot_sizes(tmp_path / "s.png", "2")):
        assert path.stat().st_size > 1000
    with pytest.raises(UsageError):
        tracker.plot_counts(tmp_path / "x.png", kind="bogus")
    with pytest.raises(UsageError):
        tracker.plot_sizes(tmp_path / "x.png", "nope")


def test_splits_counts_covers_that_separate() -> None:
    before = Partition([0, 0, 1, 1, 2])
    assert splits(before, Partition([0, 0, 0, 0, 1])) == 0
    assert splits(before, Partition([0, 1, 2, 2, 3])) == 1


def test_tracker_sees_residual_and_cnn_models() -> None:
    residual = CoverTracker(Residual(), _x()).record(0)
    assert [r.layer for r in residual] == ["inp", "a", "b", "out"]
    cnn = {r.layer: r for r in CoverTracker(PlantedCNN().eval(), torch.randn(2, 2, 8, 8)).record(0)}
    assert cnn["features.0"].covers == 3 and cnn["features.3"].covers == 4


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_break_covers_keeps_outputs_and_breaks_the_symmetry(activation: type[nn.Module]) -> None:
    model, planted = _planted(activation)
    x = _x()
    before = model(x).detach()
    rows = model[0].weight.detach().clone()
    broken = break_covers(model, x)
    assert broken.replaced == sum(len(p) - p.n_colors for p in planted)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    redundant = [i for c in broken.covers["0"] for i in c[1:]]
    assert not torch.equal(model[0].weight[redundant], rows[redundant])
    kept_rows = [c[0] for c in broken.covers["2"]] + [i for i in range(len(planted[1]))
                                                     if not any(i in c for c in broken.covers["2"])]
    assert torch.all(model[2].weight[kept_rows][:, redundant] == 0)  # re-seeded rows may read them
    analysis = TorchAnalysis(model, x, eps=0.0)
    assert all(analysis.figures(layer).covers.is_discrete for layer in analysis.layers)


def test_reseeding_without_folding_changes_outputs_negative_control() -> None:
    model, _ = _planted()
    x = _x()
    before = model(x).detach()
    unit = TorchAnalysis(model, x, eps=0.0).units()[0]
    reinitialize(unit, np.array([1]), torch.Generator().manual_seed(0))
    assert not torch.allclose(model(x), before, rtol=1e-3, atol=1e-3)


def test_break_covers_on_cnn_with_batchnorm_and_flatten() -> None:
    model = PlantedCNN().eval()
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    before = model(x).detach()
    broken = break_covers(model, x)
    assert broken.covers == {"features.0": [[0, 1]], "features.3": [[0, 1]]}
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert torch.all(model.head.weight.view(3, 5, 16)[:, 1] == 0)
    assert model.features[1].running_var[1] == 1.0


def test_break_covers_leaves_residual_streams_alone() -> None:
    model = Residual()
    x = _x()
    units = TorchAnalysis(model, x, eps=0.0).units()
    assert [u.producer.name for u in units] == ["a"]


@pytest.mark.slow
def test_symmetry_breaker_schedule_respects_maturity_and_budget() -> None:
    model, planted = _planted()
    x = _x()
    young = SymmetryBreaker(model, x, eps=0.0, replacement_rate=1.0, maturity=10, every=1)
    assert [young.step() for _ in range(9)] == [0] * 9
    before = model(x).detach()
    assert young.step() > 0  # mature now: covers broken at the recompute
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    model, _ = _planted()
    slow = SymmetryBreaker(model, x, eps=0.0, replacement_rate=1e-6, maturity=0, every=1)
    assert sum(slow.step() for _ in range(5)) == 0  # budget below one neuron
    with pytest.raises(UsageError):
        SymmetryBreaker(model, x, every=0)


def test_continual_backprop_replaces_low_utility_mature_units() -> None:
    model, _ = _planted()
    x = _x()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cbp = ContinualBackprop(model, x, optimizer=optimizer, replacement_rate=0.5, maturity=3, decay=0.9)
    replaced = []
    for _ in range(5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        replaced.append(cbp.step())
    assert replaced[:2] == [0, 0] and replaced[-1] > 0
    for unit in cbp.units:
        fresh = np.flatnonzero(cbp.ages[unit.producer.name] == 0)  # re-seeded at the last step
        reader = unit.readers[0][0]
        reseeded_rows = cbp.ages.get(reader.name, np.ones(reader.width)) == 0  # may read fresh units
        assert torch.all(reader.module.weight[~torch.as_tensor(reseeded_rows)][:, fresh] == 0)
        assert torch.all(optimizer.state[reader.module.weight]["momentum_buffer"][:, fresh] == 0)
    cbp.remove()
    with pytest.raises(UsageError):
        ContinualBackprop(model, x, decay=1.0)


def test_collapse_to_base_is_exact_and_leaves_nothing_to_merge() -> None:
    model, planted = _planted()
    x = _x()
    base = collapse_to_base(model, x, eps=0.0)
    torch.testing.assert_close(base(x), model(x), rtol=1e-5, atol=1e-6)
    widths = [WIDTHS[0]] + [p.n_colors for p in planted] + [WIDTHS[-1]]
    assert parameter_count(base) == sum(a * b + b for a, b in zip(widths, widths[1:]))
    report = onnxfib.compress(export_onnx(base, x), eps=0.0).report
    assert report.params_after == report.params_before == parameter_count(base)


def test_collapse_to_base_narrows_cnn_with_batchnorm() -> None:
    model = PlantedCNN().eval()
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    base = collapse_to_base(model, x, eps=0.0)
    assert base.features[0].out_channels == 3 and base.features[1].num_features == 3
    assert base.features[3].out_channels == 4 and base.head.in_features == 4 * 16
    torch.testing.assert_close(base(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_collapse_retrain_on_an_mlp_stops_when_the_validation_loss_rises() -> None:
    model, _ = _planted(nn.Tanh)
    x, x_val = _x(256), _x(128, seed=5)
    with torch.no_grad():
        y, y_val = model(x), model(x_val) + 0.05 * torch.randn(128, WIDTHS[-1], generator=torch.Generator().manual_seed(6))

    def validate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x_val) - y_val) ** 2).mean())

    def step(m: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        optimizer.step()

    retrain = EarlyStopping(step, validate, lambda p: torch.optim.SGD(p, lr=0.01), every=5, patience=1, max_steps=10)
    result = collapse_retrain(model, layers=OnnxLayers(x[:1]), validate=validate, retrain=retrain, tolerance=0.0)
    assert result.rounds and not result.rounds[-1].accepted and result.stopped == "validation loss not recovered"
    assert all(r.accepted for r in result.rounds[:-1])
    assert result.rounds[-1].loss_retrained > result.loss_before
    assert [r.params for r in result.rounds] == sorted((r.params for r in result.rounds), reverse=True)
    assert result.rounds[0].params < result.params_before
    assert parameter_count(result.model) == (result.rounds[-2].params if len(result.rounds) > 1 else result.params_before)


def test_bad_arguments_raise_usage_errors() -> None:
    model, _ = _planted()
    with pytest.raises(UsageError):
        TorchAnalysis(model, _x(), eps=2.5)
    with pytest.raises(UsageError):
        TorchAnalysis("not a model", _x(), eps=0.0)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        CoverTracker(model, _x(), every=0)


def test_break_covers_folds_proportional_relu_neurons_by_the_scale_rule() -> None:
    """A ReLU neuron twice another (row and bias) is in its fiber with scale 2 (DESIGN's scale
    rule); breaking folds it with the scales, so the outputs stay, where a plain sum of the
    two columns would not."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1], model[0].bias[1] = 2 * model[0].weight[0], 2 * model[0].bias[0]
        model[2].weight[:, 1] = 0.5 * model[2].weight[:, 0]
    x = _x(width=5)
    before = model(x).detach()
    columns = model[2].weight[:, :2].detach().clone()
    broken = break_covers(model, x)
    assert broken.covers == {"0": [[0, 1]]}
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # the kept neuron carries 1.5 relu(z) (the mean scale), neuron 0 had 1x and neuron 1 had 2x
    torch.testing.assert_close(model[2].weight[:, 0], (columns[:, 0] + 2 * columns[:, 1]) / 1.5)
    assert not torch.allclose(model[2].weight[:, 0], columns.sum(1))  # a plain column sum
