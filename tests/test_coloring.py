"""Clustering of signatures: exact mode, the scale rule, tolerant mode, refinement by scale."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfib.coloring import Coloring, Tolerance, equal_row_labels
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
