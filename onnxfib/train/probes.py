"""Measure what the theorems talk about on a real forward/backward pass: each layer's activity
(Eq. 4), its error signal delta = dL/d(pre-activation) (Eq. 6) and weight gradients (Eq. 9),
and whether a quantity is synchronized over the colors of a partition."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..coloring import equal_row_labels
from ..partition import Partition
from .adapter import LAYER_TYPES


def layer_outputs(model: nn.Module, x: torch.Tensor, *,
                  loss: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of every Linear/Conv module on ``x`` (pre-activations, channels on axis 1) and,
    when ``loss`` is given (a function of the model's output), their error signals dL/dz;
    parameter gradients are left in ``.grad``."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            def keep(_m: nn.Module, _a: tuple, out: torch.Tensor, name: str = name) -> None:
                if out.requires_grad:
                    out.retain_grad()
                outputs[name] = out
            hooks.append(module.register_forward_hook(keep))
    try:
        model.zero_grad(set_to_none=True)
        result = model(x)
        errors: dict[str, torch.Tensor] = {}
        if loss is not None:
            loss(result).backward()
            errors = {n: o.grad.detach() for n, o in outputs.items() if o.grad is not None}
    finally:
        for hook in hooks:
            hook.remove()
    return {n: o.detach() for n, o in outputs.items()}, errors


def synchronized(values: torch.Tensor | np.ndarray, partition: Partition, *, axis: int = 1,
                 rtol: float = 1e-6, atol: float = 1e-9) -> bool:
    """True when every channel equals its color's first channel along ``axis`` (within rtol/atol
    of the largest magnitude)."""
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    moved = np.moveaxis(array, axis, 0).astype(np.float64)
    first = np.unique(partition.labels, return_index=True)[1]
    reference = moved[first[partition.labels]]
    scale = max(float(np.max(np.abs(moved))) if moved.size else 0.0, 1.0)
    return bool(np.all(np.abs(moved - reference) <= atol + rtol * scale))


def synchronized_blocks(matrix: torch.Tensor | np.ndarray, rows: Partition, columns: Partition, *,
                        rtol: float = 1e-6, atol: float = 1e-9) -> bool:
    """True when ``matrix`` (rows x columns x ...) is constant on every (row color, column
    color) block: synchronized learning, Eq. 9, for a weight gradient."""
    array = matrix.detach().cpu().numpy() if torch.is_tensor(matrix) else np.asarray(matrix)
    return synchronized(array, rows, axis=0, rtol=rtol, atol=atol) and \
        synchronized(array, columns, axis=1, rtol=rtol, atol=atol)


def activity_partition(values: torch.Tensor | np.ndarray, *, axis: int = 1, rtol: float = 1e-6) -> Partition:
    """Channels grouped by equal activity over all samples (the function side of Sec. 9.2)."""
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    rows = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float64)
    scale = max(float(np.max(np.abs(rows))) if rows.size else 0.0, 1.0)
    return Partition(equal_row_labels(rows, rtol * scale))


__all__ = ["activity_partition", "layer_outputs", "synchronized", "synchronized_blocks"]
