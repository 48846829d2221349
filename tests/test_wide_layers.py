"""Grouping at scale: exact duplicates among many wide rows, non-finite weights, average
linkage from a matrix product, and the thresholded clustering of wide layers, each against an
independent truth (planted copies, scipy's own average linkage, a brute-force check)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from planted_utils import ort_run
from scipy.cluster.hierarchy import fcluster, linkage

from onnxfib import coloring
from onnxfib.api import compress
from onnxfib.coloring import (
    Tolerance,
    TreeCache,
    average_linkage,
    equal_row_labels,
    threshold_clusters,
)
from onnxfib.partition import Partition
from onnxfib.rules import linear


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_exact_mode_recovers_near_copies_among_many_wide_rows():
    # Wide unit rows are where one sorted projection chains every row into one run: the
    # projections' gaps shrink with the width while the window they must allow grows.
    rng = np.random.default_rng(0)
    base = unit_rows(rng.standard_normal((2500, 2500)))
    source = np.concatenate([np.arange(2500), rng.integers(0, 2500, 300)])
    rows = base[source] + 1e-9 * rng.standard_normal((len(source), 2500))  # float-rounding copies
    assert Tolerance(0.0).cluster(rows).partition == Partition(source)


@given(st.integers(2, 60), st.integers(1, 4), st.floats(0.05, 2.0), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_equal_row_labels_groups_lie_within_tol_of_their_representative(n, dim, tol, seed):
    rng = np.random.default_rng(seed)
    rows = np.round(rng.uniform(0, 3, (n, dim)), 1)  # many near and equal rows, chains too
    labels = equal_row_labels(rows, tol)
    for label in np.unique(labels):  # a label is its representative's row index
        members = np.flatnonzero(labels == label)
        assert label in members and np.max(np.abs(rows[members] - rows[label])) <= tol
    # an isolated close pair (no third row within tol of either) always shares a label
    distance = np.max(np.abs(rows[:, None] - rows[None]), axis=2)
    for i in range(n):
        near = np.flatnonzero(distance[i] <= tol)
        if len(near) == 2:
            j = near[near != i][0]
            if np.count_nonzero(distance[j] <= tol) == 2:
                assert labels[i] == labels[j]


@given(st.integers(2, 400), st.integers(20, 300), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_equal_row_labels_recovers_near_copies_of_coarse_wide_rows(distinct, dim, seed):
    # Entries of only three values: one coordinate splits a set into at most three runs, so
    # the grouping must combine many coordinates before it sets rows apart.
    rng = np.random.default_rng(seed)
    base = np.unique(rng.integers(0, 3, (distinct, dim)).astype(np.float64), axis=0)
    source = np.concatenate([np.arange(len(base)), rng.integers(0, len(base), len(base) // 2 + 1)])
    rows = base[source] + rng.uniform(-0.03, 0.03, (len(source), dim))  # copies within 0.06 of each other
    assert Partition(equal_row_labels(rows, 0.1)) == Partition(source)


def test_non_finite_rows_are_never_grouped():
    rows = np.array([[1.0, 0.0], [1.0, 0.0], [np.nan, 0.0], [np.nan, 0.0], [np.inf, 1.0], [np.inf, 1.0]])
    labels = equal_row_labels(rows, 1e-6)
    assert labels[0] == labels[1] and len(set(labels[2:])) == 4 and labels[0] not in labels[2:]
    for eps in (0.0, 0.3):
        partition = Tolerance(eps).cluster(rows).partition
        assert partition.labels.tolist()[:2] == [0, 0] and partition.n_colors == 5


def nan_bias_model() -> onnx.ModelProto:
    """Gemm(W1=[[1,0],[1,0]], b1=[nan,0]) -> Relu -> Gemm: rows 0 and 1 would be one fiber but
    for the NaN bias (the defect report's case, which made exact grouping loop forever)."""
    w1, b1 = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), np.array([np.nan, 0.0], np.float32)
    w2, b2 = np.array([[1.0, 2.0]], np.float32), np.zeros(1, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc0", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu0"),
         helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc1", transB=1)],
        "nan_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"), (b2, "b2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("eps", ["0", "0.3"])
@pytest.mark.slow
def test_nan_weights_finish_and_are_reported(tmp_path, eps):
    onnx.save(nan_bias_model(), tmp_path / "nan.onnx")
    result = subprocess.run([sys.executable, "-m", "onnxfib", "inspect", "nan.onnx", "--eps", eps, "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["fc0"]["nonfinite"] == 1 and layers["fc0"]["fibers"] == 2
    assert layers["fc1"]["nonfinite"] == 0


def clustered_rows(seed: int, n: int, dims: int, centers: int = 40) -> np.ndarray:
    """Unit rows around random centers, each cluster at its own noise level (cosine distance
    to the center from about 0.01 to 0.6), so every eps cuts some clusters and not others."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, dims))
    noise = rng.uniform(0.1, 1.2, centers)
    member = rng.integers(0, centers, n)
    return unit_rows(middle[member] + noise[member, None] * rng.standard_normal((n, dims)))


@pytest.mark.parametrize("seed", range(3))
def test_average_linkage_is_scipys_cosine_average_linkage(seed):
    unit = clustered_rows(seed, 300, 40)
    ours, scipy_tree = average_linkage(unit), linkage(unit, method="average", metric="cosine")
    np.testing.assert_allclose(ours[:, 2], scipy_tree[:, 2], atol=1e-9)
    for eps in (0.1, 0.3, 0.6):
        assert Partition(fcluster(ours, t=eps, criterion="distance")) == Partition(
            fcluster(scipy_tree, t=eps, criterion="distance"))


@pytest.mark.parametrize("dims", [30, 1200])  # rows compared directly; on a random projection
@pytest.mark.parametrize("eps", [0.05, 0.3, 0.6])
def test_threshold_clusters_cut_average_linkage_exactly(monkeypatch, dims, eps):
    monkeypatch.setattr(coloring, "FULL_TREE_ROWS", 50)  # take the component path on 600 rows
    monkeypatch.setattr(coloring, "BLOCK_VALUES", 128 * max(600, dims))  # several blocks
    unit = clustered_rows(7, 600, dims)
    truth = fcluster(linkage(unit, method="average", metric="cosine"), t=eps, criterion="distance")
    found = threshold_clusters(unit, eps)
    assert Partition(found) == Partition(truth)
    assert 1 < Partition(truth).n_colors < len(unit)  # the cut merges some rows, not all


@pytest.mark.parametrize("dims", [30, 1200])
def test_threshold_clusters_joins_pairs_and_cuts_larger_components_as_average_linkage(monkeypatch, dims):
    """Near copies make components of two rows (joined without a tree) and of three or more
    (cut by average linkage): the labels are scipy's cut."""
    monkeypatch.setattr(coloring, "FULL_TREE_ROWS", 50)
    rng = np.random.default_rng(3)
    base = unit_rows(rng.standard_normal((400, dims)))
    copies = [base[i] + 0.35 * rng.standard_normal(dims) / np.sqrt(dims) for i in range(0, 200, 2)]
    chain = [base[5] + 0.3 * rng.standard_normal(dims) / np.sqrt(dims) for _ in range(3)]
    unit = unit_rows(np.vstack([base, *copies, *chain]))
    truth = Partition(fcluster(linkage(unit, method="average", metric="cosine"), t=0.1, criterion="distance"))
    sizes = truth.sizes()
    assert (sizes == 2).sum() >= 50 and sizes.max() >= 3  # both kinds of component are there
    assert Partition(threshold_clusters(unit, 0.1)) == truth


@pytest.mark.parametrize("index", [None, [5, 0, 99, 5, 42, 17, 63, 3, 88]])
def test_projected_pieces_are_the_matrix_product(monkeypatch, index):
    monkeypatch.setattr(coloring, "CHECK_VALUES", 2 * 40)  # gathers of two rows, inside pieces of four
    rng = np.random.default_rng(0)
    rows, projection = rng.standard_normal((100, 40)), rng.standard_normal((40, 6)).astype(np.float32)
    chosen = rows if index is None else rows[index]
    found = coloring.projected(rows, projection, 4, None if index is None else np.array(index))
    assert found.dtype == np.float32 and found.shape == (len(chosen), 6)
    np.testing.assert_allclose(found, chosen @ projection, rtol=1e-5, atol=1e-5)


def test_candidate_pairs_of_wide_rows_hold_every_close_pair_and_few_others():
    """Brute force: every pair within eps is a candidate, and the whole projection's screen
    leaves fewer than 2.5 times as many in all (its first half alone finds 2.9 times as many)."""
    unit = clustered_rows(11, 500, 1200)
    eps = 0.3
    close = np.argwhere(np.triu(unit @ unit.T >= 1.0 - eps, k=1))
    candidates = coloring.candidate_pairs(unit, eps, 64)
    assert {tuple(p) for p in close} <= {tuple(p) for p in candidates} and len(close) > 100
    assert len(candidates) < 2.5 * len(close)


def test_tree_cache_builds_each_distinct_tree_once():
    cache, unit = TreeCache(), clustered_rows(1, 50, 8)
    first = cache.tree(unit)
    assert cache.tree(unit.copy()) is first
    assert cache.tree(unit[::-1].copy()) is not first
    heights: list[np.ndarray] = []
    coloring_cached = Tolerance(0.3, heights, trees=cache).cluster(unit)
    assert coloring_cached.partition == Tolerance(0.3).cluster(unit).partition
    np.testing.assert_allclose(heights[0], np.maximum.accumulate(first[:, 2]))


def test_tree_cache_keeps_exact_labels_per_rows_and_tolerance():
    """Exact grouping through the cache gives equal_row_labels' labels, computed once per
    (rows, tolerance); a different tolerance is a different result."""
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((30, 6))
    rows[10:20] = rows[0] + 1e-3 * rng.standard_normal((10, 6))  # near copies of row 0
    cache = TreeCache()
    loose = cache.equal_labels(rows, 1e-2)
    np.testing.assert_array_equal(loose, equal_row_labels(rows, 1e-2))
    assert cache.equal_labels(rows.copy(), 1e-2) is loose
    strict = cache.equal_labels(rows, 1e-9)
    assert Partition(strict).n_colors == 30 and Partition(loose).n_colors == 20
    assert Tolerance(0.0, trees=cache).cluster(rows).partition == Tolerance(0.0).cluster(rows).partition


def test_tree_cache_drops_the_least_recently_used_beyond_its_budget():
    small, other, third = (clustered_rows(seed, 20, 4) for seed in (1, 2, 3))
    cache = TreeCache(budget=2 * average_linkage(small).nbytes)
    kept = cache.tree(small)
    dropped = cache.tree(other)
    assert cache.tree(small) is kept  # used again: now the most recent
    cache.tree(third)  # over budget: ``other`` goes, ``small`` stays
    assert cache.tree(small) is kept
    assert cache.tree(other) is not dropped  # built again


def planted_chain() -> tuple[onnx.ModelProto, int]:
    """Gemm (transB) -> Relu -> MatMul (weight [in, out]) + bias -> Relu -> Gemm, the hidden
    layers holding planted copies of channels; returns the model and its base's parameters."""
    rng = np.random.default_rng(3)
    w0, b0 = rng.standard_normal((24, 16)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    w0[16:], b0[16:] = w0[:8], b0[:8]  # hidden 1: 24 channels, base 16
    w1, b1 = rng.standard_normal((24, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    w1[:, 14:], b1[14:] = w1[:, :6], b1[:6]  # hidden 2: 20 channels, base 14 (columns: out axis 1)
    w2, b2 = rng.standard_normal((3, 20)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], transB=1),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], transB=1),
    ]
    weights = {"w0": w0, "b0": b0, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, (16 * 16 + 16) + (16 * 14 + 14) + (14 * 3 + 3)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_signatures_and_collapse_by_blocks_reach_the_planted_base_as_whole(monkeypatch, eps):
    # Wide layers are read and collapsed a block of rows (columns) at a time; with blocks of a
    # few channels the planted base must come back, match ORT on the original, and give the
    # very weights of one block per layer.
    model, base = planted_chain()
    whole = compress(model, eps=eps, input_shapes={"x": (5, 16)})
    monkeypatch.setattr(linear, "BLOCK_BYTES", 3 * 8 * 24)  # three rows of the widest weight
    monkeypatch.setattr(coloring, "SPREAD_BYTES", 16)
    blocked = compress(model, eps=eps, input_shapes={"x": (5, 16)})
    assert blocked.report.params_after == whole.report.params_after == base
    x = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    np.testing.assert_allclose(ort_run(blocked.model, {"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)
    for a, b in zip(whole.model.graph.initializer, blocked.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_a_tree_cache_keeps_no_tree_of_wide_rows_it_only_cuts(monkeypatch):
    """With a TreeCache but no merge distances asked for, rows wider than FULL_TREE_ROWS are cut
    by threshold_clusters (no quadratic tree is built or kept), into scipy's clusters."""
    monkeypatch.setattr(coloring, "FULL_TREE_ROWS", 50)
    unit = clustered_rows(5, 300, 24)
    cache = TreeCache()
    found = Tolerance(0.3, trees=cache).partition(unit)
    assert len(cache) == 0
    assert found == Partition(fcluster(linkage(unit, method="average", metric="cosine"), t=0.3, criterion="distance"))
    Tolerance(0.3, trees=cache, heights=[]).partition(unit)  # merge distances asked for: the tree
    assert len(cache) == 1
