"""In-place edits of a unit's neurons: fold a class onto its first member (Eq. 10 with the scale
rule, the arithmetic done by the core's :meth:`Plan.fit_base` and :meth:`Partition.reduce`),
and give neurons fresh input weights and zero outgoing weights. Shared by symmetry breaking and
continual backprop."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..partition import Partition
from ..rules import Plan
from .adapter import Unit


def first_members(partition: Partition) -> np.ndarray:
    """Index of each color's first channel (canonical labels: increasing with the color)."""
    return np.unique(partition.labels, return_index=True)[1]


def restrict_to(partition: Partition, classes: np.ndarray) -> Partition:
    """The partition keeping only the given colors; every other channel alone."""
    keep = np.isin(partition.labels, classes)
    labels = np.where(keep, partition.labels, partition.n_colors + np.arange(len(partition)))
    return Partition(labels)


def relative(scales: np.ndarray, partition: Partition) -> np.ndarray:
    """Positive scales divided by their mean over each color."""
    scales = np.asarray(scales, dtype=np.float64)
    return scales / partition.reduce(scales, 0, mean=True)[partition.labels]


def _feature_partition(partition: Partition, spatial: int) -> Partition:
    """The partition of a reader's inputs (c, s), c-major, that a channel partition implies."""
    return partition if spatial == 1 else partition.flatten(spatial)


@torch.no_grad()
def fold(unit: Unit, partition: Partition, row_scales: np.ndarray, reader_scales: list[np.ndarray]) -> None:
    """Collapse each color of ``partition`` onto its first channel, in place: its input weights
    and bias become the base the core fits to the members' rows under their scales
    (:meth:`Plan.fit_base`: the mean of row / scale when the scales agree), the readers' columns
    the scale-weighted sum of the members' columns (Eq. 10 and the scale rule); per-channel
    modules take the members' mean. Scales are taken relative to their color's mean. The other
    members keep their (now redundant) weights."""
    kept = first_members(partition)
    rows_plan = Plan(partition, relative(row_scales, partition))
    producer = unit.producer.module
    rows = producer.weight.detach().double().cpu().numpy()
    producer.weight[kept] = _as(rows_plan.fit_base(rows, 0), producer.weight)
    if producer.bias is not None:
        bias = producer.bias.detach().double().cpu().numpy()
        producer.bias[kept] = _as(rows_plan.fit_base(bias, 0), producer.bias)
    for module in unit.channel_modules:
        for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
            if tensor is not None:
                values = tensor.detach().double().cpu().numpy()
                tensor[kept] = _as(partition.reduce(values, 0, mean=True), tensor)
    for (reader, spatial), scales in zip(unit.readers, reader_scales):
        features = _feature_partition(partition, spatial)
        columns = reader.module.weight.detach().double().cpu().numpy()
        scales = relative(scales, features)
        weighted = columns * scales.reshape((1, -1) + (1,) * (columns.ndim - 2))
        reader.module.weight[:, first_members(features)] = _as(features.reduce(weighted, 1), reader.module.weight)


@torch.no_grad()
def reinitialize(unit: Unit, channels: np.ndarray, generator: torch.Generator,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give ``channels`` of the unit fresh input weights (torch's default uniform range),
    default per-channel statistics, and zero outgoing weights; their optimizer state is
    cleared. The network's function does not depend on them afterwards."""
    channels = np.asarray(channels, dtype=np.int64)
    if channels.size == 0:
        return
    index = torch.as_tensor(channels)
    producer = unit.producer.module
    fan_in = producer.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    shape = (len(channels), *producer.weight.shape[1:])
    fresh = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
    producer.weight[index] = fresh.to(producer.weight.dtype)
    _clear_state(optimizer, producer.weight, index, 0)
    if producer.bias is not None:
        fresh_bias = torch.rand(len(channels), generator=generator, dtype=torch.float64) * 2 * bound - bound
        producer.bias[index] = fresh_bias.to(producer.bias.dtype)
        _clear_state(optimizer, producer.bias, index, 0)
    for module in unit.channel_modules:
        for tensor, value in ((module.weight, 1.0), (module.bias, 0.0), (module.running_mean, 0.0),
                              (module.running_var, 1.0)):
            if tensor is not None:
                tensor[index] = value
                _clear_state(optimizer, tensor, index, 0)
    for reader, spatial in unit.readers:
        columns = torch.as_tensor((channels[:, None] * spatial + np.arange(spatial)[None, :]).ravel())
        reader.module.weight[:, columns] = 0.0
        _clear_state(optimizer, reader.module.weight, columns, 1)


def _as(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _clear_state(optimizer: torch.optim.Optimizer | None, tensor: torch.Tensor, index: torch.Tensor,
                 axis: int) -> None:
    """Zero the optimizer's per-element state (momentum, Adam moments) of the given slices."""
    if optimizer is None or not isinstance(tensor, nn.Parameter):
        return
    for value in optimizer.state.get(tensor, {}).values():
        if torch.is_tensor(value) and value.shape == tensor.shape:
            value.index_fill_(axis, index, 0.0)


__all__ = ["first_members", "fold", "reinitialize", "relative", "restrict_to"]
