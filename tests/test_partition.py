"""Partition algebra: properties that hold for every coloring (hypothesis), checked against
direct set-based definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfib.partition import Partition

labels = st.lists(st.integers(0, 4), min_size=1, max_size=25)


def same_color_pairs(p: Partition) -> set[tuple[int, int]]:
    """The equivalence relation of a partition, as a set of index pairs (the definition)."""
    return {(i, j) for i in range(len(p)) for j in range(len(p)) if p.labels[i] == p.labels[j]}


@st.composite
def pair_of_partitions(draw):
    n = draw(st.integers(1, 25))
    a = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    b = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    return Partition(a), Partition(b)


@given(labels)
def test_labels_are_canonical_and_keep_the_relation(raw):
    p = Partition(raw)
    assert p.labels[0] == 0
    # colors appear in order: each new color is one more than the largest seen so far
    assert all(p.labels[i] <= p.labels[:i].max(initial=-1) + 1 for i in range(len(p)))
    assert same_color_pairs(p) == {(i, j) for i in range(len(raw)) for j in range(len(raw)) if raw[i] == raw[j]}
    assert p.sizes().sum() == len(p) and len(p.sizes()) == p.n_colors == len(set(raw))


@given(pair_of_partitions())
def test_meet_is_the_intersection_of_relations(pair):
    a, b = pair
    m = a.meet(b)
    assert same_color_pairs(m) == same_color_pairs(a) & same_color_pairs(b)
    assert m == b.meet(a)
    assert m.is_finer_than(a) and m.is_finer_than(b)
    assert a.meet(a) == a
    assert a.meet(Partition.discrete(len(a))).is_discrete
    assert a.meet(Partition.uniform(len(a))) == a


@given(pair_of_partitions())
def test_finer_than_matches_definition(pair):
    a, b = pair
    expected = same_color_pairs(a) <= same_color_pairs(b)
    assert a.is_finer_than(b) == expected


@given(st.lists(labels, min_size=1, max_size=4))
def test_concat_keeps_parts_apart(raws):
    parts = [Partition(r) for r in raws]
    whole = Partition.concat(parts)
    assert len(whole) == sum(len(p) for p in parts)
    assert whole.n_colors == sum(p.n_colors for p in parts)
    offset = 0
    for p in parts:
        assert whole.restrict(slice(offset, offset + len(p))) == p
        offset += len(p)


@given(labels, st.integers(1, 5))
def test_flatten_colors_feature_by_channel_color_and_position(raw, spatial):
    p = Partition(raw)
    flat = p.flatten(spatial)
    assert len(flat) == len(p) * spatial
    for f in range(len(flat)):
        for g in range(len(flat)):
            same = p.labels[f // spatial] == p.labels[g // spatial] and f % spatial == g % spatial
            assert (flat.labels[f] == flat.labels[g]) == same


@given(labels, st.booleans(), st.sampled_from([0, 1]))
def test_reduce_sums_or_averages_each_color(raw, mean, axis):
    """Along the last axis (rows of samples) and along another, each color's sum or mean."""
    p = Partition(raw)
    values = np.random.default_rng(len(raw)).standard_normal((3, len(p)))
    out = p.reduce(values.T.copy(), 0, mean=mean).T if axis == 0 else p.reduce(values, 1, mean=mean)
    assert out.shape == (3, p.n_colors)
    for color in range(p.n_colors):
        members = values[:, p.labels == color]
        expected = members.mean(axis=1) if mean else members.sum(axis=1)
        np.testing.assert_allclose(out[:, color], expected)


@given(labels, st.booleans())
def test_reduce_along_a_middle_axis_sums_or_averages_each_color(raw, mean):
    """A weight block (out channels, in channels, rest) reduced over its in channels."""
    p = Partition(raw)
    values = np.random.default_rng(len(raw)).standard_normal((3, len(p), 2))
    out = p.reduce(values, 1, mean=mean)
    assert out.shape == (3, p.n_colors, 2)
    for color in range(p.n_colors):
        members = values[:, p.labels == color]
        expected = members.mean(axis=1) if mean else members.sum(axis=1)
        np.testing.assert_allclose(out[:, color], expected)


def test_from_rows_colors_equal_rows_alike():
    p = Partition.from_rows(np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]))
    assert p.labels.tolist() == [0, 1, 0, 1, 2]


def test_meet_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        Partition.discrete(3).meet(Partition.discrete(4))


@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_from_rows_of_integers_colors_equal_rows_alike(n, columns, seed):
    keys = np.random.default_rng(seed).integers(-2, 3, size=(n, columns))
    labels = Partition.from_rows(keys).labels
    for i in range(n):
        for j in range(n):
            assert (labels[i] == labels[j]) == bool(np.array_equal(keys[i], keys[j]))
