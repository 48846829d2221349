"""The lift utilities themselves: a lifted network computes the base network's function, has the
expected widths, and its clusters collapse (Eq. 10 / scale rule) back to the base weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifting import lift_layers, lift_mlp, lift_mlp_proportional, lift_sklearn_mlp, onnx_mlp
from planted_utils import digits, digits_standardized, ort_run, random_mlp

ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "leakyrelu"]


def _torch_out(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("sizes,extra", [([64, 10, 7, 10], [6, 9]), ([64, 5, 3], [11]), ([64, 8, 8, 8, 4], [3, 0, 8])])
def test_lift_mlp_same_function(activation, sizes, extra):
    base = random_mlp(sizes, activation, seed=sum(sizes))
    lifted = lift_mlp(base, extra, np.random.default_rng(1))
    widths = [m.out_features for m in lifted if isinstance(m, torch.nn.Linear)]
    assert widths == [w + e for w, e in zip(sizes[1:-1], extra)] + [sizes[-1]]
    X = digits_standardized()
    ref, got = _torch_out(base, X), _torch_out(lifted, X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("activation", ["relu", "leakyrelu"])
def test_lift_mlp_proportional_same_function(activation):
    base = random_mlp([64, 12, 9, 10], activation, seed=3)
    lifted = lift_mlp_proportional(base, [7, 5], np.random.default_rng(2))
    X = digits_standardized()
    ref, got = _torch_out(base, X), _torch_out(lifted, X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # The rows really are rescaled (not plain copies): some row norms differ from every base norm.
    w0 = lifted[0].weight.detach().numpy()
    base_norms = np.linalg.norm(base[0].weight.detach().numpy(), axis=1)
    assert np.min(np.abs(np.linalg.norm(w0, axis=1)[:, None] - base_norms[None, :]), axis=1).max() > 1e-3


def test_proportional_lift_refuses_non_homogeneous():
    with pytest.raises(TypeError):
        lift_mlp_proportional(random_mlp([4, 3, 2], "tanh", seed=0), [2], np.random.default_rng(0))


@pytest.mark.parametrize("proportional", [False, True])
def test_lift_layers_collapses_back(proportional):
    """Collapsing each cluster (rows: the source's direction, columns: scaled sum) is the base."""
    rng = np.random.default_rng(5)
    Ws = [rng.standard_normal((6, 4)), rng.standard_normal((5, 6)), rng.standard_normal((3, 5))]
    bs = [rng.standard_normal(6), rng.standard_normal(5), rng.standard_normal(3)]
    LW, Lb, lifts = lift_layers(Ws, bs, [4, 7], np.random.default_rng(0), proportional=proportional)
    assert [w.shape for w in LW] == [(10, 4), (12, 10), (3, 12)]
    cur_W = [w.copy() for w in LW]
    cur_b = [b.copy() for b in Lb]
    for layer, lift in enumerate(lifts):
        n = Ws[layer].shape[0]
        rows = np.zeros((n, cur_W[layer].shape[1]))
        bias = np.zeros(n)
        for i in range(n):
            members = np.flatnonzero(lift.source == i)
            rows[i] = np.mean(cur_W[layer][members] / lift.scale[members, None], axis=0)
            bias[i] = np.mean(cur_b[layer][members] / lift.scale[members])
        # Members of a cluster are scale * one common row and bias (a fiber, up to the scale rule).
        np.testing.assert_allclose(cur_W[layer], lift.scale[:, None] * rows[lift.source], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cur_b[layer], lift.scale * bias[lift.source], rtol=1e-12, atol=1e-12)
        cols = np.zeros((cur_W[layer + 1].shape[0], n))
        np.add.at(cols.T, lift.source, (cur_W[layer + 1] * lift.scale[None, :]).T)
        cur_W[layer], cur_b[layer], cur_W[layer + 1] = rows, bias, cols
        # Shares per cluster sum to 1.
        np.testing.assert_allclose(np.bincount(lift.source, weights=lift.fraction), np.ones(n))
        assert np.all(lift.fraction > 0)
    for w, ref in zip(cur_W, Ws):
        np.testing.assert_allclose(w, ref, rtol=1e-12, atol=1e-12)
    for b, ref in zip(cur_b, bs):
        np.testing.assert_allclose(b, ref, rtol=1e-12, atol=1e-12)


def test_lift_layers_validates_extra():
    Ws = [np.ones((3, 2)), np.ones((1, 3))]
    bs = [np.zeros(3), np.zeros(1)]
    with pytest.raises(ValueError):
        lift_layers(Ws, bs, [1, 1], np.random.default_rng(0))


@pytest.mark.parametrize("kind,activation", [("clf", "relu"), ("clf", "tanh"), ("clf", "logistic"), ("reg", "relu")])
def test_lift_sklearn_same_function(kind, activation):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    X, y = digits()
    X = X / 16.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "clf":
            est = MLPClassifier(hidden_layer_sizes=(10, 8), activation=activation, max_iter=30, random_state=0).fit(X, y)
        else:
            est = MLPRegressor(hidden_layer_sizes=(10, 8), activation=activation, max_iter=30, random_state=0).fit(X, np.eye(10)[y])
    lifted = lift_sklearn_mlp(est, [5, 4], np.random.default_rng(0))
    assert lifted.hidden_layer_sizes == (15, 12)
    assert [c.shape for c in lifted.coefs_] == [(64, 15), (15, 12), (12, 10)]
    if kind == "clf":
        np.testing.assert_allclose(lifted.predict_proba(X), est.predict_proba(X), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(lifted.predict(X), est.predict(X), rtol=1e-5, atol=1e-6)
    if activation == "relu":
        prop = lift_sklearn_mlp(est, [5, 4], np.random.default_rng(0), proportional=True)
        ref = est.predict_proba(X) if kind == "clf" else est.predict(X)
        got = prop.predict_proba(X) if kind == "clf" else prop.predict(X)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_gemm", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leakyrelu"])
def test_onnx_mlp_matches_numpy_lift(use_gemm, activation):
    rng = np.random.default_rng(0)
    Ws = [rng.standard_normal((9, 64)) * 0.2, rng.standard_normal((7, 9)), rng.standard_normal((4, 7))]
    bs = [rng.standard_normal(9), rng.standard_normal(7), rng.standard_normal(4)]
    LW, Lb, _ = lift_layers(Ws, bs, [5, 3], np.random.default_rng(1))
    X = digits_standardized()[:100]
    ref = ort_run(onnx_mlp(Ws, bs, activation, use_gemm=use_gemm), {"input": X})["logits"]
    got = ort_run(onnx_mlp(LW, Lb, activation, use_gemm=use_gemm), {"input": X})["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
