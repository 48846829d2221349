"""The benchmark baselines (benchmarks/baselines.py) on tiny hand-built MLPs: widths reached,
exactness where the network has exact duplicates, and each method's choice of units."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402

WIDTHS = [3, 2]


def random_mlp(sizes: list[int], seed: int = 0) -> list[baselines.Layer]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((o, i)), rng.standard_normal(o)) for i, o in zip(sizes[:-1], sizes[1:])]


def duplicated_mlp(seed: int = 0) -> list[baselines.Layer]:
    """5-6-4-3: hidden layer 1 is 3 distinct units each present twice, hidden layer 2 is 2 distinct
    units each present twice; duplicates share row, bias and outgoing column."""
    rng = np.random.default_rng(seed)
    first = np.repeat(np.arange(3), 2)
    second = np.repeat(np.arange(2), 2)
    w1, b1 = rng.standard_normal((3, 5))[first], rng.standard_normal(3)[first]
    w2, b2 = rng.standard_normal((2, 3))[second][:, first] / 2, rng.standard_normal(2)[second]
    w3, b3 = rng.standard_normal((3, 2))[:, second] / 2, rng.standard_normal(3)
    return [(w1, b1), (w2, b2), (w3, b3)]


METHODS = {
    "random": lambda layers, widths: baselines.random_prune(layers, widths, seed=1),
    "l2": baselines.l2_prune,
    "fold": baselines.fold,
    "fold_repair": lambda layers, widths: baselines.fold(layers, widths, repair=True),
    "plain": baselines.plain_collapse,
}


@pytest.mark.parametrize("method", METHODS)
def test_widths_and_parameter_count(method: str) -> None:
    layers = random_mlp([7, 9, 6, 4])
    reduced = METHODS[method](layers, WIDTHS)
    assert [w.shape for w, _ in reduced.layers] == [(3, 7), (2, 3), (4, 2)]
    assert [b.shape for _, b in reduced.layers] == [(3,), (2,), (4,)]
    assert [m.shape for m in reduced.maps] == [(3, 9), (2, 6)]
    assert baselines.count_params(reduced.layers) == 3 * 7 + 3 + 2 * 3 + 2 + 4 * 2 + 4


@pytest.mark.parametrize("method", METHODS)
def test_rejects_impossible_widths(method: str) -> None:
    with pytest.raises(ValueError):
        METHODS[method](random_mlp([7, 9, 6, 4]), [10, 2])


@pytest.mark.parametrize("method", ["fold", "fold_repair", "plain"])
def test_merging_exact_duplicates_keeps_outputs(method: str) -> None:
    layers = duplicated_mlp()
    x = np.random.default_rng(1).standard_normal((64, 5))
    reduced = METHODS[method](layers, WIDTHS)
    np.testing.assert_allclose(baselines.forward(reduced.layers, x), baselines.forward(layers, x), atol=1e-9)


def test_plain_collapse_averages_rows_without_scale_rule() -> None:
    """A unit twice another is one direction for the clustering, but plain averaging is not exact."""
    layers = random_mlp([4, 3, 2], seed=2)
    w, b = layers[0]
    w[1], b[1] = 2 * w[0], 2 * b[0]
    reduced = baselines.plain_collapse(layers, [2])
    merged = np.flatnonzero(reduced.maps[0][:, 0])[0]
    np.testing.assert_allclose(reduced.layers[0][0][merged], 1.5 * w[0])
    x = np.random.default_rng(3).standard_normal((32, 4))
    assert not np.allclose(baselines.forward(reduced.layers, x), baselines.forward(layers, x))


def test_l2_pruning_drops_smallest_norm_units() -> None:
    layers = random_mlp([4, 5, 3], seed=4)
    w, _ = layers[0]
    w[:] = np.arange(1, 6)[[3, 0, 4, 1, 2], None] * np.ones(4)  # norms rank 4, 1, 5, 2, 3
    reduced = baselines.l2_prune(layers, [2])
    np.testing.assert_array_equal(reduced.maps[0].argmax(1), [0, 2])
    np.testing.assert_array_equal(reduced.layers[1][0], layers[1][0][:, [0, 2]])


def test_random_pruning_is_seeded() -> None:
    layers = random_mlp([6, 40, 3])
    a, b = (baselines.random_prune(layers, [10], seed=7) for _ in range(2))
    c = baselines.random_prune(layers, [10], seed=8)
    np.testing.assert_array_equal(a.maps[0], b.maps[0])
    assert not np.array_equal(a.maps[0], c.maps[0])


def test_fold_repair_scales_merged_rows_only() -> None:
    layers = random_mlp([5, 8, 3], seed=5)
    plain = baselines.fold(layers, [3])
    repaired = baselines.fold(layers, [3], repair=True)
    sizes = plain.maps[0].astype(bool).sum(1)
    ratio = np.linalg.norm(repaired.layers[0][0], axis=1) / np.linalg.norm(plain.layers[0][0], axis=1)
    np.testing.assert_allclose(ratio[sizes == 1], 1.0)
    assert np.all(ratio[sizes > 1] > 1.0)
    np.testing.assert_array_equal(repaired.layers[0][1], plain.layers[0][1])


def test_refit_lowers_calibration_error() -> None:
    layers = random_mlp([6, 30, 20, 4], seed=6)
    x = np.random.default_rng(7).standard_normal((400, 6))
    pruned = baselines.random_prune(layers, [12, 8], seed=0)
    refit = baselines.refit(pruned, layers, x, ridge=1e-6)
    target = baselines.forward(layers, x)
    before = np.mean((baselines.forward(pruned.layers, x) - target) ** 2)
    after = np.mean((baselines.forward(refit.layers, x) - target) ** 2)
    assert after < before
    np.testing.assert_array_equal(refit.layers[0][0], pruned.layers[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", baselines.NAMES)
def test_draws_one_reduction_per_seed_for_the_seeded_baselines(name: str) -> None:
    """Random pruning and Model Folding (with or without REPAIR) are drawn once per seed, Model
    Folding once per given labelling; the others once. Every draw reaches the widths."""
    layers = random_mlp([6, 12, 8, 3], seed=4)
    widths = [5, 4]
    folds = baselines.fold_labels_per_seed(layers, widths)
    draws = baselines.draws(name, layers, widths, folds)
    seeded = name == "random pruning" or name.startswith("Model Folding")
    assert len(draws) == (baselines.SEEDS if seeded else 1)
    assert all([w.shape[0] for w, _ in d.layers[:-1]] == widths for d in draws)
    if name == "Model Folding":
        for labels, draw in zip(folds, draws):
            expected = baselines.fold(layers, widths, labels=labels)
            assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(draw.layers, expected.layers))


@pytest.mark.slow
def test_fold_labels_differ_between_seeds() -> None:
    """k-means lands on different optima for different seeds on unstructured units, which is why the
    benchmarks report Model Folding over several seeds."""
    folds = baselines.fold_labels_per_seed(random_mlp([6, 40, 8, 3], seed=5), [10, 4])
    first_seen = [np.unique(labels[0], return_index=True)[1] for labels in folds]
    partitions = {tuple(np.argsort(np.argsort(first))[labels[0]]) for first, labels in zip(first_seen, folds)}
    assert len(partitions) > 1


def test_draws_rejects_unknown_baseline() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.draws("magnitude", random_mlp([4, 3, 2]), [2], [])
