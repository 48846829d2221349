"""Continual backprop (Dohare et al., Nature 2024), the baseline symmetry breaking generalizes
(paper Sec. 11.3.1): each hidden neuron keeps a running contribution utility
``u = decay * u + (1 - decay) * |h| * sum_k |W_ki|``; mature neurons (age at least
``maturity``) with the lowest utility are re-seeded at ``replacement_rate`` per mature neuron
and step (fresh inputs, zero outgoing weights)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .adapter import TorchAnalysis, Unit
from .surgery import reinitialize


class ContinualBackprop:
    """Call :meth:`step` after each optimizer step; activity is read by hooks on the layers
    reading each hidden layer (training-mode forward passes only). :meth:`remove` detaches them."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, optimizer: torch.optim.Optimizer | None = None,
                 replacement_rate: float = 1e-4, maturity: int = 100, decay: float = 0.99, seed: int = 0) -> None:
        if replacement_rate < 0 or maturity < 0 or not 0.0 <= decay < 1.0:
            raise UsageError("replacement_rate and maturity must be non-negative and decay in [0, 1)")
        self.optimizer = optimizer
        self.rate, self.maturity, self.decay = float(replacement_rate), int(maturity), float(decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.units: list[Unit] = TorchAnalysis(model, example, eps=0.0).units()
        self.utility = {u.producer.name: np.zeros(u.width) for u in self.units}
        self.ages = {u.producer.name: np.zeros(u.width, dtype=np.int64) for u in self.units}
        self.budget = {u.producer.name: 0.0 for u in self.units}
        self._activity: dict[str, np.ndarray] = {}
        self.replaced = 0
        self._hooks = [self._hook(unit) for unit in self.units]

    def _hook(self, unit: Unit) -> torch.utils.hooks.RemovableHandle:
        reader = unit.readers[0][0]
        name = unit.producer.name

        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                h = args[0].detach()
                per_channel = h.reshape(h.shape[0], unit.width, -1) if h.dim() == 2 else h.flatten(2)
                self._activity[name] = per_channel.abs().mean(dim=(0, 2)).double().cpu().numpy()

        return reader.module.register_forward_pre_hook(record)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _outgoing(self, unit: Unit) -> np.ndarray:
        total = np.zeros(unit.width)
        for reader, spatial in unit.readers:
            w = reader.module.weight.detach().abs()
            per_input = w.transpose(0, 1).reshape(w.shape[1], -1).sum(dim=1)
            total += per_input.reshape(unit.width, spatial).sum(dim=1).double().cpu().numpy()
        return total

    def step(self) -> int:
        """Update utilities and ages, re-seed the due neurons; returns how many were re-seeded."""
        replaced = 0
        for unit in self.units:
            name = unit.producer.name
            ages, utility = self.ages[name], self.utility[name]
            ages += 1
            if name in self._activity:
                utility *= self.decay
                utility += (1.0 - self.decay) * self._activity[name] * self._outgoing(unit)
            mature = np.flatnonzero(ages >= self.maturity)
            self.budget[name] += self.rate * mature.size
            count = min(int(self.budget[name]), mature.size)
            if count == 0:
                continue
            self.budget[name] -= count
            corrected = utility[mature] / (1.0 - self.decay ** ages[mature])
            chosen = mature[np.argsort(corrected, kind="stable")[:count]]
            reinitialize(unit, chosen, self.generator, self.optimizer)
            utility[chosen] = 0.0
            ages[chosen] = 0
            replaced += count
        self._activity.clear()
        self.replaced += replaced
        return replaced


__all__ = ["ContinualBackprop"]
