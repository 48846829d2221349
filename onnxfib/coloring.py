"""Scaled colorings and the clustering that produces them.

A :class:`Coloring` states that channel ``i`` carries ``scales[i] * base[color(i)]`` for every
input: equal colors with equal scales are fibers (paper Eq. 3); unequal positive scales are the
scale rule of DESIGN §2. :class:`Tolerance` turns eps into the grouping decisions: exact
(eps = 0, equal to float rounding) or agglomerative on cosine distance (eps in (0, 2)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import xxhash
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

from .partition import Partition

V = TypeVar("V")

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


#: Bytes of rows :func:`_spread` and :func:`equal_row_labels` copy at a time.
SPREAD_BYTES = 16 << 20


def equal_row_labels(rows: np.ndarray, tol: float) -> np.ndarray:
    """Labels grouping rows equal within ``tol`` in max-norm; about linear in ``rows.size``.

    A label is the index of its group's representative row, and every member lies within
    ``tol`` of it; rows within ``tol`` of each other share a group unless a chain of such rows
    spans more than ``tol`` (then the chain is split around representatives). Rows holding NaN
    or infinities are never grouped. Rows are split along coordinates where their values jump
    by more than ``tol`` (:func:`_near_groups`), so the work grows with the rows, not with their
    pairs.
    """
    n = len(rows)
    rows = np.asarray(rows, dtype=np.float64).reshape(n, -1)
    labels = np.arange(n, dtype=np.int64)  # non-finite rows keep labels of their own
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are set apart just below
        projection = rows @ np.random.default_rng(0).standard_normal((rows.shape[1], 2))
    finite = np.flatnonzero(np.isfinite(projection).all(axis=1))  # NaN and infinities reach it
    if finite.size < 2:
        return labels
    projection = projection[finite]  # equal rows project equally: one representative each
    _, first, inverse = np.unique(projection, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    distinct = finite[first]
    if distinct.size == n and tol > 0:  # every row finite and distinct: no copy of the rows
        return _near_groups(rows, tol)
    groups = _near_groups(rows, tol, distinct) if tol > 0 and distinct.size > 1 else np.arange(distinct.size)
    labels[finite] = distinct[groups][inverse]
    stood_in = np.flatnonzero(distinct[inverse] != finite)  # a row represented by an equal projection
    rows_in, stand_in = finite[stood_in], distinct[inverse[stood_in]]
    step = max(1, SPREAD_BYTES // max(rows[:1].nbytes, 1))
    unequal = np.concatenate([np.max(np.abs(rows[rows_in[i:i + step]] - rows[stand_in[i:i + step]]), axis=1) > tol
                              for i in range(0, rows_in.size, step)] or [np.zeros(0, bool)])
    labels[rows_in[unequal]] = rows_in[unequal]  # projections collided: the rows stay apart
    return labels


def _near_groups(rows: np.ndarray, tol: float, subset: np.ndarray | None = None) -> np.ndarray:
    """For the distinct finite rows ``subset`` of ``rows`` (all of them by default), labels of
    :func:`equal_row_labels` as positions in ``subset`` (the rows are read where they are, not
    copied). Along each coordinate, the sorted values of a set of rows fall into runs whose
    steps are at most ``tol``; rows in
    different runs of any coordinate differ by more than ``tol``, so the set splits by its rows'
    runs on its widest-spread coordinates (hashed: a collision only delays a split; coordinates
    are added, widest first, until the set splits or none is left), and each part is split again,
    until a part spans at most ``tol`` on every coordinate (a group) or no coordinate splits it
    (a chain of steps within ``tol``: split around representatives)."""
    index = np.arange(len(rows)) if subset is None else subset
    labels = np.arange(index.size, dtype=np.int64)
    weights = np.random.default_rng(0).integers(1, 1 << 62, size=(rows.shape[1], 2))
    pending = [labels.copy()]
    while pending:
        members = pending.pop()  # positions in index
        if members.size < 2:
            continue
        spread = _spread(rows, index[members])
        columns = np.argsort(spread)[::-1][: np.count_nonzero(spread > tol)]
        if columns.size == 0:
            labels[members] = members[0]
            continue
        key = np.zeros((members.size, 2), dtype=np.int64)
        start, width, parts = 0, 1, 1
        while start < columns.size:  # coordinates 1, 2, 4, ... 64 at a time, until the parts stop multiplying
            piece = columns[start:start + width]
            start, width = start + width, min(2 * width, 64)
            block = rows[np.ix_(index[members], piece)]
            order = np.argsort(block, axis=0, kind="stable")
            ordered = np.take_along_axis(block, order, axis=0)
            runs = np.zeros_like(order)  # each row's run number along each coordinate
            steps = np.diff(ordered, axis=0, prepend=ordered[:1]) > tol
            np.put_along_axis(runs, order, np.cumsum(steps, axis=0), 0)
            key += runs @ weights[piece]  # wraps around: only a hash
            _, part = np.unique(key, axis=0, return_inverse=True)
            count = int(part.max()) + 1
            if count == members.size or 1 < count == parts:
                break  # every row apart, or split and no further: the parts go on from their own spreads
            parts = count
        part = part.ravel()
        if part.max() > 0:  # parts of one row are done: each keeps its own label
            counts = np.bincount(part)
            ordered_members, ends = members[np.argsort(part, kind="stable")], np.cumsum(counts)
            pending.extend(ordered_members[ends[i] - counts[i]:ends[i]] for i in np.flatnonzero(counts > 1))
        else:
            while members.size > 1:
                close = np.max(np.abs(rows[index[members]] - rows[index[members[0]]]), axis=1) <= tol
                labels[members[close]] = members[0]
                members = members[~close]
    return labels


def _spread(rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per column, the range of the rows ``chosen`` (distinct indices), a block at a time."""
    if chosen.size == len(rows):
        return np.ptp(rows, axis=0)
    high = np.full(rows.shape[1], -np.inf)
    low = np.full(rows.shape[1], np.inf)
    step = max(1, SPREAD_BYTES // max(rows[:1].nbytes, 1))
    for start in range(0, chosen.size, step):
        block = rows[chosen[start:start + step]]
        np.maximum(high, block.max(axis=0), out=high)
        np.minimum(low, block.min(axis=0), out=low)
    return high - low


def fitted_scales(rows: np.ndarray, partition: Partition, norms: np.ndarray, *,
                  normalised: bool = False) -> np.ndarray:
    """Per channel, the scale ``t_i`` of the best rank-one fit of its color's rows, ``r_i ~ t_i u``
    with ``u`` a unit direction (least squares: ``u`` the leading right singular vector, ``t_i =
    r_i . u``); ``Plan.fit_base`` then returns ``u`` itself. Equal to the norms where rows are
    proportional; larger than the norms where a color's rows spread, which the plain norms would
    shrink. A channel pointing away from its color gets a vanishing positive scale (the scale
    rule needs positive scales); channels alone in their color keep ``norms``. ``normalised``:
    ``rows`` were divided by ``norms`` (the rows are these products)."""
    scales = np.asarray(norms, dtype=np.float64).copy()
    sizes = partition.sizes()
    order = np.argsort(partition.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for size in np.unique(sizes[sizes > 1]):  # colors of one size in batched eighs
        first = starts[sizes == size]
        step = max(1, SPREAD_BYTES // (size * max(rows[:1].nbytes, 1)))  # bounded gathers
        for start in range(0, first.size, step):
            members = order[first[start:start + step, None] + np.arange(size)]  # (colors, size)
            blocks = rows[members]
            gram = blocks @ np.swapaxes(blocks, 1, 2)
            if normalised:
                gram *= norms[members][:, :, None] * norms[members][:, None, :]
            values, vectors = np.linalg.eigh(gram)  # leading: r_i . u / sigma
            t = np.sqrt(np.maximum(values[:, -1:], 0.0)) * vectors[:, :, -1]
            t *= np.where(t.sum(axis=1, keepdims=True) >= 0, 1.0, -1.0)
            top = t.max(axis=1, keepdims=True)
            scales[members] = np.where(top > 0, np.maximum(t, 1e-4 * top), scales[members])
    return scales


def row_norms(rows: np.ndarray) -> np.ndarray:
    """The Euclidean norm of each row, without a temporary the size of ``rows``."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows))


def average_linkage(unit: np.ndarray) -> np.ndarray:
    """scipy's average-linkage tree of unit rows under cosine distance (1 - u.v), the distances
    computed as one matrix product instead of scipy's pairwise loop."""
    distances = unit @ unit.T
    np.subtract(1.0, distances, out=distances)
    np.clip(distances, 0.0, 2.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return linkage(squareform(distances, checks=False), method="average")


def apart_distance(dims: int) -> float:
    """A cosine distance beyond which two unit rows of ``dims`` values differ by more than
    ``EXACT_TOL`` in max-norm: rows within ``EXACT_TOL`` are within ``dims * EXACT_TOL**2 / 2``
    (half their squared Euclidean distance); the bound is doubled, plus the rounding of a matrix
    product. A tree whose closest pair (its first merge) lies beyond it has no equal rows."""
    return dims * EXACT_TOL**2 + 1e-9


#: Rows up to which :func:`threshold_clusters` builds the whole tree (its memory is quadratic).
FULL_TREE_ROWS = 1024
#: Values per block of the neighbour search in :func:`threshold_clusters`: bounds its memory
#: (a float32 copy of all wide rows cost more in fresh pages than its products); much smaller
#: blocks make too many short matrix products, whose threads wait on each other.
BLOCK_VALUES = 1 << 24
#: Values per piece of the exact check of candidate pairs in :func:`threshold_clusters` (two
#: float64 gathers of 8 MiB: larger ones are fresh pages each time, which cost more than the sums).
CHECK_VALUES = 1 << 20
#: Dimensions of the random projection on which :func:`threshold_clusters` looks for candidate
#: neighbours among wider rows: a first half finds candidates among all pairs, the whole
#: projection then screens them (each survivor is then checked exactly).
PROJECTED_DIMS = 256
#: Standard deviations of slack the projected cosine distance is given: the projected cosine of
#: unit rows at cosine c deviates from c with a standard deviation of about (1 - c^2) / sqrt(k)
#: on k dimensions, so at each stage a pair within eps is missed with probability ~1e-9.
PROJECTION_SIGMAS = 6.0


def projection_slack(eps: float, dims: int) -> float:
    """How far below ``1 - eps`` the cosine of a pair within ``eps`` can fall when estimated on a
    random projection to ``dims`` dimensions (``PROJECTION_SIGMAS`` standard deviations)."""
    return PROJECTION_SIGMAS * (1.0 - (1.0 - eps) ** 2) / np.sqrt(dims)


def projected(rows: np.ndarray, projection: np.ndarray, step: int, index: np.ndarray | None = None) -> np.ndarray:
    """``rows @ projection`` (``rows[index] @ projection`` when ``index`` is given) in float32,
    ``step`` rows at a time through reused buffers rather than a float32 copy of all of them;
    ``index``'s rows are gathered ``CHECK_VALUES`` values at a time (a matrix product of fewer
    rows would be far slower: its threads wait on each other)."""
    count = len(rows) if index is None else len(index)
    out = np.empty((count, projection.shape[1]), dtype=np.float32)
    cast = np.empty((min(step, count), rows.shape[1]), dtype=np.float32)
    gather = max(1, CHECK_VALUES // rows.shape[1])
    gathered = np.empty((gather if index is not None else 0, rows.shape[1]), dtype=rows.dtype)
    for start in range(0, count, step):
        piece = cast[:min(step, count - start)]
        if index is None:
            piece[...] = rows[start:start + step]
        else:
            for first in range(0, len(piece), gather):
                some = index[start + first:start + min(first + gather, len(piece))]
                piece[first:first + len(some)] = np.take(rows, some, axis=0, out=gathered[:len(some)])
        np.matmul(piece, projection, out=out[start:start + step])
    return out


def pairs_above(probe: np.ndarray, threshold: float, step: int) -> np.ndarray:
    """The pairs ``(i, j)``, i < j, of unit rows of ``probe`` whose dot product is at least
    ``threshold``: ``step`` rows at a time against the rows after them, in one reused buffer."""
    n = len(probe)
    found = []
    products = np.empty(step * n, dtype=probe.dtype)
    near = np.empty(step * n, dtype=bool)
    for start in range(0, n, step):
        count = min(step, n - start)
        block = products[:count * (n - start)].reshape(count, n - start)
        np.matmul(probe[start:start + count], probe[start:].T, out=block)
        hits = np.flatnonzero(np.greater_equal(block, threshold, out=near[:block.size].reshape(block.shape)))
        rows, cols = np.divmod(hits, n - start)  # 15x faster than a 2-D nonzero on a mostly False block
        keep = rows < cols
        found.append(np.stack([rows[keep] + start, cols[keep] + start], axis=1))
    return np.concatenate(found)


def pair_dots(rows: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The dot product of the two rows of each pair, in pieces of ``CHECK_VALUES`` values."""
    dots = np.empty(len(pairs), dtype=rows.dtype)
    per_piece = max(1, CHECK_VALUES // rows.shape[1])
    for first in range(0, len(pairs), per_piece):  # pieces the allocator reuses
        piece = pairs[first:first + per_piece]
        dots[first:first + per_piece] = np.einsum("ij,ij->i", rows[piece[:, 0]], rows[piece[:, 1]])
    return dots


def candidate_pairs(unit: np.ndarray, eps: float, step: int) -> np.ndarray:
    """Pairs of unit rows that may lie within cosine distance ``eps`` (every pair that does, but
    with probability ~1e-9 per such pair for wide rows), from float32 products: of the rows
    themselves, with slack for their rounding of (dims + 2) units; for rows wider than twice
    ``PROJECTED_DIMS``, of the first half of a random projection over all pairs, then of the whole
    projection over the candidates it found (the second half projects only their rows)."""
    dims = unit.shape[1]
    if dims <= 2 * PROJECTED_DIMS:  # float32 rounding is far inside the slack
        probe = unit.astype(np.float32)
        return pairs_above(probe, 1.0 - eps - (dims + 2) * float(np.finfo(np.float32).eps), step)
    projection = np.random.default_rng(0).standard_normal((dims, PROJECTED_DIMS), dtype=np.float32)
    half = PROJECTED_DIMS // 2
    first = projected(unit, np.ascontiguousarray(projection[:, :half]), step)
    norms = np.maximum(row_norms(first), 1e-30)
    pairs = pairs_above(first / norms[:, None], 1.0 - eps - projection_slack(eps, half), step)
    rows, index = np.unique(pairs, return_inverse=True)
    whole = np.empty((len(rows), PROJECTED_DIMS), dtype=np.float32)
    whole[:, :half] = first[rows]
    whole[:, half:] = projected(unit, np.ascontiguousarray(projection[:, half:]), step, rows)
    whole /= np.maximum(row_norms(whole), 1e-30)[:, None]
    close = pair_dots(whole, index.reshape(pairs.shape)) >= 1.0 - eps - projection_slack(eps, PROJECTED_DIMS)
    return pairs[close]


def threshold_clusters(unit: np.ndarray, eps: float) -> np.ndarray:
    """The clusters of average linkage on cosine distance cut at ``eps`` (as labels), without the
    quadratic tree for many rows: two clusters merge below ``eps`` only if some pair of their
    rows is within ``eps``, so the clusters lie inside the connected components of the graph of
    pairs within ``eps``, and average linkage run inside each component gives the same cut.
    Pairs come from :func:`candidate_pairs`, each then checked in float64, so memory grows with
    the rows and the close pairs."""
    n, dims = unit.shape
    if n <= FULL_TREE_ROWS:
        return fcluster(average_linkage(unit), t=eps, criterion="distance")
    candidates = candidate_pairs(unit, eps, max(1, BLOCK_VALUES // max(n, dims)))
    edges = candidates[pair_dots(unit, candidates) >= 1.0 - eps - 1e-12]
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    labels = np.arange(n, dtype=np.int64)
    sizes = np.bincount(component)
    paired = sizes[component] == 2  # two rows joined by an edge: within eps, one cluster
    labels[paired] = n + component[paired]
    next_label = n + len(sizes)
    larger = np.flatnonzero(sizes[component] > 2)
    order = larger[np.argsort(component[larger], kind="stable")]
    for members in np.split(order, np.flatnonzero(np.diff(component[order])) + 1):
        if members.size:
            inner = fcluster(average_linkage(unit[members]), t=eps, criterion="distance")
            labels[members] = next_label + inner
            next_label += int(inner.max()) + 1
    return labels


class Budgeted(Generic[V]):
    """Values by key within a budget of bytes (each value's size given when it is put), dropping
    the least recently used; the last value put is always kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._values: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: bytes) -> V | None:
        held = self._values.get(key)
        if held is None:
            return None
        self._values.move_to_end(key)
        return held[0]

    def put(self, key: bytes, value: V, nbytes: int) -> None:
        self._values[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.budget and len(self._values) > 1:
            self._bytes -= self._values.popitem(last=False)[1][1]


class TreeCache:
    """Clusterings by the rows they were computed from: average-linkage trees and exact-equality
    labels (:func:`equal_row_labels`). One per search over a model, so a layer whose input
    colors did not change is not clustered again. Holds at most ``budget`` bytes of results,
    dropping the least recently used."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self._results: Budgeted[np.ndarray] = Budgeted(budget)

    def __len__(self) -> int:
        """How many results it holds."""
        return len(self._results)

    def tree(self, unit: np.ndarray) -> np.ndarray:
        """The tree of :func:`average_linkage` for ``unit``, built once per distinct matrix."""
        return self._cached(b"tree", unit, average_linkage)

    def equal_labels(self, rows: np.ndarray, tol: float) -> np.ndarray:
        """:func:`equal_row_labels` of ``rows`` at ``tol``, computed once per distinct matrix."""
        return self._cached(repr(tol).encode(), rows, lambda r: equal_row_labels(r, tol))

    def _cached(self, kind: bytes, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        rows = np.ascontiguousarray(rows)
        key = b"%s|%s|%s|" % (kind, str(rows.shape).encode(), rows.dtype.str.encode())
        key += xxhash.xxh3_128_digest(rows.data)  # 128 bits, about 10 GB/s: signatures are large
        result = self._results.get(key)
        if result is None:
            result = compute(rows)
            result.setflags(write=False)  # shared by every analysis that asks again
            self._results.put(key, result, result.nbytes)
        return result


#: The eps of rows cut to all their merges: the largest there is, so that the sites their
#: channels are tied to (a depthwise Conv, a BatchNorm, reading the same eps) merge them too.
ALL_MERGES_EPS = 1.999


def merges_at(heights: np.ndarray, eps: float) -> int:
    """How many merges rows with the merge distances ``heights`` (sorted) make at ``eps``."""
    return int(np.searchsorted(heights, eps, side="right"))


def cut_eps(heights: np.ndarray, merges: int) -> float:
    """The eps at which rows with the merge distances ``heights`` (sorted) make ``merges``
    merges: 0 for none, the middle of the gap after the last of them, ``ALL_MERGES_EPS`` for all
    of them (and where that middle would reach 2, the largest cosine distance)."""
    if merges <= 0:
        return 0.0
    if merges >= len(heights):
        return ALL_MERGES_EPS
    middle = 0.5 * (heights[merges - 1] + heights[merges])
    return float(middle) if middle < 2.0 else ALL_MERGES_EPS


@dataclass
class Tolerance:
    """How close two channels must be to share a color: eps = 0 exact, else cosine clustering.

    ``heights``, when given, receives the sorted merge distances (average linkage on cosine
    distance) of each clustering's non-zero rows, whatever eps is: the thresholds at which the
    rows would merge further (the target search reads them). ``chosen``, when given, decides the
    colors :meth:`cluster` returns whatever the signatures (a layer whose merge was chosen
    otherwise: from calibration data, or by folding): a Coloring as it is, a Partition with
    the least-squares scales of :func:`fitted_scales`. ``trees``, when given, keeps the linkage
    trees of signatures seen before (a search re-analyses mostly unchanged layers), of up to
    ``FULL_TREE_ROWS`` rows where no heights or merges ask for a tree (wider ones are cut by
    :func:`threshold_clusters`, the same clusters). With
    ``merges``, eps is not known in advance (pass NaN): the first clustering settles it at the
    eps where its rows make that many merges (:func:`cut_eps` of its own tree), and ``eps``
    holds it from then on (:meth:`settle` settles it for a site that clustered no two rows)."""

    eps: float
    heights: list[np.ndarray] | None = field(default=None, compare=False)
    chosen: Coloring | Partition | None = field(default=None, compare=False)
    trees: TreeCache | None = field(default=None, compare=False)
    merges: int | None = None

    @property
    def key(self) -> str:
        """What decides the colors besides the signatures: the eps, or the merges to settle it by."""
        return repr(self.eps) if self.merges is None else f"merges {self.merges}"

    def settle(self, heights: np.ndarray) -> None:
        """Fix eps at :func:`cut_eps` of ``heights`` when it was to be settled by merges."""
        if self.merges is not None:
            self.eps, self.merges = cut_eps(heights, self.merges), None

    @property
    def exact(self) -> bool:
        return self.eps == 0.0

    def cluster(self, signatures: np.ndarray, *, overwrite: bool = False) -> Coloring:
        """Fibers of rows of ``signatures`` under the scale rule: direction decides the color.
        Exact colors take each row's norm as its scale; approximate ones (eps > 0 or chosen) the
        least-squares scales of :func:`fitted_scales`. All-zero rows form one color of their own
        (unless chosen otherwise). With ``overwrite`` (float64 signatures the caller no longer
        needs) the rows are normalised in place, saving a copy the size of the layer."""
        if isinstance(self.chosen, Coloring) and len(self.chosen) == len(signatures):
            return self.chosen
        sig = np.asarray(signatures, dtype=np.float64).reshape(len(signatures), -1)
        norms = row_norms(sig)
        scales = np.where((norms <= 1e-30) | ~np.isfinite(norms), 1.0, norms)
        normalised = self._normalise(sig, scales, overwrite)
        partition = self._partition(sig, norms, normalised)
        if self.exact and not isinstance(self.chosen, Partition):
            return Coloring(partition, scales)
        return Coloring(partition, fitted_scales(sig, partition, scales, normalised=normalised))

    def partition(self, signatures: np.ndarray, *, overwrite: bool = False) -> Partition:
        """The colors :meth:`cluster` gives, without the scales (opfibers need no more);
        ``overwrite`` as there."""
        if isinstance(self.chosen, Coloring) and len(self.chosen) == len(signatures):
            return self.chosen.partition
        sig = np.asarray(signatures, dtype=np.float64).reshape(len(signatures), -1)
        norms = row_norms(sig)
        scales = np.where((norms <= 1e-30) | ~np.isfinite(norms), 1.0, norms)
        return self._partition(sig, norms, self._normalise(sig, scales, overwrite))

    @staticmethod
    def _normalise(sig: np.ndarray, scales: np.ndarray, overwrite: bool) -> bool:
        """Divide ``sig`` by ``scales`` row by row in place, with ``overwrite`` where ``sig`` is
        writable (it is float64 already); whether it did."""
        if overwrite and sig.flags.writeable:
            np.divide(sig, scales[:, None], out=sig)
            return True
        return False

    def _partition(self, rows: np.ndarray, norms: np.ndarray, normalised: bool = False) -> Partition:
        """Colors of signatures ``rows`` of norms ``norms`` (``normalised``: already divided by
        them where they are finite and non-zero)."""
        if isinstance(self.chosen, Partition) and len(self.chosen) == len(rows):
            return self.chosen
        labels = np.arange(len(rows), dtype=np.int64) + len(rows)  # non-finite rows: colors of their own
        labels[norms <= 1e-30] = -1  # all-zero rows: one color
        live = np.flatnonzero(np.isfinite(norms) & (norms > 1e-30))
        if live.size:
            unit = rows if live.size == len(rows) else rows[live]
            if not normalised:
                unit = unit / norms[live, None]
            wants_tree = self.heights is not None or self.merges is not None
            cached_tree = self.trees is not None and not self.exact and live.size <= FULL_TREE_ROWS
            if live.size > 1 and (wants_tree or cached_tree):  # wider rows: no quadratic tree unless wanted
                tree = self.trees.tree(unit) if self.trees is not None else average_linkage(unit)
                distances = np.maximum.accumulate(tree[:, 2])
                if self.heights is not None:
                    self.heights.append(distances)
                self.settle(distances)
                if not self.exact:
                    labels[live] = fcluster(tree, t=self.eps, criterion="distance")
                elif distances[0] > apart_distance(unit.shape[1]):  # no two rows equal: each its own
                    labels[live] = np.arange(live.size)
                else:
                    labels[live] = self._equal(unit, EXACT_TOL)
            elif self.exact or live.size == 1:
                labels[live] = self._equal(unit, EXACT_TOL)
            else:
                labels[live] = threshold_clusters(unit, self.eps)
        return Partition(labels)

    def split_by_rows(self, coloring: Coloring, keys: np.ndarray) -> Coloring:
        """Refine so channels of one color also agree on their key rows (relative tolerance)."""
        keys = np.asarray(keys, dtype=np.float64).reshape(len(coloring), -1)
        magnitude = float(np.max(np.abs(keys))) if keys.size else 0.0
        tol = (EXACT_TOL if self.exact else self.eps) * max(magnitude, 1e-30)
        keyed = Partition(self._equal(keys, tol))
        return coloring.with_partition(coloring.partition.meet(keyed))

    def unit(self, coloring: Coloring) -> Coloring:
        """Refine by scale so each color is truly synchronized (before a non-homogeneous op)."""
        if coloring.is_unit:
            return coloring
        log_scales = np.log(coloring.scales)[:, None]
        tol = EXACT_TOL if self.exact else self.eps
        keyed = Partition(self._equal(log_scales, tol))
        return Coloring(coloring.partition.meet(keyed), np.ones(len(coloring)))

    def _equal(self, rows: np.ndarray, tol: float) -> np.ndarray:
        """:func:`equal_row_labels`, through ``trees`` when given."""
        return self.trees.equal_labels(rows, tol) if self.trees is not None else equal_row_labels(rows, tol)
