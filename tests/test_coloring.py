"""Clustering of signatures: exact mode, the scale rule, tolerant mode, refinement by scale."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfib.coloring import Coloring, Tolerance, equal_row_labels, fitted_scales
from onnxfib.partition import Partition


def planted_rows(rng, n_base, copies, dim, scale=False):
    base = rng.standard_normal((n_base, dim))
    source = np.concatenate([np.arange(n_base), rng.integers(0, n_base, copies)])
    factors = np.exp(rng.uniform(-1, 1, len(source))) if scale else np.ones(len(source))
    return (base[source] * factors[:, None]).astype(np.float32), source, factors


@given(st.integers(1, 12), st.integers(0, 12), st.integers(2, 9), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_exact_mode_recovers_planted_copies(n_base, copies, dim, seed):
    rng = np.random.default_rng(seed)
    rows, source, _ = planted_rows(rng, n_base, copies, dim)
    coloring = Tolerance(0.0).cluster(rows)
    assert coloring.partition == Partition(source)


@given(st.integers(1, 12), st.integers(0, 12), st.integers(2, 9), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_scale_rule_groups_positive_multiples_and_records_the_factor(n_base, copies, dim, seed):
    rng = np.random.default_rng(seed)
    rows, source, factors = planted_rows(rng, n_base, copies, dim, scale=True)
    coloring = Tolerance(0.0).cluster(rows)
    assert coloring.partition == Partition(source)
    # within a color, the scales are proportional to the planted factors
    for color in range(coloring.partition.n_colors):
        members = coloring.partition.labels == color
        ratio = coloring.scales[members] / factors[members]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_negative_multiples_and_near_copies_are_not_exact_fibers():
    rng = np.random.default_rng(0)
    row = rng.standard_normal(20)
    rows = np.stack([row, -row, row + 1e-3 * rng.standard_normal(20), row])
    assert Tolerance(0.0).cluster(rows).partition.labels.tolist() == [0, 1, 2, 0]


def test_tolerant_mode_merges_near_copies_within_eps_only():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 30))
    noisy = np.repeat(centers, 4, axis=0) + 0.01 * rng.standard_normal((12, 30))
    coloring = Tolerance(0.05).cluster(noisy)
    assert coloring.partition == Partition(np.repeat(np.arange(3), 4))
    # cosine distance between the centers is far above 0.05
    assert Tolerance(1e-6).cluster(noisy).partition.is_discrete


def test_zero_rows_form_one_color():
    rows = np.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    assert Tolerance(0.0).cluster(rows).partition.labels.tolist() == [0, 1, 0]
    assert Tolerance(0.3).cluster(rows).partition.labels.tolist() == [0, 1, 0]


def test_unit_splits_colors_by_scale():
    coloring = Coloring(Partition([0, 0, 0, 1]), np.array([1.0, 2.0, 1.0, 5.0]))
    unit = Tolerance(0.0).unit(coloring)
    assert unit.partition.labels.tolist() == [0, 1, 0, 2]
    assert unit.is_unit


def test_relative_scales_are_one_where_a_color_agrees():
    coloring = Coloring(Partition([0, 0, 1, 1]), np.array([3.0, 3.0, 1.0, 3.0]))
    np.testing.assert_allclose(coloring.relative_scales(), [1.0, 1.0, 0.5, 1.5])


def test_split_by_rows_refines_by_key_values():
    coloring = Coloring(Partition([0, 0, 0, 0]), np.ones(4))
    split = Tolerance(0.0).split_by_rows(coloring, np.array([1.0, 1.0, 2.0, 1.0 + 1e-9]))
    assert split.partition.labels.tolist() == [0, 0, 1, 0]


@given(st.integers(1, 40), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_equal_row_labels_never_joins_rows_farther_than_tol(n, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 3, size=(n, 3)).astype(float)
    labels = equal_row_labels(rows, 0.5)
    for i in range(n):
        for j in range(n):
            assert (labels[i] == labels[j]) == bool(np.all(rows[i] == rows[j]))


@given(st.integers(2, 8), st.integers(3, 12), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_fitted_scales_are_the_leading_singular_fit_of_each_color(members, dim, seed):
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction *= 3 / np.linalg.norm(direction)
    rows = direction * rng.uniform(0.5, 2, (members, 1)) + 0.3 * rng.standard_normal((members, dim))
    stacked = np.vstack([rows, rng.standard_normal((1, dim))])
    partition = Partition([0] * members + [1])
    norms = np.linalg.norm(stacked, axis=1)
    scales = fitted_scales(stacked, partition, norms)
    u, s, _ = np.linalg.svd(rows)  # independent truth: the best rank-one fit of the color
    np.testing.assert_allclose(scales[:members], np.abs(u[:, 0] * s[0]), rtol=1e-8)
    assert scales[members] == norms[members]  # alone in its color

    def residual(weights: np.ndarray) -> float:  # rows fitted as weights_i * base (Plan.fit_base's base)
        base = weights @ rows / (weights @ weights)
        return float(np.linalg.norm(rows - np.outer(weights, base)))

    assert residual(scales[:members]) <= residual(norms[:members]) + 1e-9


def test_fitted_scales_equal_the_norms_for_proportional_rows_and_stay_positive():
    rng = np.random.default_rng(3)
    u = rng.standard_normal(6)
    factors = np.array([0.5, 1.0, 3.0])
    rows = np.vstack([factors[:, None] * u, -u])  # the last row points away from the color
    partition = Partition([0, 0, 0, 0])
    scales = fitted_scales(rows, partition, np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(scales[:3] / scales[0], factors / factors[0], rtol=1e-10)
    assert 0 < scales[3] <= 1e-4 * scales.max() * (1 + 1e-12)


def test_a_chosen_partition_takes_fitted_scales_from_the_signatures():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((5, 7))
    chosen = Partition([0, 0, 1, 1, 1])
    coloring = Tolerance(0.3, chosen=chosen).cluster(rows)
    assert coloring.partition == chosen
    np.testing.assert_allclose(coloring.scales, fitted_scales(rows, chosen, np.linalg.norm(rows, axis=1)))


@pytest.mark.parametrize("dims", [4, 300])
def test_exact_colors_read_from_a_tree_equal_the_max_norm_grouping(dims):
    """An exact clustering that builds the merge tree (a search records its distances) skips the
    max-norm grouping when the tree's closest pair proves no two rows equal; either way its
    colors are those of ``equal_row_labels`` on the unit rows: rows 0.4e-6 apart (after
    normalising) merge, rows 3e-6 apart do not."""
    rng = np.random.default_rng(dims)
    rows = rng.standard_normal((30, dims))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    for other, gap in ((4, 0.4e-6), (9, 3e-6)):
        rows[other] = rows[2]
        rows[other, 0] += gap
        rows[other] /= np.linalg.norm(rows[other])
    for chosen in (rows, np.delete(rows, [4, 9], axis=0)):
        heights: list[np.ndarray] = []
        colors = Tolerance(0.0, heights).cluster(chosen * 3.0).partition
        assert heights and colors == Partition(equal_row_labels(chosen, 1e-6))
    assert Tolerance(0.0, []).cluster(rows).partition.n_colors == 29


def test_non_finite_rows_stay_apart_without_a_numpy_warning():
    """Rows holding NaN or infinities are never grouped, equal finite rows still are, and numpy
    warns of nothing on the way (the warning would reach a CLI user's stderr)."""
    import warnings

    rows = np.array([[1.0, 0.0], [np.inf, 1.0], [1.0, 0.0], [np.nan, 0.0], [np.inf, 1.0], [-np.inf, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = equal_row_labels(rows, 0.1)
    assert labels.tolist() == [0, 1, 0, 3, 4, 5]
