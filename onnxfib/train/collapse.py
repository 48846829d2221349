"""Collapse a torch model to its fibration (or cover) base with the core, and the paper's
collapse–retrain loop (Algorithm 1): collapse at rising thresholds, retrain briefly, stop when
the loss rises beyond a tolerance."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import UsageError
from .adapter import CHANNEL_TYPES, LAYER_TYPES, TorchAnalysis, initializer_name, parameter_count

_WIDTH_ATTRS = {nn.Linear: ("out_features", "in_features"), nn.Conv1d: ("out_channels", "in_channels"),
                nn.Conv2d: ("out_channels", "in_channels")}


def collapse_to_base(model: nn.Module, example: torch.Tensor, *, eps: float = 0.0,
                     symmetry: str = "fiber") -> nn.Module:
    """A narrower copy of ``model``: the core's collapse (Eq. 10 with the scale rule) of its
    in-memory export, written back into Linear, Conv and BatchNorm modules by parameter name.
    At eps = 0 it computes the same function."""
    analysis = TorchAnalysis(model, example, eps=eps, symmetry=symmetry)
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


@dataclass(frozen=True)
class Round:
    """One collapse–retrain round."""

    eps: float
    params: int
    loss_collapsed: float  # right after the collapse
    loss_retrained: float  # after the brief retraining
    accepted: bool


@dataclass
class CollapseRetrainResult:
    """The last accepted model, the reference loss and every round tried."""

    model: nn.Module
    params_before: int
    loss_before: float
    rounds: list[Round] = field(default_factory=list)


def collapse_retrain(model: nn.Module, example: torch.Tensor, *, thresholds: Sequence[float],
                     retrain: Callable[[nn.Module], None], evaluate: Callable[[nn.Module], float],
                     tolerance: float = 0.05, symmetry: str = "fiber") -> CollapseRetrainResult:
    """Algorithm 1: for each threshold (rising), collapse the current model to its base at that
    eps, ``retrain`` it in place, and keep it while ``evaluate`` stays within
    ``(1 + tolerance)`` of the starting loss; stop at the first round beyond it."""
    if list(thresholds) != sorted(thresholds) or not thresholds:
        raise UsageError("thresholds must be a non-empty rising sequence")
    if tolerance < 0:
        raise UsageError(f"tolerance must be non-negative, got {tolerance}")
    loss = float(evaluate(model))
    result = CollapseRetrainResult(model, parameter_count(model), loss)
    for eps in thresholds:
        candidate = collapse_to_base(result.model, example, eps=eps, symmetry=symmetry)
        collapsed = float(evaluate(candidate))
        retrain(candidate)
        retrained = float(evaluate(candidate))
        accepted = retrained <= (1.0 + tolerance) * loss
        result.rounds.append(Round(float(eps), parameter_count(candidate), collapsed, retrained, accepted))
        if not accepted:
            break
        result.model = candidate
    return result


__all__ = ["CollapseRetrainResult", "Round", "collapse_retrain", "collapse_to_base"]
