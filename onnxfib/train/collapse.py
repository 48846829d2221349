"""Collapse a torch model to its fibration (or cover) base with the core, and the paper's
collapse–retrain loop (Algorithm 1, Sec. 11.4): per-layer thresholds from a greedy search,
raised by a stated factor at each round, retraining to convergence with early stopping on a
validation split, stopping when the validation loss cannot be recovered.

Two ways to read a model's layers (:class:`Layers`): :class:`OnnxLayers` exports it and asks
the core's analysis (any model the core reads: MLPs, CNNs with BatchNorm), and
:class:`FeedForwardLayers` reads the feed-forward blocks of ``nn.TransformerEncoderLayer``
modules in process (the residual stream and attention are left as they are). Both cluster with
the core's :class:`onnxfib.coloring.Tolerance` and collapse with its Eq. 10 arithmetic
(:meth:`onnxfib.rules.Plan.fit_base`, :meth:`onnxfib.partition.Partition.reduce`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..coloring import Coloring, Tolerance, TreeCache
from ..errors import UsageError
from ..rules import Plan
from .adapter import CHANNEL_TYPES, LAYER_TYPES, TorchAnalysis, initializer_name, parameter_count
from .surgery import relative

_WIDTH_ATTRS = {nn.Linear: ("out_features", "in_features"), nn.Conv1d: ("out_channels", "in_channels"),
                nn.Conv2d: ("out_channels", "in_channels")}
#: The largest threshold: cosine distances lie in [0, 2].
MAX_EPS = 1.999


def collapse_to_base(model: nn.Module, example: torch.Tensor, *, eps: float = 0.0,
                     symmetry: str = "fiber", layer_eps: Mapping[str, float] | None = None,
                     trees: TreeCache | None = None) -> nn.Module:
    """A narrower copy of ``model``: the core's collapse (Eq. 10 with the scale rule) of its
    in-memory export at ``eps`` (``layer_eps`` per layer site), written back into Linear, Conv
    and BatchNorm modules by parameter name. At eps = 0 it computes the same function."""
    analysis = TorchAnalysis(model, example, eps=eps, symmetry=symmetry, layer_eps=layer_eps, trees=trees)
    collapsed = analysis.analysis.collapse()
    stored = {t.name: numpy_helper.to_array(t) for t in collapsed.graph.initializer}
    stored.update({n.output[0]: numpy_helper.to_array(a.t) for n in collapsed.graph.node
                   if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    # a rewritten constant that other nodes shared was renamed: the renamed copy is the new value
    values = {initializer_name(k): v for k, v in sorted(stored.items(), key=lambda kv: kv[0] != initializer_name(kv[0]))}
    narrow = copy.deepcopy(model)
    modules = dict(narrow.named_modules())
    with torch.no_grad():
        for name, tensor in [*narrow.named_parameters(), *narrow.named_buffers()]:
            if name not in values or tuple(values[name].shape) == tuple(tensor.shape):
                if name in values:
                    tensor.copy_(torch.tensor(np.array(values[name])))
                continue
            owner, _, attr = name.rpartition(".")
            module = modules[owner]
            if not isinstance(module, LAYER_TYPES + CHANNEL_TYPES):
                raise UsageError(f"cannot narrow {type(module).__name__} '{owner}'")
            new = torch.tensor(np.array(values[name]), dtype=tensor.dtype)
            setattr(module, attr, nn.Parameter(new) if isinstance(tensor, nn.Parameter) else new)
    for module in modules.values():
        _update_widths(module)
    return narrow


def _update_widths(module: nn.Module) -> None:
    """Make a module's width attributes agree with its (narrowed) tensors."""
    if isinstance(module, LAYER_TYPES):
        out_attr, in_attr = _WIDTH_ATTRS[type(module)]
        setattr(module, out_attr, int(module.weight.shape[0]))
        setattr(module, in_attr, int(module.weight.shape[1]))
    elif isinstance(module, CHANNEL_TYPES):
        module.num_features = int(module.running_mean.shape[0])


class Layers(Protocol):
    """The collapsible layers of a model, by name: each one's merge distances (sorted, one per
    merge: ``k`` merges at any eps in ``[h[k-1], h[k])``) and the collapse at per-layer eps
    (layers not named: exact, eps 0)."""

    def heights(self, model: nn.Module, layer_eps: Mapping[str, float]) -> dict[str, np.ndarray]: ...

    def collapse(self, model: nn.Module, layer_eps: Mapping[str, float]) -> nn.Module: ...


@dataclass
class OnnxLayers:
    """Layers as the core's analysis of the in-memory export sees them (layer sites by name);
    ``example`` is one input batch."""

    example: torch.Tensor
    symmetry: str = "fiber"
    trees: TreeCache = field(default_factory=TreeCache)

    def heights(self, model: nn.Module, layer_eps: Mapping[str, float]) -> dict[str, np.ndarray]:
        analysis = TorchAnalysis(model, self.example, eps=0.0, symmetry=self.symmetry, layer_eps=layer_eps,
                                 trees=self.trees, record_heights=True)
        return dict(analysis.analysis.heights)

    def collapse(self, model: nn.Module, layer_eps: Mapping[str, float]) -> nn.Module:
        return collapse_to_base(model, self.example, symmetry=self.symmetry, layer_eps=layer_eps, trees=self.trees)


@dataclass
class FeedForwardLayers:
    """The feed-forward blocks of every ``nn.TransformerEncoderLayer`` in a model, named by
    module: the hidden units between ``linear1`` and ``linear2``. Their input (the residual
    stream after LayerNorm) is not collapsed, so a unit's signature is its ``linear1`` row and
    bias; units merge under the scale rule where the activation is ReLU (positively
    homogeneous), with equal scales otherwise (``Tolerance.unit``). The residual stream and the
    attention heads keep their widths."""

    trees: TreeCache = field(default_factory=TreeCache)

    @staticmethod
    def blocks(model: nn.Module) -> dict[str, nn.TransformerEncoderLayer]:
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)}
        if not found:
            raise UsageError("the model has no nn.TransformerEncoderLayer")
        return found

    def _coloring(self, block: nn.TransformerEncoderLayer, eps: float,
                  heights: list[np.ndarray] | None = None) -> Coloring:
        weight = block.linear1.weight.detach().double().cpu().numpy()
        bias = block.linear1.bias
        signature = weight if bias is None else np.hstack([weight, bias.detach().double().cpu().numpy()[:, None]])
        tol = Tolerance(float(eps), heights, trees=self.trees)
        coloring = tol.cluster(signature)
        relu = block.activation is F.relu or isinstance(block.activation, nn.ReLU)
        return coloring if relu else tol.unit(coloring)

    def heights(self, model: nn.Module, layer_eps: Mapping[str, float]) -> dict[str, np.ndarray]:
        out = {}
        for name, block in self.blocks(model).items():
            recorded: list[np.ndarray] = []
            self._coloring(block, layer_eps.get(name, 0.0), recorded)
            out[name] = recorded[-1] if recorded else np.zeros(0)
        return out

    def collapse(self, model: nn.Module, layer_eps: Mapping[str, float]) -> nn.Module:
        """A copy with each block's colors folded (Eq. 10 with the scale rule: ``linear1`` rows
        and bias fitted by :meth:`Plan.fit_base`, ``linear2`` columns summed under the relative
        scales); at eps 0 the same function."""
        unknown = sorted(set(layer_eps) - set(self.blocks(model)))
        if unknown:
            raise UsageError(f"per-layer eps names unknown block(s) {unknown}; the blocks are {sorted(self.blocks(model))}")
        narrow = copy.deepcopy(model)
        with torch.no_grad():
            for name, block in self.blocks(narrow).items():
                coloring = self._coloring(block, layer_eps.get(name, 0.0))
                partition = coloring.partition
                if partition.is_discrete:
                    continue
                scales = relative(coloring.scales, partition)
                plan = Plan(partition, scales)
                first, second = block.linear1, block.linear2
                like = first.weight
                first.weight = nn.Parameter(_tensor(plan.fit_base(first.weight.double().numpy(), 0), like))
                if first.bias is not None:
                    first.bias = nn.Parameter(_tensor(plan.fit_base(first.bias.double().numpy(), 0), like))
                columns = second.weight.double().numpy() * scales[None, :]
                second.weight = nn.Parameter(_tensor(partition.reduce(columns, 1), like))
                _update_widths(first)
                _update_widths(second)
        return narrow


def _tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(values), dtype=like.dtype, device=like.device)


def greedy_thresholds(model: nn.Module, layers: Layers, validate: Callable[[nn.Module], float], *,
                      slack: float = 0.0) -> dict[str, float]:
    """Per-layer optimal thresholds (Sec. 11.4.1): layer by layer, in order, with the earlier
    layers collapsed at their thresholds, the largest eps whose collapse keeps ``validate``
    within ``(1 + slack)`` of the model's own loss, found by bisection over the layer's distinct
    merge distances (assuming the loss does not fall as merges are added). A layer's threshold
    is the supremum of the eps it accepts: just below its first rejected merge distance (the
    largest distance when every merge is accepted), so raising it by any factor merges more."""
    limit = (1.0 + slack) * float(validate(model))
    chosen: dict[str, float] = {}
    for name in layers.heights(model, {}):
        heights = layers.heights(model, chosen)[name]
        distinct = np.unique(heights)
        low, high = -1, len(distinct) - 1  # index of the largest accepted distance; -1: none
        while low < high:
            middle = (low + high + 1) // 2
            trial = {**chosen, name: float(distinct[middle])}
            if validate(layers.collapse(model, trial)) <= limit:
                low = middle
            else:
                high = middle - 1
        if not len(distinct):
            chosen[name] = 0.0
        elif low == len(distinct) - 1:
            chosen[name] = float(distinct[-1])
        else:
            chosen[name] = float(np.nextafter(distinct[low + 1], 0.0))
    return chosen


@dataclass(frozen=True)
class Round:
    """One collapse–retrain round: the raised thresholds, the collapsed model's size and
    validation loss right after the collapse and after retraining, and whether it was kept."""

    thresholds: dict[str, float]
    params: int
    loss_collapsed: float
    loss_retrained: float
    retrain_steps: int
    accepted: bool


@dataclass
class CollapseRetrainResult:
    """The last accepted model, the reference (trained) validation loss, every round tried,
    and why the loop stopped."""

    model: nn.Module
    params_before: int
    loss_before: float
    rounds: list[Round] = field(default_factory=list)
    stopped: str = ""


def collapse_retrain(model: nn.Module, *, layers: Layers, validate: Callable[[nn.Module], float],
                     retrain: Callable[[nn.Module], int], tolerance: float = 0.05, raise_by: float = 0.05,
                     slack: float = 0.0, max_rounds: int = 50) -> CollapseRetrainResult:
    """Algorithm 1 on a trained ``model`` (not modified): compute the greedy thresholds
    (:func:`greedy_thresholds`), then while the validation loss stays within ``(1 + tolerance)``
    of the trained model's: raise every threshold by ``raise_by`` (5%: the paper's best),
    collapse, ``retrain`` in place to convergence (early stopping on the validation split, see
    :class:`EarlyStopping`; it returns the steps taken), measure, and recompute the thresholds.
    Stops at the first round beyond the tolerance (its model is discarded), when a collapse
    removes nothing, or after ``max_rounds``. ``validate`` must never read the test split."""
    if tolerance < 0 or raise_by <= 0 or slack < 0:
        raise UsageError(f"tolerance and slack must be non-negative and raise_by positive, got {tolerance}, "
                         f"{raise_by}, {slack}")
    if max_rounds < 1:
        raise UsageError(f"max_rounds must be at least 1, got {max_rounds}")
    loss = float(validate(model))
    result = CollapseRetrainResult(model, parameter_count(model), loss)
    thresholds = greedy_thresholds(model, layers, validate, slack=slack)
    while True:
        if len(result.rounds) == max_rounds:
            result.stopped = f"{max_rounds} rounds"
            break
        raised = {name: min(eps * (1.0 + raise_by), MAX_EPS) for name, eps in thresholds.items()}
        candidate = layers.collapse(result.model, raised)
        params = parameter_count(candidate)
        if params >= parameter_count(result.model):
            result.stopped = "nothing left to merge"
            break
        collapsed = float(validate(candidate))
        steps = int(retrain(candidate))
        retrained = float(validate(candidate))
        accepted = retrained <= (1.0 + tolerance) * loss
        result.rounds.append(Round(raised, params, collapsed, retrained, steps, accepted))
        if not accepted:
            result.stopped = "validation loss not recovered"
            break
        result.model = candidate
        thresholds = greedy_thresholds(candidate, layers, validate, slack=slack)
    return result


@dataclass
class EarlyStopping:
    """Retrain to convergence (the ``retrain`` of :func:`collapse_retrain`): a fresh optimizer
    from ``optimizer``, one ``step(model, optimizer)`` per training batch, the validation loss
    every ``every`` steps, stop after ``patience`` checks without a new best (or at
    ``max_steps``), and restore the best weights. Returns the steps taken."""

    step: Callable[[nn.Module, torch.optim.Optimizer], None]
    validate: Callable[[nn.Module], float]
    optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
    every: int = 50
    patience: int = 3
    max_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1 or self.max_steps < 1:
            raise UsageError("every, patience and max_steps must be at least 1")

    def __call__(self, model: nn.Module) -> int:
        optimizer = self.optimizer(model.parameters())
        best, best_state, waited, steps = float(self.validate(model)), copy.deepcopy(model.state_dict()), 0, 0
        while steps < self.max_steps and waited < self.patience:
            model.train()
            for _ in range(min(self.every, self.max_steps - steps)):
                self.step(model, optimizer)
                steps += 1
            loss = float(self.validate(model))
            if loss < best:
                best, best_state, waited = loss, copy.deepcopy(model.state_dict()), 0
            else:
                waited += 1
        model.load_state_dict(best_state)
        model.eval()
        return steps


__all__ = ["CollapseRetrainResult", "EarlyStopping", "FeedForwardLayers", "Layers", "OnnxLayers", "Round",
           "collapse_retrain", "collapse_to_base", "greedy_thresholds"]
