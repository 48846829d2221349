"""Torch networks with planted fibration symmetries, built as lifts of a small base network:
each base neuron is copied ``multiplicity`` times, copies receive the base neuron's input
weights, and the weights leaving a neuron are split among its copies, so the lift computes the
base's function. With an equal split the copies are covers (fibers and flavored opfibers);
with ``uneven=True`` the split differs per reading neuron, so copies stay fibers (equal input
sums) but lose their opfibers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from onnxfib.partition import Partition


def lift_map(multiplicity: list[int]) -> np.ndarray:
    """Base neuron of each lifted neuron."""
    return np.repeat(np.arange(len(multiplicity)), multiplicity)


def planted_mlp(widths: list[int], multiplicities: list[list[int]], *, seed: int = 0, uneven: bool = False,
                activation: type[nn.Module] = nn.Tanh, dtype: torch.dtype = torch.float64
                ) -> tuple[nn.Sequential, list[Partition]]:
    """A lifted MLP ``widths[0] -> ... -> widths[-1]`` whose hidden layer ``l`` copies base
    neurons ``multiplicities[l]`` times; returns the model and each hidden layer's planted
    partition (the copies)."""
    rng = np.random.default_rng(seed)
    maps = [np.arange(widths[0])] + [lift_map(m) for m in multiplicities] + [np.arange(widths[-1])]
    counts = [np.ones(widths[0])] + [np.asarray(m, dtype=float) for m in multiplicities] + [np.ones(widths[-1])]
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        base_w = rng.standard_normal((widths[k + 1], widths[k]))
        base_b = rng.standard_normal(widths[k + 1]) * 0.1
        rows, cols = maps[k + 1], maps[k]
        share = 1.0 / counts[k][cols]
        w = base_w[np.ix_(rows, cols)] * share[None, :]
        if uneven and k > 0:  # redistribute each row's weight among a fiber's copies at random
            for base in range(widths[k]):
                members = np.flatnonzero(cols == base)
                if members.size > 1:
                    mix = rng.dirichlet(np.ones(members.size), size=len(rows))
                    w[:, members] = base_w[rows][:, [base]] * mix
        linear = nn.Linear(len(cols), len(rows)).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w))
            linear.bias.copy_(torch.as_tensor(base_b[rows]))
        layers.append(linear)
        if k < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers), [Partition(lift_map(m)) for m in multiplicities]
