"""The CNN benchmark baselines (benchmarks/cnn_baselines.py) on tiny CNNs: the network read from
torch and written to ONNX, widths and parameter counts reached, exactness at full width and on
planted duplicate filters, each method's choice of channels, and the im2col refit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cnn_baselines as cb  # noqa: E402

#: conv 2->4 3x3, conv 4->6 3x3, dense 6*2*2->5, dense 5->3, on 8x8 images
SIZES = (2, 4, 6, 5, 3)
WIDTHS = [3, 2, 4]


def random_cnn(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> list[cb.Layer]:
    rng = np.random.default_rng(seed)
    cin, c1, c2, f, out = sizes
    shapes = [(c1, cin, 3, 3), (c2, c1, 3, 3), (f, c2 * 4), (out, f)]
    return [(rng.standard_normal(s) / np.sqrt(np.prod(s[1:])), 0.1 * rng.standard_normal(s[0])) for s in shapes]


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, SIZES[0], 8, 8))


def expected_params(widths: list[int]) -> int:
    """Counted by hand: conv filters and biases, then the dense layers (4 positions per channel)."""
    c1, c2, f = widths
    return c1 * (SIZES[0] * 9 + 1) + c2 * (c1 * 9 + 1) + f * (c2 * 4 + 1) + SIZES[4] * (f + 1)


METHODS = {
    "random": lambda layers, widths: cb.random_prune(layers, widths, seed=3),
    "l2": cb.l2_prune,
    "fold": cb.fold,
    "fold_repair": lambda layers, widths: cb.fold(layers, widths, repair=True),
    "plain": cb.plain_collapse,
}


def test_from_torch_folds_batchnorm_and_matches_torch_and_onnx() -> None:
    torch.manual_seed(0)
    cin, c1, c2, f, out = SIZES
    model = torch.nn.Sequential(
        torch.nn.Conv2d(cin, c1, 3, padding=1), torch.nn.BatchNorm2d(c1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.BatchNorm2d(c2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * 4, f), torch.nn.ReLU(), torch.nn.Linear(f, out),
    )
    for bn in (model[1], model[5]):  # statistics and affine parameters far from the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    model.eval()
    x = images(16).astype(np.float32)
    with torch.no_grad():
        truth = model(torch.from_numpy(x)).numpy()
    layers = cb.from_torch(model)
    assert [w.shape for w, _ in layers] == [(c1, cin, 3, 3), (c2, c1, 3, 3), (f, c2 * 4), (out, f)]
    assert cb.widths_of(layers) == [c1, c2, f]
    np.testing.assert_allclose(cb.forward(layers, x), truth, atol=1e-5)
    sess = ort.InferenceSession(cb.to_onnx(layers).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], truth, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_widths_shapes_and_parameter_count(method: str) -> None:
    layers = random_cnn()
    reduced = METHODS[method](layers, WIDTHS)
    assert [w.shape for w, _ in reduced.layers] == [(3, 2, 3, 3), (2, 3, 3, 3), (4, 2 * 4), (3, 4)]
    assert [m.shape for m in reduced.maps] == [(3, 4), (2, 6), (4, 5)]
    assert cb.count_params(reduced.layers) == expected_params(WIDTHS)
    x = images(8)
    sess = ort.InferenceSession(cb.to_onnx(reduced.layers).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.astype(np.float32)})[0], cb.forward(reduced.layers, x),
                               atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_full_widths_keep_the_logits(method: str) -> None:
    layers = random_cnn(seed=2)
    x = images(32)
    reduced = METHODS[method](layers, list(SIZES[1:4]))
    assert cb.count_params(reduced.layers) == cb.count_params(layers)
    np.testing.assert_allclose(cb.forward(reduced.layers, x), cb.forward(layers, x), atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_rejects_impossible_widths(method: str) -> None:
    with pytest.raises(ValueError):
        METHODS[method](random_cnn(), [5, 2, 4])


def duplicated_cnn(seed: int = 4) -> tuple[list[cb.Layer], list[cb.Layer]]:
    """A base CNN 2 -> 3 -> 2 -> 3 units -> 3 outputs and its lift in which every conv channel and
    dense unit is present twice (equal filter and bias; the next layer reads each copy with half
    of the base's weights), so the lift computes exactly the base's logits."""
    base = random_cnn(seed, sizes=(2, 3, 2, 3, 3))
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = base
    twice = lambda n: np.repeat(np.arange(n), 2)  # noqa: E731
    lift = [
        (w1[twice(3)], b1[twice(3)]),
        (w2[twice(2)][:, twice(3)] / 2, b2[twice(2)]),
        (w3.reshape(3, 2, 4)[twice(3)][:, twice(2)].reshape(6, 16) / 2, b3[twice(3)]),
        (w4[:, twice(3)] / 2, b4),
    ]
    return base, lift


@pytest.mark.parametrize("method", ["fold", "fold_repair", "plain"])
def test_merging_planted_duplicate_filters_is_exact(method: str) -> None:
    base, lift = duplicated_cnn()
    x = images(64)
    np.testing.assert_allclose(cb.forward(lift, x), cb.forward(base, x), atol=1e-9)  # the lift is right
    reduced = METHODS[method](lift, [3, 2, 3])
    assert cb.count_params(reduced.layers) == cb.count_params(base)
    np.testing.assert_allclose(cb.forward(reduced.layers, x), cb.forward(base, x), atol=1e-9)
    assert np.all(reduced.maps[0].astype(bool).sum(1) == 2)  # each kept channel stands for one pair


def test_pruning_planted_duplicates_is_not_exact() -> None:
    """Keeping one copy of each pair drops half of what the next layer reads: the check above can fail."""
    base, lift = duplicated_cnn()
    x = images(64)
    pruned = cb._select(lift, [np.arange(0, 6, 2), np.arange(0, 4, 2), np.arange(0, 6, 2)])
    assert not np.allclose(cb.forward(pruned.layers, x), cb.forward(base, x), atol=1e-3)


def test_l2_pruning_keeps_largest_filters_and_their_blocks() -> None:
    layers = random_cnn(seed=5)
    w2, b2 = layers[1]
    norms = np.array([3.0, 1.0, 6.0, 2.0, 5.0, 4.0])
    w2 /= np.linalg.norm(w2.reshape(6, -1), axis=1)[:, None, None, None]
    w2 *= norms[:, None, None, None]
    reduced = cb.l2_prune(layers, [4, 3, 5])
    kept = [2, 4, 5]  # the three largest norms, in channel order
    np.testing.assert_array_equal(reduced.maps[1].argmax(1), kept)
    np.testing.assert_array_equal(reduced.layers[1][0], w2[kept][:, reduced.maps[0].argmax(1)])
    fc1 = layers[2][0].reshape(5, 6, 4)[:, kept].reshape(5, 12)  # all 5 units kept: only columns go
    np.testing.assert_array_equal(reduced.layers[2][0], fc1)


def test_fold_merges_by_filter_mean_and_block_sum() -> None:
    layers = random_cnn(seed=6)
    reduced = cb.fold(layers, [4, 3, 5])
    mean = reduced.maps[1]  # (3, 6): cluster means of conv2's channels
    np.testing.assert_allclose(reduced.layers[1][1], mean @ layers[1][1])
    members = mean > 0
    fc1 = layers[2][0].reshape(5, 6, 4)
    summed = np.stack([fc1[:, m].sum(1) for m in members], axis=1).reshape(5, 12)
    np.testing.assert_allclose(reduced.layers[2][0], reduced.maps[2] @ summed)  # fc1's own rows averaged


@pytest.mark.slow
def test_refit_recovers_weights_at_full_width_and_lowers_error() -> None:
    """At full width the im2col least squares must find the original filters again (exact targets,
    tiny ridge); narrowed, it must fit the calibration logits better than the pruned network."""
    layers = random_cnn(seed=7)
    x = images(300, seed=8)
    full = cb.refit(cb.l2_prune(layers, list(SIZES[1:4])), layers, x, ridge=1e-12)
    for (w, b), (w0, b0) in zip(full.layers, layers):
        np.testing.assert_allclose(w, w0, atol=1e-6)
        np.testing.assert_allclose(b, b0, atol=1e-6)
    pruned = cb.random_prune(layers, WIDTHS, seed=0)
    refit = cb.refit(pruned, layers, x, ridge=1e-6, batch=64)
    target = cb.forward(layers, x)
    before = np.mean((cb.forward(pruned.layers, x) - target) ** 2)
    after = np.mean((cb.forward(refit.layers, x) - target) ** 2)
    assert after < before
    np.testing.assert_array_equal(refit.layers[0][0], pruned.layers[0][0])
    assert cb.count_params(refit.layers) == expected_params(WIDTHS)


def test_fold_clusters_on_outgoing_weights_too() -> None:
    """conv2's channels have (almost) one incoming filter and bias; fc1 reads the even channels
    through one pattern and the odd ones through another: Model Folding must group by parity."""
    layers = random_cnn(seed=9)
    rng = np.random.default_rng(10)
    w2, b2 = layers[1]
    w2[:] = w2[0] + 1e-3 * rng.standard_normal(w2.shape)
    b2[:] = b2[0]
    patterns = 3 * rng.standard_normal((2, 5, 4))
    layers[2] = (patterns[np.arange(6) % 2].transpose(1, 0, 2).reshape(5, 24), layers[2][1])
    labels = cb.fold_labels(layers, [4, 2, 5])[1]
    assert len(set(labels[0::2])) == 1 and len(set(labels[1::2])) == 1 and labels[0] != labels[1]
