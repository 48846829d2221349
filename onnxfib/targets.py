"""Choosing per-layer eps for a stated cost, and sweeping eps to show the trade-off.

Both searches start from the exact collapse (eps 0 everywhere) and read each layer's merge
distances (the eps at which its rows would merge further), so every eps they try removes
neurons. They measure the whole model's outputs on the data against the original's, and
spend output error where it buys the most parameters: the paper's per-layer threshold search
(Sec. 11.4.1), with layers weighed against each other instead of visited one after another.

- ``params`` (keep at most a fraction of the parameters): :func:`allocate`. Each layer is
  probed once (its merge alone, measured), which gives a model of its error against its merges
  (:class:`Curve`); one price of error per parameter then decides every layer's eps, and is
  bisected on parameter counts alone (no model run) to the goal. Layers the allocation takes
  beyond what their probes support are probed deeper and the allocation repeated. An exchange
  phase follows: it trades merges between pairs of layers at the same budget (a step more in
  one, as many fewer in the other as the budget allows) while that lowers the output error.
  Cost: about one collapse per layer and round, plus a few dozen analyses.
- the fidelity limits, met while as much as possible is merged: :func:`greedy` takes, step by
  step, the layer whose next merges cost least output error per parameter removed, measured,
  and stops when no step keeps the figure within the limit:

  - ``error``: the largest output error relative to the output's scale
    (``max_abs / max |original|``, the validation's ``max_rel``) at most the limit;
  - ``drop``: the accuracy lost (:func:`predicted_classes` against the labels) at most the limit;
  - ``agreement``: the share of answers equal to the original's (the same predictions, per
    position for sequence outputs) at least the limit; no labels needed;
  - ``cosine``: the mean cosine between the original's and the compressed output rows (along
    the last axis; the smallest over float outputs) at least the limit.

Every evaluation collapses the model (refit on the data when calibrating) and runs it in ONNX
Runtime; the figures reported are those of the returned eps on the same data. The analyses of
a search skip the figures a report shows (``Analysis(figures=False)``); the returned outcome's
analysis has them (:meth:`Evaluator.finish`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import onnx

from . import stats
from .analysis import Analysis, Cut, ForwardMemo, analyze
from .coloring import Coloring, TreeCache, cut_eps, merges_at
from .graph import GraphView
from .calibrate import OriginalActivations, Selector, refit
from .folding import Folder
from .report import RefitReport, SweepPoint, TargetKind, TargetReport
from .partition import Partition
from .validation import Batch, chunked, common_rows, concatenated, run_tensors

#: Analyses an :class:`Evaluator` keeps for the search to ask again (each holds a graph and
#: its collapse).
RECENT_ANALYSES = 2

#: A trade of the exchange phase merges about this fraction of a layer's rows (at least one).
STEP_FRACTION = 1 / 32

#: The exchange phase trades merges from this many of the costliest layers to as many of the
#: cheapest (see :func:`_exchange`).
EXCHANGE_LAYERS = 4


_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                  onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def label_output(model: onnx.ModelProto) -> int | None:
    """The index of a classifier's label output (integer, one value per sample, as skl2onnx
    writes it), None when the model has none."""
    for index, output in enumerate(model.graph.output):
        tensor = output.type.tensor_type
        if tensor.elem_type in _INTEGER_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) == 1:
            return index
    return None


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of each row (along the last axis) of ``candidate`` with that of ``reference``:
    1 where both rows are zero, 0 where only one is."""
    width = reference.shape[-1] if reference.ndim else 1
    a, b = reference.reshape(-1, width), candidate.reshape(-1, width)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(norms > 0, np.einsum("ij,ij->i", a, b) / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cosines)


def predicted_classes(outputs: Sequence[np.ndarray], label_index: int | None) -> np.ndarray:
    """A classifier's predictions: its label output when it has one, else the argmax over the
    last axis of its first output (one per position of a sequence output)."""
    if label_index is not None:
        return np.asarray(outputs[label_index]).reshape(-1).astype(np.int64)
    return np.atleast_1d(outputs[0]).argmax(axis=-1).reshape(-1)


@dataclass(frozen=True)
class Outcome:
    """One collapse evaluated on the data."""

    layer_eps: dict[str, float]
    analysis: Analysis
    heights: dict[str, np.ndarray]  # each layer's merge distances (Analysis.heights)
    model: onnx.ModelProto
    params: int
    max_abs: float
    mse: float  # mean squared output error, each output's divided by the output's variance
    accuracy: float | None
    refit: list[RefitReport]
    max_rel: float  # the largest output error relative to the output's scale (Evaluator.scales)
    agreement: float  # share of predictions equal to the original's (predicted_classes)
    cosine: float  # mean cosine of output rows with the original's (row_cosines), smallest over outputs
    grouping: str = "merge"  # how the channels were grouped: "merge" (the eps clustering), "fold" or "select"
    eps: float = 0.0  # the eps of the layers layer_eps does not name
    colorings: Mapping[str, Coloring | Partition] | None = None  # the regrouping imposed (Analysis layer_colorings)

#: Parts the rows are dealt into when a calibrated target is measured held out (:class:`HeldOut`).
HELD_OUT_FOLDS = 4


def best_of(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome with the smallest output error among those with no more parameters than the
    first (the merge); the merge on ties."""
    return min((o for o in outcomes if o.params <= outcomes[0].params), key=lambda o: o.mse)


class Evaluator:
    """Collapses ``original`` at given per-layer eps and measures the result on ``batches``
    against the original's outputs (computed once). Besides the merge the eps choose, it measures
    the same widths with the channels grouped otherwise, and keeps whichever has the smaller
    output error: with a ``folder`` (target searches, which choose the widths themselves) folded
    by weights (``folding.Folder``, data-free, so one serves every Evaluator of a model); with
    ``calibrate`` kept channels chosen from the data (``calibrate.Selector``), and every collapse
    is refit, on ``fit_batches`` (default: the measuring ``batches`` themselves). ``trees`` keeps
    the layers' clustering trees across its analyses (signatures that did not change are not
    clustered again), ``forwards`` each site's forward pass by what it read (a site whose
    inputs and eps did not change is not run again: ``analysis.ForwardMemo``); evaluators of one
    model may share them. The model is preprocessed once
    (``GraphView``), and each analysis copies the result. ``scales`` (default: each output's
    largest magnitude on ``batches``) are what relative errors divide by. The last
    ``RECENT_ANALYSES`` analyses a search asked for by their eps alone are kept and given again
    (a search counts, reads the merge distances of and measures the same eps in turn); a collapse
    that is refit works on an analysis of its own, since the refit rewrites the analysis's graph."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, symmetry: str = "fiber",
                 labels: np.ndarray | None = None, calibrate: bool = False, ridge: float = 1e-3,
                 folder: Folder | None = None, fit_batches: Sequence[Batch] | None = None,
                 trees: TreeCache | None = None, scales: Sequence[float] | None = None,
                 forwards: ForwardMemo | None = None) -> None:
        self.original = original
        self.trees = TreeCache() if trees is None else trees
        self.forwards = ForwardMemo() if forwards is None else forwards
        self._recent: OrderedDict[tuple[tuple[tuple[str, float], ...], float], Analysis] = OrderedDict()
        self.prepared = GraphView(original).graph  # preprocessed once; every analysis copies it
        self.batches = list(chunked(batches))
        self.fit_batches = self.batches if fit_batches is None else list(chunked(fit_batches))
        self.symmetry = symmetry
        self.calibrate = calibrate
        self.ridge = ridge
        self.names = [o.name for o in original.graph.output]
        # in the outputs' own dtypes (float64 would double what the largest data's outputs hold)
        self.reference = list(run_tensors(original, self.names, self.batches, "original", dtype=None))
        self.variance = [
            max(float(np.mean([np.var(run[k], dtype=np.float64) for run in self.reference])), 1e-30)
            for k in range(len(self.names))
        ]
        self.scales = list(scales) if scales is not None else [
            max(float(np.max(np.abs(np.where(np.isfinite(run[k]), run[k], 0.0)), initial=0.0)) for run in self.reference)
            for k in range(len(self.names))]
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        self.label_index = label_output(original)
        self.classes = self._classes(self.reference)
        floats = [k for k, o in enumerate(original.graph.output)
                  if o.type.tensor_type.elem_type not in _INTEGER_TYPES]
        self.embeddings = floats or list(range(len(self.names)))
        self.choosers: dict[str, Folder | Selector] = {"fold": folder} if folder is not None else {}
        if calibrate:
            self.choosers["select"] = Selector(original, self.fit_batches, ridge=ridge)
        self.activations = OriginalActivations(original, self.fit_batches)
        self.params_before = stats.count_parameters(original)
        self.accuracy_before = self._accuracy(self.reference)

    def _classes(self, runs: list[list[np.ndarray]]) -> np.ndarray:
        return np.concatenate([predicted_classes(run, self.label_index) for run in runs])

    def _accuracy(self, runs: list[list[np.ndarray]]) -> float | None:
        if self.labels is None:
            return None
        return float(np.mean(self._classes(runs) == self.labels))

    def __call__(self, layer_eps: Mapping[str, float], eps: float = 0.0) -> Outcome:
        """The collapse at ``layer_eps`` (``eps`` for the layers it does not name), measured: the
        best of its merge and its regroupings at no more parameters (:func:`best_of`)."""
        return best_of(self.groupings(layer_eps, eps))

    def probe(self, layer_eps: Mapping[str, float]) -> Outcome:
        """The collapse at ``layer_eps`` as merged (no regrouping), measured: what a search
        probes a layer's sensitivity with."""
        analysis = self._merged(layer_eps, to_refit=self.calibrate)
        return self._collapse(layer_eps, analysis, analysis.heights, "merge")

    def groupings(self, layer_eps: Mapping[str, float], eps: float = 0.0) -> list[Outcome]:
        """The collapse at ``layer_eps`` as merged, then regrouped by each chooser that applies."""
        analysis = self._merged(layer_eps, eps, to_refit=self.calibrate)
        outcomes = [self._collapse(layer_eps, analysis, analysis.heights, "merge", eps)]
        for name, chooser in self.choosers.items():
            chosen = chooser.colorings(analysis)
            if chosen:
                regrouped = self._analyze(layer_eps, eps, layer_colorings=chosen)
                outcomes.append(self._collapse(layer_eps, regrouped, analysis.heights, name, eps, chosen))
        return outcomes

    def _analyze(self, layer_eps: Mapping[str, float], eps: float = 0.0, *, figures: bool = False,
                 **options) -> Analysis:
        """The model analysed at ``layer_eps`` through the shared trees and preprocessed graph;
        without figures (``Analysis(figures=False)``) unless asked: a search needs the collapse."""
        return analyze(self.original, eps=eps, symmetry=self.symmetry, layer_eps=layer_eps, trees=self.trees,
                       prepared=self.prepared, figures=figures, forwards=self.forwards, **options)

    def _merged(self, layer_eps: Mapping[str, float], eps: float = 0.0, *, to_refit: bool = False) -> Analysis:
        """The analysis at ``layer_eps`` with its merge distances, one of the recent ones unless
        it is ``to_refit`` (then a new one, not kept: the refit rewrites its graph)."""
        if to_refit:
            return self._analyze(layer_eps, eps, record_heights=True)
        key = (tuple(sorted(layer_eps.items())), eps)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        return self._keep(key, self._analyze(layer_eps, eps, record_heights=True))

    def _keep(self, key: tuple[tuple[tuple[str, float], ...], float], analysis: Analysis) -> Analysis:
        self._recent[key] = analysis
        while len(self._recent) > RECENT_ANALYSES:
            self._recent.popitem(last=False)
        return analysis

    def cut(self, layer_eps: Mapping[str, float], cuts: Mapping[str, Cut]) -> dict[str, float]:
        """``layer_eps`` with each layer of ``cuts`` (and its partners) at the eps making its
        merges, as one analysis settles them (``Analysis(layer_cuts=)``); that analysis is kept
        among the recent ones, by the eps it settled."""
        analysis = self._analyze(layer_eps, layer_cuts=cuts, record_heights=True)
        named = {*cuts, *(partner for cut in cuts.values() for partner in cut.partners)}
        settled = {**layer_eps, **{layer.name: layer.eps for layer in analysis.layers if layer.name in named}}
        self._keep((tuple(sorted(settled.items())), 0.0), analysis)
        return settled

    def _collapse(self, layer_eps: Mapping[str, float], analysis: Analysis, heights: dict[str, np.ndarray],
                  grouping: str, eps: float = 0.0, colorings: Mapping[str, Coloring | Partition] | None = None
                  ) -> Outcome:
        """``analysis`` collapsed (and refit when calibrating), measured."""
        if not self.calibrate:
            model, refits = analysis.collapse(), []
        else:
            model, refits = refit(analysis, self.original, self.fit_batches, ridge=self.ridge,
                                  activations=self.activations)
        outputs = range(len(self.names))
        largests: list[list[float]] = [[] for _ in outputs]
        energies: list[list[float]] = [[] for _ in outputs]
        cosines: dict[int, list[np.ndarray]] = {k: [] for k in self.embeddings}
        classes = []
        for run, reference in zip(run_tensors(model, self.names, self.batches, "compressed"), self.reference):
            for k in outputs:  # one batch at a time: the runs are never held together
                ref = np.asarray(reference[k], dtype=np.float64)
                d = run[k] - ref
                largests[k].append(float(np.max(np.abs(d), initial=0.0)))
                energies[k].append(float(np.mean(d * d)))
                if k in cosines:
                    cosines[k].append(row_cosines(ref, run[k]))
            classes.append(predicted_classes(run, self.label_index))
        max_abs, max_rel, mse = 0.0, 0.0, 0.0
        for k, (variance, scale) in enumerate(zip(self.variance, self.scales)):
            largest = max(largests[k])
            max_abs = max(max_abs, largest)
            max_rel = max(max_rel, largest / scale if scale > 0 else (0.0 if largest == 0 else math.inf))
            mse += float(np.mean(energies[k])) / variance
        predicted = np.concatenate(classes)
        agreement = float(np.mean(predicted == self.classes))
        cosine = min(float(np.mean(np.concatenate(cosines[k]))) for k in self.embeddings)
        accuracy = None if self.labels is None else float(np.mean(predicted == self.labels))
        return Outcome(dict(layer_eps), analysis, heights, model, stats.count_parameters(model), max_abs, mse,
                       accuracy, refits, max_rel=max_rel, agreement=agreement, cosine=cosine,
                       grouping=grouping, eps=eps, colorings=colorings)

    def params(self, layer_eps: Mapping[str, float]) -> int:
        """The parameters of the collapse at ``layer_eps``, without measuring it."""
        return stats.count_parameters(self._merged(layer_eps).collapse())

    def finish(self, outcome: Outcome) -> Outcome:
        """The outcome a search returns: as measured, with the analysis worked out in full (the
        figures a report shows; the collapse is the same)."""
        return replace(outcome, analysis=self._analyze(outcome.layer_eps, outcome.eps, figures=True,
                                                       layer_colorings=outcome.colorings))

    def redo(self, outcome: Outcome) -> Outcome:
        """``outcome``'s collapse (its eps, grouping and colorings, as another evaluator chose
        them) made again on this evaluator's data, refit there when calibrating, and measured
        there, with the analysis worked out in full."""
        analysis = self._analyze(outcome.layer_eps, outcome.eps, figures=True, layer_colorings=outcome.colorings)
        return self._collapse(outcome.layer_eps, analysis, outcome.heights, outcome.grouping, outcome.eps,
                              outcome.colorings)

    def figure(self, outcome: Outcome, kind: TargetKind) -> float:
        """The outcome's figure for a target ``kind``."""
        if kind is TargetKind.PARAMS:
            return outcome.params / self.params_before
        if kind is TargetKind.ERROR:
            return outcome.max_rel
        if kind is TargetKind.AGREEMENT:
            return outcome.agreement
        if kind is TargetKind.COSINE:
            return outcome.cosine
        return self.accuracy_before - outcome.accuracy

    def report(self, outcome: Outcome, kind: TargetKind | str, limit: float) -> TargetReport:
        """The outcome against the target ``kind`` (a TargetKind or its name) at ``limit``."""
        kind = TargetKind(kind)
        return TargetReport(kind, limit, self.figure(outcome, kind), outcome.max_abs,
                            self.accuracy_before, outcome.accuracy, outcome.max_rel, outcome.agreement,
                            outcome.cosine)


class Evaluates(Protocol):
    """What a search asks of the evaluator it is given (:class:`Evaluator`, :class:`HeldOut`,
    :class:`Subsampled`)."""

    params_before: int

    def __call__(self, layer_eps: Mapping[str, float], eps: float = 0.0) -> Outcome: ...

    def probe(self, layer_eps: Mapping[str, float]) -> Outcome: ...

    def params(self, layer_eps: Mapping[str, float]) -> int: ...

    def cut(self, layer_eps: Mapping[str, float], cuts: Mapping[str, Cut]) -> dict[str, float]: ...

    def finish(self, outcome: Outcome) -> Outcome: ...

    def report(self, outcome: Outcome, kind: TargetKind | str, limit: float) -> TargetReport: ...


class HeldOut:
    """An evaluator whose figures are measured on data the refit did not see (cross-fitting): the
    rows are dealt into ``folds`` parts; each part is measured on a collapse refit on the others
    (channels selected from the others too), and the figures pool every part (mse and accuracy
    weighted by the parts' rows, the largest error over all). The grouping with the smallest
    pooled error is kept; :meth:`finish` refits it on all the data and reports the pooled figures.
    For targets on the error or the accuracy of a calibrated collapse, whose in-sample figures
    flatter it; the rows must allow it (:func:`can_deal`). Serves the search (:class:`Evaluates`)
    with an :class:`Evaluator` of the whole data (``whole``: probes, counts, cuts) and one per
    part (``parts``), all sharing the whole's trees and forward passes."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, folds: int,
                 labels: np.ndarray | None = None, **options) -> None:
        self.whole = Evaluator(original, batches, labels=labels, **options)
        parts, part_labels, self.rows = deal_rows(self.whole.batches, labels, folds)
        self.parts = [
            Evaluator(original, [part], labels=part_labels[k], trees=self.whole.trees, scales=self.whole.scales,
                      forwards=self.whole.forwards,
                      fit_batches=[other for j, other in enumerate(parts) if j != k], **options)
            for k, part in enumerate(parts)
        ]
        self.params_before = self.whole.params_before

    def __call__(self, layer_eps: Mapping[str, float], eps: float = 0.0) -> Outcome:
        runs = [part.groupings(layer_eps, eps) for part in self.parts]
        weights = np.asarray(self.rows, dtype=np.float64) / sum(self.rows)
        pooled = []
        for grouping in zip(*runs):
            accuracy = None if grouping[0].accuracy is None else float(weights @ [o.accuracy for o in grouping])
            pooled.append(replace(grouping[0], max_abs=max(o.max_abs for o in grouping),
                                  mse=float(weights @ [o.mse for o in grouping]), accuracy=accuracy,
                                  params=max(o.params for o in grouping), max_rel=max(o.max_rel for o in grouping),
                                  agreement=float(weights @ [o.agreement for o in grouping]),
                                  cosine=float(weights @ [o.cosine for o in grouping])))
        return best_of(pooled)

    def probe(self, layer_eps: Mapping[str, float]) -> Outcome:
        return self.whole.probe(layer_eps)

    def params(self, layer_eps: Mapping[str, float]) -> int:
        return self.whole.params(layer_eps)

    def cut(self, layer_eps: Mapping[str, float], cuts: Mapping[str, Cut]) -> dict[str, float]:
        return self.whole.cut(layer_eps, cuts)

    def finish(self, outcome: Outcome) -> Outcome:
        """The outcome's grouping refit on all the data, with the pooled held-out figures."""
        full = next(o for o in self.whole.groupings(outcome.layer_eps) if o.grouping == outcome.grouping)
        return replace(self.whole.finish(full), max_abs=outcome.max_abs, mse=outcome.mse, accuracy=outcome.accuracy,
                       max_rel=outcome.max_rel, agreement=outcome.agreement, cosine=outcome.cosine)

    def report(self, outcome: Outcome, kind: TargetKind | str, limit: float) -> TargetReport:
        return self.whole.report(outcome, kind, limit)


class Subsampled:
    """An evaluator that searches on a share of the rows and finishes on all of them: for
    calibrated ``params`` targets, whose figure does not depend on the data while each of the
    search's dozens of refits costs in proportion to its rows. The rows are dealt
    (:func:`deal_rows`) into as many parts as give the first about ``rows`` of them (every k-th
    row, spread over the whole data); an :class:`Evaluator` of that part (``search``) probes,
    counts, cuts and measures for the search, and :meth:`finish` refits the outcome it returns
    (its eps, grouping and colorings as chosen) on every row and measures it on every row
    (``whole``, an :class:`Evaluator` of all the data, made then, sharing the search's trees and
    forward passes), so the model returned and its figures are those of all the data."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, rows: int,
                 labels: np.ndarray | None = None, **options) -> None:
        self.original, self.batches, self.labels, self.options = original, list(batches), labels, options
        self.total = sum(common_rows(batch) or 0 for batch in self.batches)
        parts, part_labels, counts = deal_rows(self.batches, labels, max(1, -(-self.total // rows)))
        self.rows = counts[0]
        self.search = Evaluator(original, [parts[0]], labels=part_labels[0], **options)
        self.whole: Evaluator | None = None
        self.params_before = self.search.params_before

    def __call__(self, layer_eps: Mapping[str, float], eps: float = 0.0) -> Outcome:
        return self.search(layer_eps, eps)

    def probe(self, layer_eps: Mapping[str, float]) -> Outcome:
        return self.search.probe(layer_eps)

    def params(self, layer_eps: Mapping[str, float]) -> int:
        return self.search.params(layer_eps)

    def cut(self, layer_eps: Mapping[str, float], cuts: Mapping[str, Cut]) -> dict[str, float]:
        return self.search.cut(layer_eps, cuts)

    def finish(self, outcome: Outcome) -> Outcome:
        """The outcome refit and measured on all the rows (see the class)."""
        self.whole = Evaluator(self.original, self.batches, labels=self.labels, trees=self.search.trees,
                               forwards=self.search.forwards, **self.options)
        return self.whole.redo(outcome)

    def report(self, outcome: Outcome, kind: TargetKind | str, limit: float) -> TargetReport:
        """Against all the rows once finished, against the searched ones before."""
        return (self.search if self.whole is None else self.whole).report(outcome, kind, limit)


def can_deal(batches: Sequence[Batch], folds: int) -> bool:
    """Whether :func:`deal_rows` applies: every batch has one first axis for all its inputs, and
    there are at least two rows per part."""
    lengths = [common_rows(batch) for batch in batches]
    return None not in lengths and sum(lengths) >= 2 * folds


def deal_rows(batches: Sequence[Batch], labels: np.ndarray | None, folds: int
              ) -> tuple[list[Batch], list[np.ndarray | None], list[int]]:
    """The batches' rows dealt into ``folds`` parts, one batch each (row r of all the rows in order
    to part r mod folds), the labels dealt alike, and each part's rows (see :func:`can_deal`)."""
    dealt: list[list[Batch]] = [[] for _ in range(folds)]
    offset = 0
    for batch in batches:
        length = common_rows(batch)
        for k in range(folds):
            start = (k - offset) % folds
            if start < length:
                dealt[k].append({name: value[start::folds] for name, value in batch.items()})
        offset += length
    rows = [len(range(k, offset, folds)) for k in range(folds)]
    part_labels = [None if labels is None else np.asarray(labels).reshape(-1)[k::folds] for k in range(folds)]
    return [concatenated(pieces) for pieces in dealt], part_labels, rows


#: Called with each layer measured merged alone (an allocation's probe, a greedy step's
#: candidate): the layer, its place among the layers measured in that pass, their count, and
#: the outcome (None: no step of that layer meets the target). A search's first pass measures
#: every layer; this is how it shows it is moving.
OnProbe = Callable[[str, int, int, Outcome | None], None]


def search(evaluate: Evaluates, kind: TargetKind | str, limit: float,
           on_step: Callable[[Outcome], None] | None = None, on_probe: OnProbe | None = None) -> Outcome:
    """The per-layer eps meeting target ``kind`` at ``limit``: by allocation for ``params``
    (:func:`allocate`), by the greedy for the other kinds (:func:`greedy`). ``on_step`` is called
    with the outcome of every step taken, ``on_probe`` with every layer measured alone."""
    if TargetKind(kind) is TargetKind.PARAMS:
        return allocate(evaluate, limit, on_step, on_probe)
    return greedy(evaluate, kind, limit, on_step, on_probe)


def greedy(evaluate: Evaluates, kind: TargetKind | str, limit: float,
           on_step: Callable[[Outcome], None] | None = None, on_probe: OnProbe | None = None) -> Outcome:
    """The per-layer eps that merge the most while the outcome meets the fidelity target
    ``kind`` at ``limit`` (an error, accuracy drop, agreement or cosine), found by the greedy of
    the module docstring; the outcome of eps 0 everywhere when no step qualifies. ``on_step`` is
    called with the outcome of every step taken, ``on_probe`` with every layer's step measured.

    The greedy is lazy (as in CELF): a layer's step is measured again only while its score from
    an earlier measurement could still beat the best score measured against the current model,
    since a step rarely becomes cheaper once other layers have merged. A step then costs a few
    evaluations instead of one per layer; the first step measures every layer. A step merges
    ``STEP_FRACTION`` of a layer's rows, or one row when that no longer fits."""
    current = evaluate({})
    layers = [layer.name for layer in current.analysis.layers
              if layer.frozen is None or layer.frozen.startswith("partly")]
    widths = {layer.name: layer.width for layer in current.analysis.layers}

    def attempt(name: str, more: int) -> Outcome | None:
        """Layer ``name`` with ``more`` merges than in ``current``, the layers stepped before at
        the merges they make there (their merge distances move when an earlier layer merges),
        measured; None when that removes no parameter."""
        counts = {layer: merges_at(current.heights[layer], layer_eps) for layer, layer_eps in current.layer_eps.items()
                  if layer in current.heights}
        done = merges_at(current.heights[name], current.layer_eps.get(name, 0.0))
        cuts = {layer: _cut(current.heights[layer], count) for layer, count in {**counts, name: done + more}.items()}
        outcome = evaluate(evaluate.cut(current.layer_eps, cuts))
        return outcome if outcome.params < current.params else None

    def measure(name: str) -> tuple[float, Outcome] | None:
        """Layer ``name``'s step against ``current`` (its score and outcome), None when none
        fits; a layer with no merge left leaves the search."""
        for more in dict.fromkeys((max(1, math.ceil(widths[name] * STEP_FRACTION)), 1)):
            heights = current.heights.get(name)
            left = 0 if heights is None else len(heights) - merges_at(heights, current.layer_eps.get(name, 0.0))
            if left == 0:
                if more == 1:
                    layers.remove(name)  # no merge left in this layer
                continue
            outcome = attempt(name, min(more, left))
            if outcome is None:  # merging here removes nothing (a site its channels are tied to)
                continue
            if evaluate.report(outcome, kind, limit).met:
                return (outcome.mse - current.mse) / (current.params - outcome.params), outcome
        return None

    scores: dict[str, float] = {}  # each layer's score when last measured (lower is better)
    while True:
        best: tuple[float, Outcome] | None = None
        candidates = sorted(layers, key=lambda n: scores.get(n, -math.inf))
        for index, name in enumerate(candidates):
            if best is not None and scores.get(name, -math.inf) >= best[0]:
                break  # no layer left whose last score could beat the best one measured now
            measured = measure(name)
            scores[name] = math.inf if measured is None else measured[0]
            if on_probe is not None:
                on_probe(name, index + 1, len(candidates), None if measured is None else measured[1])
            if measured is not None and (best is None or measured[0] < best[0]):
                best = measured
        if best is None:
            break
        current = best[1]
        if on_step is not None:
            on_step(current)
    return evaluate.finish(current)


def allocate(evaluate: Evaluates, keep: float, on_step: Callable[[Outcome], None] | None = None,
             on_probe: OnProbe | None = None) -> Outcome:
    """The per-layer eps keeping at most ``keep`` of the parameters with the least output
    error, found by allocation; ``on_step`` is called with each allocation measured and each
    trade of the exchange phase that follows, ``on_probe`` with each probe.

    Each layer's added output error is modelled from probes, merges of that layer alone measured
    on the data (:class:`Curve`); the merges all layers should make at a price ``lam`` (output
    error per parameter removed) are those whose modelled marginal cost is at most ``lam``, and
    the price is bisected on parameter counts alone (no model is run) to the smallest that
    reaches the goal. A layer never merges beyond twice its deepest probe (the model is not
    trusted further); a layer the allocation takes to that limit is probed there and the
    allocation repeated, at most ``ALLOCATION_ROUNDS`` times. A search costs about one probe per
    layer and round plus a few dozen analyses, however far the target is: the greedy measures
    every layer again at every few steps."""
    current = evaluate({})
    goal = keep * evaluate.params_before
    if current.params <= goal:
        return evaluate.finish(current)
    units = _units(current)
    curves = _probe(evaluate, current, _probe_depths(current, goal / current.params, units), {}, units, on_probe)
    chosen: Outcome | None = None
    for _ in range(ALLOCATION_ROUNDS):
        if not curves:
            break
        allocated = _allocate(evaluate, curves, current, goal)
        if chosen is None or _better(allocated, chosen, goal):
            chosen = allocated
            if on_step is not None:
                on_step(chosen)
        limited = {name: curve.reach for name, curve in curves.items()
                   if curve.reach < len(curve.heights) and name in allocated.heights
                   and merges_at(allocated.heights[name], allocated.layer_eps.get(name, 0.0)) >= curve.reach}
        if not limited:
            break
        curves = _probe(evaluate, current, limited, curves, units, on_probe)
    if chosen is None:
        return evaluate.finish(current)
    if chosen.params <= goal:
        chosen = _exchange(evaluate, chosen, curves, goal, on_step)
    return evaluate.finish(chosen)


#: How many times the allocation is repeated with deeper probes (see :func:`allocate`).
ALLOCATION_ROUNDS = 4

#: The bisection of the price stops when its bounds are within this ratio of each other, or
#: after ``PRICE_STEPS`` steps.
PRICE_RATIO = 1.01
PRICE_STEPS = 40

#: The power of the sum of merge distances a layer's error grows with, before a second probe
#: fits it (:class:`Curve`): faster than the distances, since later merges join larger clusters.
DEFAULT_POWER = 2.0

#: The powers a layer's fitted curve is held between.
POWER_RANGE = (1.0, 4.0)


@dataclass(frozen=True)
class Curve:
    """A layer's modelled cost of merging: beyond the ``done`` merges of the search's start, its
    next ``k`` merges (at the distances ``heights[done:done + k]``) add ``scale * H(k) ** power``
    output error, ``H(k)`` the sum of those distances, and remove ``per_merge`` parameters each.
    ``probes`` are the measured points (merges, added error) the model was fitted to; ``reach``
    is as far as it is trusted: twice the deepest probe. ``score`` is the error per parameter
    of the deepest probe (which the exchange phase ranks layers by)."""

    heights: np.ndarray
    done: int
    probes: tuple[tuple[int, float], ...]
    per_merge: float
    floor: float  # the slope given a layer whose probes added no error
    partners: tuple[str, ...] = ()  # the layers tied to this one (:func:`_units`), at its eps

    @property
    def reach(self) -> int:
        return min(len(self.heights), self.done + 2 * max(merges for merges, _ in self.probes))

    def distance(self, merges: int) -> float:
        return float(np.sum(self.heights[self.done:self.done + merges]))

    @cached_property
    def fit(self) -> tuple[float, float]:
        """(scale, power) through the probes: least squares on a log scale, the power held in
        ``POWER_RANGE``; ``DEFAULT_POWER`` and the deepest probe with fewer than two points."""
        points = [(math.log(self.distance(m)), math.log(added)) for m, added in self.probes
                  if added > 0 and self.distance(m) > 0]
        power = DEFAULT_POWER
        if len(points) >= 2:
            x, y = np.array(points).T
            if np.ptp(x) > 0:
                power = float(np.clip(np.polyfit(x, y, 1)[0], *POWER_RANGE))
        if not points:
            return self.floor, power
        deepest = max(points)
        return max(math.exp(deepest[1] - power * deepest[0]), self.floor), power

    @property
    def score(self) -> float:
        merges, added = max(self.probes)
        return added / (merges * self.per_merge)

    @cached_property
    def marginal(self) -> np.ndarray:
        """The modelled error per parameter of each further merge within reach (non-decreasing;
        worked out once per curve: a price bisection asks every curve at every step)."""
        scale, power = self.fit
        total = np.cumsum(self.heights[self.done:self.reach])
        added = scale * np.diff(total ** power, prepend=0.0)
        return np.maximum.accumulate(added / self.per_merge)

    def merges(self, price: float) -> int:
        """The layer's merges at ``price``: every further merge within reach whose marginal error
        per parameter is at most ``price``."""
        return self.done + int(np.searchsorted(self.marginal, price, side="right"))


def _units(current: Outcome) -> dict[str, tuple[str, ...]]:
    """The searchable layers whose output channels narrow together (one shrink group: a residual
    Add, a gating Mul, a Concat tie them), by the first of them: they share one eps, since one
    of them merged alone merges nothing its partners do not."""
    searchable = [layer for layer in current.analysis.layers if layer.name in current.heights
                  and (layer.frozen is None or layer.frozen.startswith("partly"))]
    group_of = {name: index for index, group in enumerate(current.analysis.groups) for name in group.members}
    units: dict[object, list[str]] = {}
    for layer in searchable:
        units.setdefault(group_of.get(layer.tensor, layer.name), []).append(layer.name)
    return {names[0]: tuple(names[1:]) for names in units.values()}


def _probe_depths(current: Outcome, keep: float, units: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """The merges each unit's first layer is first probed at: as many as a uniform reach of
    ``keep`` (a fraction of ``current``'s parameters: rows kept about its square root) makes."""
    ratio = 1.0 - math.sqrt(min(max(keep, 0.0), 1.0))
    depths = {}
    for layer in current.analysis.layers:
        heights = current.heights.get(layer.name)
        if heights is None or layer.name not in units:
            continue
        done = merges_at(heights, current.layer_eps.get(layer.name, 0.0))
        depths[layer.name] = done + min(len(heights) - done, max(1, round(layer.width * ratio)))
    return {name: merges for name, merges in depths.items() if merges > merges_at(current.heights[name], 0.0)}


def _probe(evaluate: Evaluates, current: Outcome, depths: Mapping[str, int], curves: Mapping[str, Curve],
           units: Mapping[str, tuple[str, ...]], on_probe: OnProbe | None = None) -> dict[str, Curve]:
    """``curves`` with a probe of each layer in ``depths`` at that many merges (of its rows in
    ``current``) added: its merge alone measured (``Evaluator.probe``). A layer whose first
    probe removes no parameter (its merges blocked by a site its channels are tied to, such as a
    depthwise Conv clustering its own kernels at the same eps) is probed merged whole instead,
    and left out when that removes nothing either. A probe that added no error gives a slope of
    a thousandth of the smallest measured one: cheap, not free. ``on_probe`` sees each probe."""
    updated = dict(curves)
    for index, (name, merges) in enumerate(depths.items()):
        heights = current.heights[name]
        done = merges_at(heights, current.layer_eps.get(name, 0.0))
        outcome = evaluate.probe(_unit_eps(current.layer_eps, name, units[name], cut_eps(heights, merges)))
        if name not in updated and outcome.params >= current.params and merges < len(heights):
            merges = len(heights)  # merges blocked by the sites its channels are tied to: merge it whole
            outcome = evaluate.probe(_unit_eps(current.layer_eps, name, units[name], cut_eps(heights, merges)))
        if on_probe is not None:
            on_probe(name, index + 1, len(depths), outcome)
        removed = current.params - outcome.params
        point = (merges - done, max(outcome.mse - current.mse, 0.0))
        if name in updated:
            updated[name] = replace(updated[name], probes=(*updated[name].probes, point))
        elif removed > 0:
            updated[name] = Curve(heights, done, (point,), removed / point[0], 0.0, units[name])
    slopes = [added / curve.distance(m) ** DEFAULT_POWER for curve in updated.values()
              for m, added in curve.probes if added > 0 and curve.distance(m) > 0]
    floor = 1e-3 * min(slopes, default=1.0)
    return {name: replace(curve, floor=floor) for name, curve in updated.items()}


def _allocation(evaluate: Evaluates, curves: Mapping[str, Curve], current: Outcome, price: float
                ) -> dict[str, float]:
    """Every layer's eps making its merges at ``price`` (error per parameter), each cut from
    its own merge distances as one analysis reaches it (they move when the layers before it
    merge: :meth:`Evaluator.cut`)."""
    return evaluate.cut(current.layer_eps, {name: _cut(curve.heights, curve.merges(price), curve.partners)
                                            for name, curve in curves.items()})


def _cut(heights: np.ndarray, merges: int, partners: tuple[str, ...] = ()) -> Cut:
    """A layer cut to ``merges`` merges, at the eps ``heights`` (its merge distances in the
    outcome the search stands on) give for a layer that cannot settle it (``Cut.eps``)."""
    return Cut(merges, cut_eps(heights, merges), partners)


def _unit_eps(layer_eps: Mapping[str, float], name: str, partners: Sequence[str], eps: float) -> dict[str, float]:
    """``layer_eps`` with layer ``name`` and its tied partners at ``eps``."""
    return {**layer_eps, name: eps, **dict.fromkeys(partners, eps)}


def _allocate(evaluate: Evaluates, curves: Mapping[str, Curve], current: Outcome, goal: float) -> Outcome:
    """The allocation of ``curves`` at the smallest price whose collapse keeps at most ``goal``
    parameters, measured. The price is first bisected on the parameters the curves predict
    (each merge removes its layer's ``per_merge``; no analysis), and the prediction's miss,
    counted on the allocation's collapse, corrects the goal it is bisected to, up to
    ``COUNT_CORRECTIONS`` times; unless a count lands within ``COUNT_SLACK`` below the goal,
    the price is then bisected on counted parameters (one analysis or a few per step) between
    the prices counted so far. The largest price's allocation when none is within the goal."""
    low = min(float(curve.marginal[0]) for curve in curves.values()) / 2
    high = max(float(curve.marginal[-1]) for curve in curves.values()) * 2
    allocations: dict[float, dict[str, float]] = {}  # by price: the bisection's last one is measured
    counts: dict[float, int] = {}

    def allocation(price: float) -> dict[str, float]:
        if price not in allocations:
            allocations[price] = _allocation(evaluate, curves, current, price)
        return allocations[price]

    def counted(price: float) -> int:
        if price not in counts:
            counts[price] = evaluate.params(allocation(price))
        return counts[price]

    def predicted(price: float) -> float:
        return current.params - sum(curve.per_merge * (curve.merges(price) - curve.done) for curve in curves.values())

    aim = goal
    for _ in range(COUNT_CORRECTIONS):
        price = _bisect(low, high, lambda p, aim=aim: predicted(p) <= aim)
        price = high if price is None else price
        if goal - COUNT_SLACK * evaluate.params_before <= counted(price) <= goal:
            return evaluate(allocation(price))
        aim -= counted(price) - predicted(price)
    within = [price for price, count in counts.items() if count <= goal]
    over = [price for price, count in counts.items() if count > goal and price < min(within, default=high)]
    found = _bisect(max(over, default=low), min(within, default=high), lambda p: counted(p) <= goal)
    return evaluate(allocation(high if found is None else found))


#: How many times :func:`_allocate` corrects the parameter count it bisects the price to ...
COUNT_CORRECTIONS = 3
#: ... stopping once the counted parameters are within the goal by at most this fraction of the
#: model's.
COUNT_SLACK = 0.005


def _better(a: Outcome, b: Outcome, goal: float) -> bool:
    """Whether ``a`` serves a parameter goal better than ``b``: within it with the smaller output
    error, or closer to it while both are above it."""
    if (a.params <= goal) != (b.params <= goal):
        return a.params <= goal
    return a.mse < b.mse if a.params <= goal else a.params < b.params


def _bisect(low: float, high: float, accepts: Callable[[float], bool]) -> float | None:
    """On a log scale between ``low`` and ``high``: the smallest price ``accepts`` takes,
    assuming it takes every price above it; None when it does not take ``high``."""
    if not accepts(high):
        return None
    good, bad = high, low
    for _ in range(PRICE_STEPS):
        if max(good, bad) / min(good, bad) <= PRICE_RATIO:
            break
        middle = math.sqrt(good * bad)
        if accepts(middle):
            good = middle
        else:
            bad = middle
    return good


def _exchange(evaluate: Evaluates, current: Outcome, curves: Mapping[str, Curve], goal: float,
              on_step: Callable[[Outcome], None] | None, rounds: int = 8) -> Outcome:
    """Trade merges between layers (with their tied partners) at the parameter budget ``goal``:
    merge a step more in one (``STEP_FRACTION`` of its rows), undo as many merges of another as
    the budget allows (:func:`_trade`), and keep the trade when the output error falls; repeat
    while any trade helps. Trades go from the ``EXCHANGE_LAYERS`` layers whose deepest probe was
    most costly (``Curve.score``, error per parameter) to those whose probe was cheapest, so a
    round measures at most their product, however many layers the model has. ``on_step`` is
    called with every trade kept."""
    widths = {layer.name: layer.width for layer in current.analysis.layers}
    scores = {name: curve.score for name, curve in curves.items()}
    ranked = sorted((name for name in curves if math.isfinite(scores[name])), key=lambda n: scores[n])
    cheapest = ranked[:EXCHANGE_LAYERS]
    for _ in range(rounds):
        improved = False
        counts = _merge_counts(current, curves)
        costly = sorted((name for name, count in counts.items() if count > 0),
                        key=lambda n: scores[n], reverse=True)[:EXCHANGE_LAYERS]
        for more_in in cheapest:
            for fewer_in in costly:
                if more_in == fewer_in or more_in not in counts or counts[more_in] >= len(current.heights[more_in]):
                    continue
                step = min(max(1, math.ceil(widths[more_in] * STEP_FRACTION)),
                           len(current.heights[more_in]) - counts[more_in])
                candidate = _trade(evaluate, current, curves, (more_in, step), fewer_in, goal)
                if candidate is not None and candidate.params <= goal and candidate.mse < current.mse:
                    current, improved = candidate, True
                    if on_step is not None:
                        on_step(current)
        if not improved:
            break
    return current


def _merge_counts(current: Outcome, curves: Mapping[str, Curve]) -> dict[str, int]:
    """The merges each layer of ``curves`` makes in ``current``."""
    return {name: merges_at(current.heights[name], current.layer_eps.get(name, 0.0))
            for name in curves if name in current.heights}


#: How many parameter counts :func:`_trade` makes at most before it gives a trade up.
TRADE_COUNTS = 3


def _trade(evaluate: Evaluates, current: Outcome, curves: Mapping[str, Curve], more: tuple[str, int],
           fewer_in: str, goal: float) -> Outcome | None:
    """The outcome of ``more`` (a layer and the merges it makes beyond ``current``'s) with as
    many merges of ``fewer_in`` undone as keep the parameters within ``goal``, every other layer
    of ``curves`` making its merges of ``current`` (:meth:`Evaluator.cut`), measured; None when
    none can be. The number undone is predicted from the layers' ``per_merge`` and counted (one
    analysis each, fewer undone while over the goal, at most ``TRADE_COUNTS`` counts)."""
    more_in, step = more
    counts = _merge_counts(current, curves)
    undo = counts[fewer_in]
    room = goal - current.params + step * curves[more_in].per_merge
    count = min(undo, math.floor(room / curves[fewer_in].per_merge))
    for _ in range(TRADE_COUNTS):
        if count < 1:
            return None
        merges = {**counts, more_in: counts[more_in] + step, fewer_in: undo - count}
        cuts = {name: _cut(current.heights[name], merges[name], curves[name].partners) for name in merges}
        layer_eps = evaluate.cut(current.layer_eps, cuts)
        if evaluate.params(layer_eps) <= goal:  # counted, not measured
            return evaluate(layer_eps)
        count -= max(1, count // 4)
    return None


def sweep(evaluate: Evaluates, eps_values: Sequence[float], on_point: Callable[[SweepPoint], None] | None = None
          ) -> list[SweepPoint]:
    """Parameters kept and output error (and accuracy) at each uniform eps; ``rms`` is the root
    of the mean squared output error relative to the outputs' variance. ``on_point`` is called
    with each point as it is measured."""
    points = []
    for eps in eps_values:
        outcome = evaluate({}, float(eps))
        points.append(SweepPoint(float(eps), outcome.params, outcome.params / evaluate.params_before,
                                 outcome.max_abs, math.sqrt(outcome.mse), outcome.accuracy))
        if on_point is not None:
            on_point(points[-1])
    return points
