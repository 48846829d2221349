"""Scaled colorings and the clustering that produces them.

A :class:`Coloring` states that channel ``i`` carries ``scales[i] * base[color(i)]`` for every
input: equal colors with equal scales are fibers (paper Eq. 3); unequal positive scales are the
scale rule of DESIGN §2. :class:`Tolerance` turns eps into the grouping decisions: exact
(eps = 0, equal to float rounding) or agglomerative on cosine distance (eps in (0, 2)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from .partition import Partition

#: Largest difference (max-norm, after normalising) still called "equal" in exact mode.
EXACT_TOL = 1e-6


@dataclass(frozen=True)
class Coloring:
    """A partition of a channel axis plus the positive scale of each channel in its color."""

    partition: Partition
    scales: np.ndarray

    @classmethod
    def discrete(cls, n: int) -> Coloring:
        return cls(Partition.discrete(n), np.ones(n))

    def __len__(self) -> int:
        return len(self.partition)

    @property
    def is_unit(self) -> bool:
        return bool(np.all(self.scales == 1.0))

    def with_partition(self, partition: Partition) -> Coloring:
        """The same scales over a finer partition."""
        return Coloring(partition, self.scales)

    def relative_scales(self, partition: Partition | None = None) -> np.ndarray:
        """Scales divided by their mean over each color (1 wherever a color's scales agree)."""
        partition = partition or self.partition
        mean = partition.reduce(self.scales, 0, mean=True)
        return self.scales / mean[partition.labels]


def equal_row_labels(rows: np.ndarray, tol: float) -> np.ndarray:
    """Labels grouping rows equal within ``tol`` in max-norm; linear in ``rows.size``.

    Rows are sorted by a fixed random projection; a candidate run of near-equal projections
    is then split greedily around representatives, so rows farther than ``tol`` apart never
    share a label.
    """
    n = len(rows)
    rows = np.asarray(rows, dtype=np.float64).reshape(n, -1)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    direction = np.random.default_rng(0).standard_normal(rows.shape[1])
    direction /= max(np.linalg.norm(direction), 1e-300)
    projection = rows @ direction
    order = np.argsort(projection, kind="stable")
    gaps = np.diff(projection[order]) > tol * np.abs(direction).sum()
    run_starts = np.concatenate([[0], np.flatnonzero(gaps) + 1])
    run_lengths = np.diff(np.append(run_starts, n))
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.repeat(np.arange(run_starts.size), run_lengths)  # a run of one row is a group
    next_label = run_starts.size
    for start, length in zip(run_starts[run_lengths > 1], run_lengths[run_lengths > 1]):
        members = order[start:start + length]
        while members.size:
            rep = rows[members[0]]
            close = np.max(np.abs(rows[members] - rep), axis=1) <= tol
            labels[members[close]] = next_label
            next_label += 1
            members = members[~close]
    return labels


def fitted_scales(rows: np.ndarray, partition: Partition, norms: np.ndarray) -> np.ndarray:
    """Per channel, the scale ``t_i`` of the best rank-one fit of its color's rows, ``r_i ~ t_i u``
    with ``u`` a unit direction (least squares: ``u`` the leading right singular vector, ``t_i =
    r_i . u``); ``Plan.fit_base`` then returns ``u`` itself. Equal to the norms where rows are
    proportional; larger than the norms where a color's rows spread, which the plain norms would
    shrink. A channel pointing away from its color gets a vanishing positive scale (the scale
    rule needs positive scales); channels alone in their color keep ``norms``."""
    scales = np.asarray(norms, dtype=np.float64).copy()
    sizes = partition.sizes()
    order = np.argsort(partition.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for size in np.unique(sizes[sizes > 1]):  # colors of one size in one batched eigh
        members = order[starts[sizes == size][:, None] + np.arange(size)]  # (colors, size)
        blocks = rows[members]
        values, vectors = np.linalg.eigh(blocks @ np.swapaxes(blocks, 1, 2))  # leading: r_i . u / sigma
        t = np.sqrt(np.maximum(values[:, -1:], 0.0)) * vectors[:, :, -1]
        t *= np.where(t.sum(axis=1, keepdims=True) >= 0, 1.0, -1.0)
        top = t.max(axis=1, keepdims=True)
        fitted = np.maximum(t, 1e-4 * top)
        scales[members] = np.where(top > 0, fitted, scales[members])
    return scales


@dataclass(frozen=True)
class Tolerance:
    """How close two channels must be to share a color: eps = 0 exact, else cosine clustering.

    ``heights``, when given, receives the sorted merge distances (average linkage on cosine
    distance) of each clustering's non-zero rows, whatever eps is: the thresholds at which the
    rows would merge further (the target search reads them). ``chosen``, when given, decides the
    colors :meth:`cluster` returns whatever the signatures (a layer whose merge was chosen
    otherwise: from calibration data, or by folding): a Coloring as it is, a Partition with
    the least-squares scales of :func:`fitted_scales`."""

    eps: float
    heights: list[np.ndarray] | None = field(default=None, compare=False)
    chosen: Coloring | Partition | None = field(default=None, compare=False)

    @property
    def exact(self) -> bool:
        return self.eps == 0.0

    def cluster(self, signatures: np.ndarray) -> Coloring:
        """Fibers of rows of ``signatures`` under the scale rule: direction decides the color.
        Exact colors take each row's norm as its scale; approximate ones (eps > 0 or chosen) the
        least-squares scales of :func:`fitted_scales`. All-zero rows form one color of their own
        (unless chosen otherwise)."""
        if isinstance(self.chosen, Coloring) and len(self.chosen) == len(signatures):
            return self.chosen
        sig = np.asarray(signatures, dtype=np.float64).reshape(len(signatures), -1)
        norms = np.linalg.norm(sig, axis=1)
        partition = self._partition(sig, norms)
        scales = np.where(norms <= 1e-30, 1.0, norms)
        exact = self.exact and not isinstance(self.chosen, Partition)
        return Coloring(partition, scales if exact else fitted_scales(sig, partition, scales))

    def partition(self, signatures: np.ndarray) -> Partition:
        """The colors :meth:`cluster` gives, without the scales (opfibers need no more)."""
        if isinstance(self.chosen, Coloring) and len(self.chosen) == len(signatures):
            return self.chosen.partition
        sig = np.asarray(signatures, dtype=np.float64).reshape(len(signatures), -1)
        return self._partition(sig, np.linalg.norm(sig, axis=1))

    def _partition(self, sig: np.ndarray, norms: np.ndarray) -> Partition:
        if isinstance(self.chosen, Partition) and len(self.chosen) == len(sig):
            return self.chosen
        zero = norms <= 1e-30
        labels = np.full(len(sig), -1, dtype=np.int64)
        live = np.flatnonzero(~zero)
        if live.size:
            unit = sig[live] / norms[live, None]
            tree = None
            if live.size > 1 and (self.heights is not None or not self.exact):
                tree = linkage(unit, method="average", metric="cosine")
                if self.heights is not None:
                    self.heights.append(np.maximum.accumulate(tree[:, 2]))
            if self.exact or tree is None:
                labels[live] = equal_row_labels(unit, EXACT_TOL)
            else:
                labels[live] = fcluster(tree, t=self.eps, criterion="distance")
        return Partition(labels)

    def split_by_rows(self, coloring: Coloring, keys: np.ndarray) -> Coloring:
        """Refine so channels of one color also agree on their key rows (relative tolerance)."""
        keys = np.asarray(keys, dtype=np.float64).reshape(len(coloring), -1)
        magnitude = float(np.max(np.abs(keys))) if keys.size else 0.0
        tol = (EXACT_TOL if self.exact else self.eps) * max(magnitude, 1e-30)
        keyed = Partition(equal_row_labels(keys, tol))
        return coloring.with_partition(coloring.partition.meet(keyed))

    def unit(self, coloring: Coloring) -> Coloring:
        """Refine by scale so each color is truly synchronized (before a non-homogeneous op)."""
        if coloring.is_unit:
            return coloring
        log_scales = np.log(coloring.scales)[:, None]
        tol = EXACT_TOL if self.exact else self.eps
        keyed = Partition(equal_row_labels(log_scales, tol))
        return Coloring(coloring.partition.meet(keyed), np.ones(len(coloring)))
