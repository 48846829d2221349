"""Symmetry breaking (paper Sec. 4.3): collapse covers to their base, then re-seed the redundant
neurons with fresh input weights and zero outgoing weights, so the network computes the same
function at the moment of breaking and has new degrees of freedom afterwards."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..partition import Partition
from .adapter import TorchAnalysis, Unit
from .surgery import first_members, fold, reinitialize, restrict_to


@dataclass(frozen=True)
class Broken:
    """The neurons one breaking replaced: per producer module, the covers folded (each a list
    of channels, the first one kept) and the channels re-seeded."""

    covers: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def replaced(self) -> int:
        return sum(len(c) - 1 for covers in self.covers.values() for c in covers)


def _cover_plan(analysis: TorchAnalysis, unit: Unit) -> tuple[Partition, np.ndarray, list[np.ndarray]] | None:
    """The unit's cover partition with the producer's and each reader's scales, if it merges."""
    plan = analysis.plan(unit.producer.output)
    if plan is None or plan.partition.is_discrete:
        return None
    reader_scales = []
    for reader, spatial in unit.readers:
        reader_plan = analysis.plan(reader.input)
        width = unit.width * spatial
        reader_scales.append(reader_plan.scales if reader_plan is not None else np.ones(width))
    return plan.partition, plan.scales, reader_scales


def break_unit(unit: Unit, covers: Partition, row_scales: np.ndarray, reader_scales: list[np.ndarray],
               generator: torch.Generator, optimizer: torch.optim.Optimizer | None = None) -> list[list[int]]:
    """Fold every color of ``covers`` onto its first channel (Eq. 10, scale rule) and re-seed the
    other members (fresh inputs, zero outputs). Returns the colors broken, as channel lists."""
    fold(unit, covers, row_scales, reader_scales)
    kept = set(first_members(covers).tolist())
    redundant = np.array([i for i in range(len(covers)) if i not in kept], dtype=np.int64)
    reinitialize(unit, redundant, generator, optimizer)
    groups = [np.flatnonzero(covers.labels == color).tolist() for color in range(covers.n_colors)]
    return [g for g in groups if len(g) > 1]


def break_covers(model: nn.Module, example: torch.Tensor, *, eps: float = 0.0,
                 generator: torch.Generator | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> Broken:
    """Break every cover of every replaceable hidden layer at tolerance ``eps`` (cosine distance
    of signatures; 0 is exact, and then the outputs do not change)."""
    generator = generator or torch.Generator().manual_seed(0)
    analysis = TorchAnalysis(model, example, eps=eps, symmetry="cover")
    broken: dict[str, list[list[int]]] = {}
    for unit in analysis.units():
        found = _cover_plan(analysis, unit)
        if found is not None:
            broken[unit.producer.name] = break_unit(unit, *found, generator, optimizer)
    return Broken(broken)


class SymmetryBreaker:
    """Symmetry breaking on a continual-backprop schedule. Call :meth:`step` after each
    optimizer step: every unit gains ``replacement_rate`` replacements per mature neuron (age
    at least ``maturity`` steps); every ``every`` steps the covers are recomputed at ``eps`` and
    the largest covers whose redundant members are all mature are broken while the budget
    lasts. Unused budget is capped at one recompute period's worth."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, optimizer: torch.optim.Optimizer | None = None,
                 eps: float = 0.1, replacement_rate: float = 1e-4, maturity: int = 100, every: int = 100,
                 seed: int = 0) -> None:
        if replacement_rate < 0 or maturity < 0 or every < 1:
            raise UsageError("replacement_rate and maturity must be non-negative and every at least 1")
        self.model, self.example, self.optimizer = model, example, optimizer
        self.eps, self.rate, self.maturity, self.every = float(eps), float(replacement_rate), int(maturity), int(every)
        self.generator = torch.Generator().manual_seed(seed)
        units = TorchAnalysis(model, example, eps=0.0).units()
        self.ages = {u.producer.name: np.zeros(u.width, dtype=np.int64) for u in units}
        self.budget = {u.producer.name: 0.0 for u in units}
        self.steps = 0
        self.replaced = 0
        self.seconds = 0.0

    def step(self) -> int:
        """Advance one training step; returns how many neurons were re-seeded now."""
        self.steps += 1
        for name, ages in self.ages.items():
            ages += 1
            cap = self.rate * len(ages) * self.every + 1.0
            self.budget[name] = min(self.budget[name] + self.rate * int(np.sum(ages >= self.maturity)), cap)
        if self.steps % self.every:
            return 0
        start = time.perf_counter()
        analysis = TorchAnalysis(self.model, self.example, eps=self.eps, symmetry="cover")
        replaced = 0
        for unit in analysis.units():
            name = unit.producer.name
            found = _cover_plan(analysis, unit) if name in self.ages else None
            if found is None:
                continue
            covers, row_scales, reader_scales = found
            chosen = self._choose(covers, self.ages[name], name)
            if chosen.size == 0:
                continue
            groups = break_unit(unit, restrict_to(covers, chosen), row_scales, reader_scales,
                                self.generator, self.optimizer)
            for group in groups:
                self.ages[name][group[1:]] = 0
                replaced += len(group) - 1
        self.replaced += replaced
        self.seconds += time.perf_counter() - start
        return replaced

    def _choose(self, covers: Partition, ages: np.ndarray, name: str) -> np.ndarray:
        """Colors to break: largest first, redundant members mature, within the budget."""
        sizes = covers.sizes()
        chosen = []
        for color in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero(covers.labels == color)
            if len(members) < 2 or len(members) - 1 > self.budget[name]:
                continue
            if np.all(ages[members[1:]] >= self.maturity):
                chosen.append(color)
                self.budget[name] -= len(members) - 1
        return np.array(chosen, dtype=np.int64)


__all__ = ["Broken", "SymmetryBreaker", "break_covers", "break_unit"]
