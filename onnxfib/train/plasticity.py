"""The baselines against loss of plasticity that symmetry breaking is compared with (besides
:class:`~onnxfib.train.ContinualBackprop`), and the figures the loss-of-plasticity literature
reads a network's health from (Dohare et al., Nature 2024; Kumar et al. 2023; Lyle et al. 2023).

Each baseline has the ``step()`` of the other helpers: call it after every optimizer step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import UsageError


class ShrinkPerturb:
    """Shrink and perturb as Dohare et al. run it: after every step each parameter is scaled by
    ``1 - shrink`` (``shrink`` = step size x weight decay) and gets Gaussian noise of standard
    deviation ``noise``."""

    def __init__(self, model: nn.Module, *, shrink: float, noise: float, seed: int = 0) -> None:
        if not 0.0 <= shrink < 1.0 or noise < 0:
            raise UsageError(f"shrink must be in [0, 1) and noise non-negative, got {shrink}, {noise}")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.shrink, self.noise = float(shrink), float(noise)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self) -> None:
        for p in self.parameters:
            p.mul_(1.0 - self.shrink)
            if self.noise:
                p.add_(torch.randn(p.shape, generator=self.generator, dtype=p.dtype), alpha=self.noise)


class L2Init:
    """L2 regularisation towards the initial weights (Kumar et al. 2023, "regenerative
    regularisation"): after every step each parameter moves by ``-pull * (w - w0)``, the
    gradient step of ``strength / 2 * ||w - w0||^2`` at ``pull`` = step size x strength;
    ``w0`` is the parameters' value when the helper is made."""

    def __init__(self, model: nn.Module, *, pull: float) -> None:
        if not 0.0 <= pull < 1.0:
            raise UsageError(f"pull must be in [0, 1), got {pull}")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.parameters]
        self.pull = float(pull)

    @torch.no_grad()
    def step(self) -> None:
        for p, p0 in zip(self.parameters, self.initial):
            p.lerp_(p0, self.pull)


def effective_rank(features: np.ndarray) -> float:
    """Roy and Vetterli's effective rank of a (samples x units) matrix, the figure Dohare et al.
    report: ``exp(H(p))`` with ``p`` the singular values divided by their sum; 0 for a zero
    matrix."""
    singular = np.linalg.svd(np.asarray(features, dtype=np.float64), compute_uv=False)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def unit_activity(features: np.ndarray) -> tuple[float, float]:
    """Fractions of a ReLU layer's units that are dead (zero on every sample) and always active
    (positive on every sample, so the unit acts linearly on these inputs), from its
    (samples x units) outputs."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise UsageError(f"features must be a non-empty (samples x units) matrix, got shape {features.shape}")
    return float(np.mean(np.all(features <= 0, axis=0))), float(np.mean(np.all(features > 0, axis=0)))


__all__ = ["L2Init", "ShrinkPerturb", "effective_rank", "unit_activity"]
