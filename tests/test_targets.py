"""Target search: the result meets the target it reports, measured independently (parameter
count of the written model, ONNX Runtime outputs against the original), and the per-layer eps it
reports reproduce it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from conftest import build_mlp

import onnxfib
from onnxfib import stats
from onnxfib.analysis import Cut, ForwardMemo, analyze
from onnxfib.errors import UsageError, ValidationMismatchError
from onnxfib.folding import Folder
from onnxfib.targets import Evaluator, HeldOut, Subsampled, can_deal, deal_rows, search
from onnxfib.validation import run_tensors


@pytest.fixture(scope="module")
def model():
    return build_mlp([12, 32, 24, 4], seed=5, planted=False)


@pytest.fixture(scope="module")
def data():
    return {"x": np.random.default_rng(7).standard_normal((200, 12)).astype(np.float32)}


def _outputs(model, data) -> np.ndarray:
    (y,), = run_tensors(model, ["y"], [data], "model")
    return y


@pytest.mark.slow
def test_target_params_is_met_and_its_layer_eps_reproduce_it(model, data):
    result = onnxfib.compress(model, data=data, target_params=0.4)
    kept = stats.count_parameters(result.model) / stats.count_parameters(model)
    target = result.report.target
    assert target.kind == "params" and target.met
    assert kept <= 0.4 and target.achieved == pytest.approx(kept)
    assert kept > 0.3  # as close as the search's steps allow, not a collapse to nothing
    chosen = {layer.name: layer.eps for layer in result.report.layers}
    assert any(eps > 0 for eps in chosen.values())
    again = onnxfib.compress(model, layer_eps=chosen, check=False)
    assert again.report.params_after == result.report.params_after



@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_target_params_reaches_deep_fractions_on_the_shipped_digits_model(fraction):
    """Merging a layer changes the colors a later layer reads, which can undo some of that
    layer's merges for a step; the search must still go on to merge it later. The shipped
    digits MLP keeps 6% of its parameters at a uniform eps of 1, so both fractions are reachable."""
    from pathlib import Path

    models = Path(__file__).resolve().parent.parent / "models"
    original = str(models / "digits_mlp.onnx")
    result = onnxfib.compress(original, data=str(models / "digits_sample.npz"), target_params=fraction)
    kept = stats.count_parameters(result.model) / result.report.params_before
    assert result.report.target.met and kept <= fraction


@pytest.mark.slow
def test_target_params_re_cuts_a_later_layer_whose_distances_moved():
    """A scikit-learn MLP on the wine data: once its second layer is merged to one neuron, each
    further merge of the first layer moves the second layer's merge distances above its eps, so
    the second layer would split again (more parameters, the step refused). The search re-cuts it
    to its earlier merges instead, and a uniform eps of 1.5 shows 10% is reachable."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    train, _ = train_test_split(np.arange(len(y)), test_size=0.4, random_state=0)
    classifier = MLPClassifier((128, 64), max_iter=2000, random_state=0).fit(X[train], y[train])
    model = to_onnx(classifier, X[:1], options={"zipmap": False})
    params = stats.count_parameters(model)
    assert stats.count_parameters(onnxfib.compress(model, eps=1.5, check=False).model) < 0.1 * params
    result = onnxfib.compress(model, target_params=0.1)
    assert result.report.target.met and stats.count_parameters(result.model) <= 0.1 * params


def _relative_error(compressed, original, data) -> float:
    """The largest output error over the original output's largest magnitude."""
    reference = _outputs(original, data)
    return float(np.max(np.abs(_outputs(compressed, data) - reference)) / np.max(np.abs(reference)))


def test_max_error_is_met_on_the_data(model, data):
    """--max-error is relative to the output's scale (validation's max_rel)."""
    limit = 0.1
    result = onnxfib.compress(model, data=data, max_error=limit)
    measured = _relative_error(result.model, model, data)
    assert measured <= limit and result.report.target.achieved == pytest.approx(measured, rel=1e-6, abs=1e-7)
    assert result.report.target.max_rel == result.report.target.achieved
    assert result.report.validation.outputs[0].max_rel == pytest.approx(measured, rel=1e-6)
    assert result.report.params_after < result.report.params_before
    assert result.report.validation is not None  # errors reported, rtol does not decide


@pytest.mark.slow
def test_max_drop_is_met_on_the_labels(model, data):
    labels = _outputs(model, data).argmax(axis=1)  # the original is right on every sample
    result = onnxfib.compress(model, data=data, labels=labels, max_drop=0.05, calibrate=True)
    accuracy = float(np.mean(_outputs(result.model, data).argmax(axis=1) == labels))
    assert 1.0 - accuracy <= 0.05
    assert result.report.target.accuracy_after == pytest.approx(accuracy)
    assert result.report.params_after < result.report.params_before and result.report.refit


def test_progress_reports_each_search_step_ending_at_the_result(model, data):
    """Every step of the search is announced, and every layer measured on the way to it; the last
    announced step is the model returned, whose parameters and output error ONNX Runtime
    measures independently here."""
    announced: list[str] = []
    result = onnxfib.compress(model, data=data, max_error=0.3, progress=announced.append)
    kept = stats.count_parameters(result.model) / stats.count_parameters(model)
    measured = _relative_error(result.model, model, data)
    probes = [line for line in announced if line.startswith("measuring layer ")]
    lines = [line for line in announced if not line.startswith("measuring layer ")]
    searchable = [layer.name for layer in analyze(model, eps=0.0).layers if layer.frozen is None]
    first = [line.split(" (")[0] for line in announced[:len(searchable)]]
    assert first == [f"measuring layer {i}/{len(searchable)}" for i in range(1, len(searchable) + 1)]
    assert len(probes) >= len(searchable) and len(lines) > 1
    assert lines[-1] == (f"keeps {kept:.2%} of the parameters; max output error {measured:.3g} of the output's "
                         "scale, asked at most 0.3")
    fractions = [float(line.split("keeps ")[1].split("%")[0]) for line in lines]
    assert fractions == sorted(fractions, reverse=True)  # greedy steps only remove parameters


def test_allocation_announces_each_probe_before_its_first_allocation(model, data):
    """A parameter target probes each layer before its first allocation: one line per probe,
    numbered, naming the layer, before the first step."""
    announced: list[str] = []
    onnxfib.compress(model, data=data, target_params=0.6, check=False, progress=announced.append)
    searchable = {layer.name for layer in analyze(model, eps=0.0).layers if layer.frozen is None}
    probes = [line for line in announced if line.startswith("measuring layer ")]
    total = int(probes[0].split("/")[1].split(" ")[0])
    assert [line.split(" (")[0] for line in announced[:total]] == [f"measuring layer {i}/{total}"
                                                                   for i in range(1, total + 1)]
    assert {line.split("(")[1].split(")")[0] for line in probes[:total]} <= searchable
    assert not announced[total].startswith("measuring layer ")  # then the allocation's step


def test_parameter_target_steps_show_the_error_the_search_minimises(model, data):
    """A parameter target's step lines give the output's mean squared error over its variance (what
    the search and its exchange judge by) and the largest error; the last is the model returned,
    measured here in ONNX Runtime."""
    announced: list[str] = []
    result = onnxfib.compress(model, data=data, target_params=0.6, check=False, progress=announced.append)
    reference, compressed = _outputs(model, data), _outputs(result.model, data)
    mse = float(np.mean((compressed - reference) ** 2) / np.var(reference))
    largest = float(np.max(np.abs(compressed - reference)))
    kept = stats.count_parameters(result.model) / stats.count_parameters(model)
    steps = [line for line in announced if not line.startswith("measuring layer ")]
    assert steps[-1] == (f"keeps {kept:.2%} of the parameters; output error {mse:.3g} (mean square / variance), "
                         f"max abs {largest:.3g}")


def test_sweep_progress_announces_every_point(model, data):
    lines: list[str] = []
    points = onnxfib.sweep(model, eps_values=[0.0, 0.3, 0.6], data=data, progress=lines.append)
    assert lines == [f"eps {p.eps:g} ({i}/3): keeps {p.params_kept:.2%} of the parameters"
                     for i, p in enumerate(points, start=1)]


@pytest.mark.slow
def test_unreachable_target_raises_with_the_report(model, data):
    with pytest.raises(ValidationMismatchError, match="target not met") as caught:
        onnxfib.compress(model, data=data, target_params=0.001)
    assert caught.value.report.target.achieved > 0.001


@pytest.mark.parametrize("kwargs, message", [
    ({"target_params": 0.5, "max_error": 1.0}, "at most one target"),
    ({"target_params": 0.0}, "target_params"),
    ({"target_params": 1.0}, "target_params"),
    ({"max_error": -1.0}, "max_error"),
    ({"max_drop": 0.01}, "labels"),
    ({"target_params": 0.5, "eps": 0.3}, "no eps"),
    ({"layer_eps": {"nope": 0.1}}, "unknown layer"),
    ({"labels": np.zeros(3, dtype=np.int64), "max_drop": 0.1}, "labels hold 3"),
    ({"labels": np.zeros(200), "max_drop": 0.1}, "integers"),
])
def test_bad_target_arguments_are_usage_errors(model, data, kwargs, message):
    with pytest.raises(UsageError, match=message):
        onnxfib.compress(model, data=data, **kwargs)


def test_deal_rows_matches_indexing_the_concatenated_rows():
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((n, 3)), "m": rng.standard_normal((n, 2))} for n in (5, 1, 7)]
    labels = rng.integers(0, 9, 13)
    parts, part_labels, rows = deal_rows(batches, labels, 4)
    whole = {name: np.concatenate([b[name] for b in batches]) for name in ("x", "m")}
    for k in range(4):
        for name in ("x", "m"):
            np.testing.assert_array_equal(parts[k][name], whole[name][k::4])
        np.testing.assert_array_equal(part_labels[k], labels[k::4])
        assert rows[k] == len(labels[k::4])
    assert not can_deal([{"x": np.zeros((3, 2)), "s": np.float32(1)}], 2) and not can_deal(batches, 7)


@pytest.mark.slow
def test_held_out_figures_predict_fresh_data_better_than_in_sample_ones():
    """A calibrated collapse refit on few rows fits them closely; measured on rows its refit did
    not see, the error is what fresh data from the same source shows."""
    model = build_mlp([8, 24, 16, 3], seed=3)
    rng = np.random.default_rng(5)
    calibration = [{"x": rng.standard_normal((40, 8)).astype(np.float32)}]
    fresh = [{"x": rng.standard_normal((4000, 8)).astype(np.float32)}]
    options = {"calibrate": True, "ridge": 1e-6, "folder": Folder(model)}
    in_sample = Evaluator(model, calibration, **options)
    held_out = HeldOut(model, calibration, folds=4, **options)
    layer_eps = {"fc0": 0.6, "fc1": 0.6}
    measured = held_out(layer_eps)
    finished = held_out.finish(measured)
    assert finished.params == in_sample(layer_eps).params < stats.count_parameters(model)
    (reference,), = run_tensors(model, ["y"], fresh, "original")
    (compressed,), = run_tensors(finished.model, ["y"], fresh, "compressed")
    on_fresh = float(np.mean((compressed - reference) ** 2) / np.var(reference))
    assert abs(measured.mse - on_fresh) < abs(in_sample(layer_eps).mse - on_fresh)
    assert in_sample(layer_eps).mse < measured.mse  # the refit flatters the rows it saw


def _relative_mse(model, compressed, batches) -> float:
    """The compressed model's mean squared output error over the original's output variance,
    from ONNX Runtime on ``batches``."""
    reference = np.concatenate([y for y, in run_tensors(model, ["y"], batches, "original")])
    output = np.concatenate([y for y, in run_tensors(compressed, ["y"], batches, "compressed")])
    return float(np.mean((output - reference) ** 2) / np.var(reference))


def test_subsampled_search_chooses_on_every_kth_row_and_refits_on_all():
    """The search sees every fourth row; the model it returns is refit on all of them, which fits
    all of them better than the searched rows' refit of the same collapse, and its figures are
    those of all the rows (ONNX Runtime against the original)."""
    model = build_mlp([8, 24, 16, 3], seed=3, planted=False)
    x = np.random.default_rng(5).standard_normal((96, 8)).astype(np.float32)
    calibration = [{"x": x}]
    options = {"calibrate": True, "ridge": 1e-6, "folder": Folder(model)}
    evaluator = Subsampled(model, calibration, rows=24, **options)
    assert (evaluator.rows, evaluator.total) == (24, 96)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in evaluator.search.batches]), x[::4])
    chosen = search(evaluator.search, "params", 0.6)  # what Subsampled's search returns before finish
    finished = evaluator.finish(chosen)
    params = stats.count_parameters(finished.model)
    assert (finished.layer_eps, finished.grouping) == (chosen.layer_eps, chosen.grouping)
    assert finished.params == chosen.params == params <= 0.6 * stats.count_parameters(model)
    on_all = _relative_mse(model, finished.model, calibration)
    assert finished.mse == pytest.approx(on_all, rel=1e-3)
    assert on_all < _relative_mse(model, chosen.model, calibration)
    assert evaluator.report(finished, "params", 0.6).met


@pytest.mark.slow
def test_calibrated_params_target_searches_on_a_share_of_many_rows(model):
    """With more calibration rows than a search measures on, compress says it searches on a
    share, and the target it reports (met, counted on the written model) comes with the
    figures of all the rows."""
    x = np.random.default_rng(9).standard_normal((400, 12)).astype(np.float32)
    lines: list[str] = []
    result = onnxfib.compress(model, data={"x": x}, target_params=0.5, calibrate=True, progress=lines.append)
    assert lines[0] == ("searching on 100 of the 400 calibration rows (spread over all of them); the result is "
                        "refit and measured on every row")
    assert stats.count_parameters(result.model) <= 0.5 * stats.count_parameters(model)
    reference, output = _outputs(model, {"x": x}), _outputs(result.model, {"x": x})
    largest = float(np.max(np.abs(output - reference)))
    assert result.report.target.met
    assert result.report.target.max_rel == pytest.approx(largest / float(np.max(np.abs(reference))), rel=1e-4)
    few: list[str] = []
    onnxfib.compress(model, data={"x": x[:128]}, target_params=0.5, calibrate=True, progress=few.append)
    assert not any(line.startswith("searching on") for line in few)


class _CountingEvaluator(Evaluator):
    """A real Evaluator that counts the collapses it measures (probes included)."""

    calls = 0

    def __call__(self, layer_eps, eps=0.0):
        self.calls += 1
        return super().__call__(layer_eps, eps)

    def probe(self, layer_eps):
        self.calls += 1
        return super().probe(layer_eps)


def _deep_mlp():
    deep = build_mlp([12] + [24] * 8 + [4], seed=3, planted=False)
    rows = {"x": np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)}
    return deep, rows


@pytest.mark.slow
def test_allocation_measures_a_few_collapses_per_layer_however_far_the_target():
    """A parameter target is reached by allocation: a probe per layer and round, then one
    measured collapse per round and the exchange's trades, not a collapse per layer per step.
    The result meets its target (the collapsed model's parameters, counted here) and comes
    within a step of it."""
    deep, rows = _deep_mlp()
    params = stats.count_parameters(deep)
    for keep in (0.7, 0.3):
        evaluate = _CountingEvaluator(deep, [rows], folder=Folder(deep))
        outcome = search(evaluate, "params", keep)
        layers = sum(layer.frozen is None for layer in outcome.analysis.layers)
        kept = stats.count_parameters(outcome.model)
        assert layers == 8 and kept <= keep * params and kept > keep * params - 0.05 * params
        assert evaluate.calls <= 4 * layers + 40


@pytest.mark.slow
def test_lazy_greedy_measures_far_fewer_collapses_than_layers_times_steps():
    """A fidelity target is met by the greedy, which measures every layer at its first step,
    then only layers whose earlier score could still win: an eager greedy measures every layer
    at every step (layers x steps). The result still meets its target, measured here in ONNX
    Runtime against the original."""
    deep, rows = _deep_mlp()
    evaluate = _CountingEvaluator(deep, [rows])
    steps: list = []
    outcome = search(evaluate, "error", 0.3, on_step=steps.append)
    layers = sum(layer.frozen is None for layer in outcome.analysis.layers)
    assert _relative_error(outcome.model, deep, rows) <= 0.3
    assert len(steps) >= 4 and layers == 8
    assert evaluate.calls < layers * len(steps) / 2


def test_forward_memo_reruns_only_the_sites_a_changed_layer_reaches():
    """A search's analyses share a ForwardMemo: when one layer's eps changes, the sites before it
    read what they read before and are not run again, and the analysis equals one made without
    the memo (the same fibers, merge distances and collapsed weights)."""
    deep, _ = _deep_mlp()
    memo = ForwardMemo()
    first = analyze(deep, eps=0.3, forwards=memo, record_heights=True, figures=False)
    assert len(memo) == len(first.sites)
    names = [site.name for site in first.sites]
    changed = [layer.name for layer in first.layers if layer.frozen is None][-2]
    layer_eps = {changed: 0.9}
    again = analyze(deep, eps=0.3, layer_eps=layer_eps, forwards=memo, record_heights=True, figures=False)
    fresh = analyze(deep, eps=0.3, layer_eps=layer_eps, record_heights=True, figures=False)
    rerun = len(memo) - len(first.sites)
    assert 1 <= rerun <= len(names) - names.index(changed)
    for site in fresh.sites:
        for port in site.outputs:
            assert again.fiber(port).partition == fresh.fiber(port).partition
            np.testing.assert_array_equal(again.fiber(port).scales, fresh.fiber(port).scales)
    assert again.heights.keys() == fresh.heights.keys()
    for name, heights in fresh.heights.items():
        np.testing.assert_array_equal(again.heights[name], heights)
    widths = [{layer.name: layer.width_after for layer in analysis.layers}[changed] for analysis in (first, again)]
    assert widths[1] < widths[0]  # the changed layer was clustered again, at its new eps
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fresh.collapse().graph.initializer}
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in again.collapse().graph.initializer} == {
        name: array.tobytes() for name, array in weights.items()}


def test_a_cut_settles_each_layer_at_the_eps_of_its_merges_as_the_analysis_reaches_it():
    """``Analysis(layer_cuts=)`` gives layers counts of merges instead of eps: each cut layer's
    output fibers have exactly that many fewer colors than channels, although merging the first
    moves the second's merge distances, and a partner runs at its head's eps. The analysis at
    the eps it settled (``layer_eps``) is the same analysis: equal fibers and collapsed weights."""
    deep, _ = _deep_mlp()
    start = analyze(deep, eps=0.0, record_heights=True, figures=False)
    first, second, partner = [layer.name for layer in start.layers if layer.frozen is None][1:4]
    cuts = {first: Cut(9, 1.9), second: Cut(6, 1.9, partners=(partner,))}  # 1.9: read by no dense layer
    memo = ForwardMemo()
    cut = analyze(deep, eps=0.0, layer_cuts=cuts, record_heights=True, figures=False, forwards=memo)
    reports = {layer.name: layer for layer in cut.layers}
    outputs = {site.name: site.outputs[0] for site in cut.sites if site.layer}
    for name, wanted in cuts.items():
        colors = cut.fiber(outputs[name]).partition.n_colors
        assert colors == reports[name].width - wanted.merges
        assert int(np.searchsorted(cut.heights[name], reports[name].eps, side="right")) == wanted.merges
    assert reports[partner].eps == reports[second].eps > 0
    assert not np.array_equal(cut.heights[second], start.heights[second])  # its distances moved
    settled = {name: reports[name].eps for name in (first, second, partner)}
    again = analyze(deep, eps=0.0, layer_eps=settled, record_heights=True, figures=False, forwards=memo)
    for site in cut.sites:
        for port in site.outputs:
            assert again.fiber(port).partition == cut.fiber(port).partition
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in again.collapse().graph.initializer} == {
        t.name: onnx.numpy_helper.to_array(t).tobytes() for t in cut.collapse().graph.initializer}
    with pytest.raises(ValueError, match="comes after it"):
        analyze(deep, eps=0.0, layer_cuts={partner: Cut(3, 0.5, partners=(first,))}, figures=False)


def test_a_cut_recurrent_layer_runs_at_the_eps_its_cut_gives(tmp_path):
    """A bidirectional LSTM clusters its hidden units per direction, again and again until their
    colors are stable, so no one tree can settle its eps from a count of merges: cut, it runs at
    the cut's own eps (what the search cuts from the distances it has), like ``layer_eps``."""
    from planted_utils import export_torch
    from transformer_lifting import rnn_model

    path = export_torch(rnn_model("LSTM", seed=2, hidden_size=16, bidirectional=True), tmp_path / "lstm.onnx", 6,
                        seq=4)
    model = onnx.load(path)
    lstm = next(layer.name for layer in analyze(model, eps=0.0, figures=False).layers if layer.op_type == "LSTM")
    cut = analyze(model, eps=0.0, layer_cuts={lstm: Cut(12, 1.5)}, figures=False)
    given = analyze(model, eps=0.0, layer_eps={lstm: 1.5}, figures=False)
    (report,), (expected,) = [[layer for layer in a.layers if layer.name == lstm] for a in (cut, given)]
    assert report.eps == 1.5 and report.width_after == expected.width_after < report.width


def test_merge_distances_are_recorded_for_the_layers_a_search_can_step_only():
    """A layer whose outputs are all frozen (here the graph output's) is never stepped by a search:
    its rows are clustered without the tree, and no merge distances are kept for it; every layer
    that may narrow has them."""
    deep, _ = _deep_mlp()
    analysis = analyze(deep, eps=0.3, record_heights=True, figures=False)
    free = {layer.name for layer in analysis.layers if layer.frozen is None}
    frozen = {layer.name for layer in analysis.layers} - free
    assert frozen and free and set(analysis.heights) == free
