"""Per-rule propagation and rewriting on hand-built graphs with a planted lift.

Truth: the base network's parameter count (known by construction) and the original model's
outputs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, compress_and_compare, lift_map

from onnxfib.analysis import analyze
from onnxfib.rules import default_registry
from onnxfib.stats import count_parameters

K, N, M, EXTRA = 6, 5, 4, 3


def base_weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, K)), rng.standard_normal(N), rng.standard_normal((M, N)),
            rng.standard_normal(M), rng)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("weight_side", ["B", "A"])
def test_gemm_every_layout_collapses_to_the_base(trans_a, trans_b, alpha, beta, weight_side):
    w1, b1, w2, b2, rng = base_weights()
    source, share = lift_map(rng, N, EXTRA)
    lw1, lb1, lw2 = w1[source], b1[source], w2[:, source] * share
    g = Builder()
    attrs = dict(transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    batch = 7
    if weight_side == "B":  # activations are rows: x [batch, K] (or its transpose)
        x = np.random.default_rng(1).standard_normal((K, batch) if trans_a else (batch, K))
        stored1 = lw1 if trans_b else lw1.T
        h = g.op("Relu", [g.op("Gemm", ["x", g.const(stored1), g.const(lb1)], **attrs)])
        stored2 = w2 if False else (lw2 if trans_b else lw2.T)
        y = g.op("Gemm", [h, g.const(stored2), g.const(b2)], transB=trans_b, alpha=alpha, beta=beta)
        out_shape = [batch, M]
    else:  # activations are columns: x [K, batch] (or its transpose) on the right
        x = np.random.default_rng(1).standard_normal((batch, K) if trans_b else (K, batch))
        stored1 = lw1.T if trans_a else lw1
        h = g.op("Relu", [g.op("Gemm", [g.const(stored1), "x", g.const(lb1[:, None])], **attrs)])
        stored2 = lw2.T if trans_a else lw2
        y = g.op("Gemm", [g.const(stored2), h, g.const(b2[:, None])], transA=trans_a, alpha=alpha, beta=beta)
        out_shape = [M, batch]
    model = g.model({"x": list(x.shape)}, y, out_shape)
    _, _, params = compress_and_compare(model, {"x": x.astype(np.float32)})
    assert params == w1.size + b1.size + w2.size + b2.size


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("as_node", [False, True])
def test_matmul_weight_on_the_left_with_bias_and_constant_nodes(opset, as_node):
    w1, b1, w2, b2, rng = base_weights(1)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder(opset)
    z = g.op("Add", [g.op("MatMul", [g.const(w1[source], as_node=as_node), "x"]),
                     g.const(b1[source][:, None], as_node=as_node)])
    h = g.op("Tanh", [z])
    y = g.op("Add", [g.op("MatMul", [g.const(w2[:, source] * share, as_node=as_node), h]),
                     g.const(b2[:, None], as_node=as_node)])
    model = g.model({"x": [K, "batch"]}, y, [M, "batch"])
    x = np.random.default_rng(2).standard_normal((K, 9)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == w1.size + b1.size + w2.size + b2.size


def test_per_channel_constants_and_activations_merge_with_their_channels():
    w1, b1, w2, b2, rng = base_weights(2)
    source, share = lift_map(rng, N, EXTRA)
    scale, shift, slope, divisor = (rng.uniform(0.5, 2.0, N) for _ in range(4))
    g = Builder()
    z = g.op("Add", [g.op("MatMul", ["x", g.const(w1[source].T)]), g.const(b1[source])])
    z = g.op("Mul", [g.const(scale[source]), z])
    z = g.op("Sub", [z, g.const(shift[source])])
    z = g.op("PRelu", [z, g.const(slope[source])])
    z = g.op("Div", [z, g.const(divisor[source])])
    z = g.op("Dropout", [g.op("LeakyRelu", [z], alpha=0.1)])
    z = g.op("Sigmoid", [g.op("Identity", [z])])
    y = g.op("Add", [g.op("MatMul", [z, g.const((w2[:, source] * share).T)]), g.const(b2)])
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = np.random.default_rng(3).standard_normal((11, K)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == w1.size + b1.size + 4 * N + w2.size + b2.size


def test_erf_gelu_pattern_and_silu_product_rule():
    w1, b1, w2, b2, rng = base_weights(3)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    z = g.op("Gemm", ["x", g.const(w1[source]), g.const(b1[source])], transB=1)
    erf = g.op("Erf", [g.op("Div", [z, g.const(np.sqrt(2.0))])])
    gelu = g.op("Mul", [g.op("Mul", [z, g.op("Add", [erf, g.const(1.0)])]), g.const(0.5)])
    silu = g.op("Mul", [gelu, g.op("Sigmoid", [gelu])])
    y = g.op("Gemm", [silu, g.const(w2[:, source] * share), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = np.random.default_rng(4).standard_normal((5, K)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == w1.size + b1.size + w2.size + b2.size + 3  # + the pattern's three scalars


def proportional_model(activation: str, factors: np.ndarray, seed=4):
    """A one-hidden-layer net whose lifted rows are ``factors`` times their source row."""
    w1, b1, w2, b2, rng = base_weights(seed)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    z = g.op("Gemm", ["x", g.const(w1[source] * factors[:, None]), g.const(b1[source] * factors)], transB=1)
    h = g.op(activation, [z])
    y = g.op("Gemm", [h, g.const(w2[:, source] * share / factors), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    return model, (w1.size + b1.size + w2.size + b2.size)


def test_scale_rule_merges_proportional_rows_only_before_homogeneous_activations():
    factors = np.exp(np.random.default_rng(5).uniform(-1, 1, N + EXTRA))
    x = np.random.default_rng(6).standard_normal((8, K)).astype(np.float32)
    relu, base_params = proportional_model("Relu", factors)
    _, _, params = compress_and_compare(relu, {"x": x})
    assert params == base_params
    tanh, _ = proportional_model("Tanh", factors)
    _, _, params = compress_and_compare(tanh, {"x": x})
    assert params == count_parameters(tanh)  # tanh(s z) is not s tanh(z): nothing may merge
    # exact copies (factor 1) still merge before tanh
    tanh_copies, base_params = proportional_model("Tanh", np.ones(N + EXTRA))
    _, _, params = compress_and_compare(tanh_copies, {"x": x})
    assert params == base_params


def test_barrier_freezes_only_its_own_neighbourhood():
    rng = np.random.default_rng(7)
    wa, ba, wb, bb, wc, bc, wd, bd = (rng.standard_normal(s) for s in
                                      [(N, K), N, (N, N), N, (N, N), N, (M, N), M])
    sa, fa = lift_map(rng, N, EXTRA)
    sc, fc = lift_map(rng, N, EXTRA)
    g = Builder()
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(wa[sa]), g.const(ba[sa])], transB=1)])
    h = g.op("Gemm", [h, g.const(wb[:, sa] * fa), g.const(bb)], transB=1)
    h = g.op("Softmax", [h], axis=-1)  # barrier: its input keeps its width
    h = g.op("Tanh", [g.op("Gemm", [h, g.const(wc[sc]), g.const(bc[sc])], transB=1)])
    y = g.op("Gemm", [h, g.const(wd[:, sc] * fc), g.const(bd)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = rng.standard_normal((6, K)).astype(np.float32)
    analysis, _, params = compress_and_compare(model, {"x": x})
    assert params == sum(a.size for a in (wa, ba, wb, bb, wc, bc, wd, bd))
    frozen = [layer.frozen or "" for layer in analysis.layers]
    assert ["Softmax" in reason for reason in frozen] == [False, True, False, False]


def test_residual_add_merges_coupled_channels_together():
    rng = np.random.default_rng(8)
    w1, b1, w2, b2, w3, b3 = (rng.standard_normal(s) for s in [(N, K), N, (N, N), N, (M, N), M])
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    a = g.op("Relu", [g.op("Gemm", ["x", g.const(w1[source]), g.const(b1[source])], transB=1)])
    b = g.op("Gemm", [a, g.const(w2[source][:, source] * share), g.const(b2[source])], transB=1)
    c = g.op("Relu", [g.op("Add", [a, b])])
    y = g.op("Gemm", [c, g.const(w3[:, source] * share), g.const(b3)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = rng.standard_normal((6, K)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == sum(a.size for a in (w1, b1, w2, b2, w3, b3))


def test_cover_collapse_keeps_fibers_whose_errors_differ():
    """Neurons 0 and 1 share a fiber, but their outgoing columns point different ways: they are
    not one opfiber, so ``--symmetry cover`` keeps both while ``fiber`` merges them."""
    rng = np.random.default_rng(9)
    w1, b1 = rng.standard_normal((3, K)), rng.standard_normal(3)
    w2, b2 = rng.standard_normal((M, 3)), rng.standard_normal(M)
    source = np.array([0, 1, 2, 0])
    split = rng.standard_normal(M)
    lw2 = np.column_stack([w2[:, 0] - split, w2[:, 1], w2[:, 2], split])
    g = Builder()
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(w1[source]), g.const(b1[source])], transB=1)])
    y = g.op("Gemm", [h, g.const(lw2), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = rng.standard_normal((6, K)).astype(np.float32)
    fiber, _, fiber_params = compress_and_compare(model, {"x": x}, symmetry="fiber")
    cover, _, cover_params = compress_and_compare(model, {"x": x}, symmetry="cover")
    assert fiber_params == w1.size + b1.size + w2.size + b2.size
    assert cover_params == count_parameters(model)
    layer = fiber.layers[0]
    assert (layer.width, layer.fibers, layer.opfibers, layer.covers) == (4, 3, 4, 4)


def test_tolerant_mode_merges_near_copies_and_exact_mode_does_not():
    w1, b1, w2, b2, rng = base_weights(10)
    source, share = lift_map(rng, N, EXTRA)
    noise = 1e-3 * rng.standard_normal((N + EXTRA, K))
    g = Builder()
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(w1[source] + noise), g.const(b1[source])], transB=1)])
    y = g.op("Gemm", [h, g.const(w2[:, source] * share), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = rng.standard_normal((20, K)).astype(np.float32)
    _, _, exact = compress_and_compare(model, {"x": x}, eps=0.0)
    assert exact == count_parameters(model)
    _, _, tolerant = compress_and_compare(model, {"x": x}, eps=1e-3, rtol=0, atol=0.05)
    assert tolerant == w1.size + b1.size + w2.size + b2.size


def test_shared_constants_are_copied_not_corrupted():
    w1, b1, w2, b2, rng = base_weights(11)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    bias = g.const(b1[source])
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(w1[source]), bias], transB=1)])
    side = g.op("Gemm", ["x", g.const(rng.standard_normal((N + EXTRA, K))), bias], transB=1)
    y = g.op("Concat", [g.op("Gemm", [h, g.const(w2[:, source] * share), g.const(b2)], transB=1), side], axis=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M + N + EXTRA])
    x = rng.standard_normal((4, K)).astype(np.float32)
    compress_and_compare(model, {"x": x})


def test_activation_bias_in_gemm_is_a_barrier_not_an_error():
    w1, b1, w2, b2, rng = base_weights(12)
    g = Builder()
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(w1), g.const(b1)], transB=1)])
    y = g.op("Gemm", [h, g.const(w2), "c"], transB=1)
    model = g.model({"x": ["batch", K], "c": ["batch", M]}, y, ["batch", M])
    feeds = {"x": rng.standard_normal((3, K)).astype(np.float32),
             "c": rng.standard_normal((3, M)).astype(np.float32)}
    _, _, params = compress_and_compare(model, feeds)
    assert params == count_parameters(model)


def test_registry_refuses_duplicates_and_names_barriers():
    registry = default_registry()
    with pytest.raises(ValueError, match="Gemm"):
        registry.register("Gemm", lambda *a: None)
    assert ("", "MatMul") in registry.op_types()


def test_analysis_refuses_unknown_symmetry():
    w1, b1, w2, b2, _ = base_weights()
    g = Builder()
    y = g.op("Gemm", ["x", g.const(w1), g.const(b1)], transB=1)
    with pytest.raises(ValueError):
        analyze(g.model({"x": ["batch", K]}, y, ["batch", N]), eps=0.0, symmetry="orbit")


def test_shared_channel_uniform_constants_stay_shared_and_unchanged():
    """The dynamo exporter shares 0-D constants (GELU's sqrt 2) between layers: a collapse must
    neither copy nor reshape them."""
    w1, b1, w2, b2, rng = base_weights(13)
    s1, f1 = lift_map(rng, N, EXTRA)
    w_mid = rng.standard_normal((N, N))
    s2, f2 = lift_map(rng, N, EXTRA)
    g = Builder()
    scale = g.const(np.array(1.5))
    h = g.op("Tanh", [g.op("Mul", [g.op("Gemm", ["x", g.const(w1[s1]), g.const(b1[s1])], transB=1), scale])])
    h = g.op("Gemm", [h, g.const(w_mid[s2][:, s1] * f1), g.const(b1[s2])], transB=1)
    h = g.op("Tanh", [g.op("Mul", [h, scale])])
    y = g.op("Gemm", [h, g.const(w2[:, s2] * f2), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    x = rng.standard_normal((5, K)).astype(np.float32)
    _, out, params = compress_and_compare(model, {"x": x})
    assert params == w1.size + b1.size + w_mid.size + b1.size + w2.size + b2.size + 1
    assert [list(t.dims) for t in out.graph.initializer if t.name == scale] == [[]]


def test_scalar_constant_on_a_single_channel():
    """skl2onnx's binary head computes 1 - sigmoid(z) with a 0-D 1 on a width-1 channel."""
    rng = np.random.default_rng(14)
    g = Builder()
    z = g.op("Sigmoid", [g.op("Gemm", ["x", g.const(rng.standard_normal((1, K))), g.const(np.zeros(1))], transB=1)])
    y = g.op("Sub", [g.const(np.array(1.0)), z])
    model = g.model({"x": ["batch", K]}, y, ["batch", 1])
    _, _, params = compress_and_compare(model, {"x": rng.standard_normal((3, K)).astype(np.float32)})
    assert params == count_parameters(model)


def test_weights_reached_through_identity_are_constants():
    """The legacy torch exporter shares equal initializers through Identity nodes: the layer
    merges through them, and the other user of the shared weight keeps the original."""
    w1, b1, w2, b2, rng = base_weights(15)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    shared = g.const(w1[source].T)
    h = g.op("MatMul", ["x", g.op("Identity", [shared])])
    h = g.op("Relu", [g.op("Add", [h, g.op("Identity", [g.const(b1[source])])])])
    main = g.op("Gemm", [h, g.const(w2[:, source] * share), g.const(b2)], transB=1)
    y = g.op("Concat", [main, g.op("MatMul", ["x", shared])], axis=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M + N + EXTRA])
    _, _, params = compress_and_compare(model, {"x": rng.standard_normal((4, K)).astype(np.float32)})
    assert params == w1.size + b1.size + w2.size + b2.size + (N + EXTRA) * K


@pytest.mark.parametrize("decomposed", [False, True])
def test_layer_norm_output_fibers_reach_the_layers_reading_it(decomposed):
    """Channels 0 and 1 of the residual stream are synchronized; after LayerNormalization (with
    equal scale and bias on them) they still are, so rows of the next layer that split their
    weight differently between channels 0 and 1 form one fiber. The decomposed form keeps the
    stream's width (its reductions over channels are barriers); the fused op narrows it too, with
    weighted statistics (one weight per base channel and an epsilon)."""
    rng = np.random.default_rng(16)
    w1, b1 = rng.standard_normal((4, K)), rng.standard_normal(4)
    w1[1], b1[1] = w1[0], b1[0]
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    gamma[1], beta[1] = gamma[0], beta[0]
    w2, b2 = rng.standard_normal((3, 3)), rng.standard_normal(3)  # base: columns (ch0+ch1, ch2, ch3)
    source, share = lift_map(rng, 3, 2)
    split = rng.uniform(0, 1, len(source))
    lw2 = np.column_stack([w2[source, 0] * split, w2[source, 0] * (1 - split), w2[source, 1:]])
    w3 = rng.standard_normal((M, 3))
    g = Builder(17)
    h = g.op("Gemm", ["x", g.const(w1), g.const(b1)], transB=1)
    if decomposed:  # ReduceMean/Sub/Pow/Sqrt/Div, as older exporters write it
        d = g.op("Sub", [h, g.op("ReduceMean", [h], axes=[-1], keepdims=1)])
        var = g.op("ReduceMean", [g.op("Pow", [d, g.const(np.array(2.0))])], axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, g.const(np.array(1e-5))])])
        n = g.op("Add", [g.op("Div", [g.op("Mul", [d, g.const(gamma)]), std]), g.const(beta)])
    else:
        n = g.op("LayerNormalization", [h, g.const(gamma), g.const(beta)], axis=-1)
    z = g.op("Relu", [g.op("Gemm", [n, g.const(lw2), g.const(b2[source])], transB=1)])
    y = g.op("Gemm", [z, g.const(w3[:, source] * share), g.const(np.zeros(M))], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    analysis, _, params = compress_and_compare(model, {"x": rng.standard_normal((5, K)).astype(np.float32)})
    if decomposed:
        assert params == count_parameters(model) - 2 * (4 + 1) - 2 * M
        assert [layer.width_after for layer in analysis.layers] == [4, 3, M]
    else:  # channel 1 merges into 0: its row and bias, gamma and beta, the (merged) reader's
        merged = (K + 1) + 2 + 3 - (3 + 1)  # column go; 3 weights and an epsilon come
        assert params == count_parameters(model) - 2 * (4 + 1) - 2 * M - merged
        assert [layer.width_after for layer in analysis.layers] == [3, 3, M]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_hidden_units_collapse_with_a_shared_partition(op):
    """A planted lift of the hidden units of an ONNX LSTM (with peepholes) or GRU
    (linear_before_reset=0): rows copied in every gate, recurrent and head columns split."""
    rng = np.random.default_rng(17)
    gates, hidden, extra = (4, 5, 3) if op == "LSTM" else (3, 5, 3)
    w, r = rng.standard_normal((1, gates * hidden, K)), rng.standard_normal((1, gates * hidden, hidden)) / 2
    b = rng.standard_normal((1, 2 * gates * hidden))
    peep = rng.standard_normal((1, 3 * hidden))
    head = rng.standard_normal((hidden, M))
    source, share = lift_map(rng, hidden, extra)
    rows = np.concatenate([g * hidden + source for g in range(gates)])
    lifted_b = np.concatenate([blk * hidden + source for blk in range(2 * gates)])
    g = Builder(14)
    inputs = ["x", g.const(w[:, rows]), g.const(r[:, rows][:, :, source] * share), g.const(b[:, lifted_b])]
    if op == "LSTM":
        inputs += ["", "", "", g.const(peep[:, np.concatenate([p * hidden + source for p in range(3)])])]
    y = g.multi(op, inputs, 1, hidden_size=len(source))[0]
    h = g.op("Squeeze", [y, g.int_const(np.array([1]))])
    out = g.op("MatMul", [h, g.const(head[source] * share[:, None])])
    model = g.model({"x": [4, 2, K]}, out, [4, 2, M])
    x = rng.standard_normal((4, 2, K)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == w.size + r.size + b.size + head.size + (peep.size if op == "LSTM" else 0)


def test_a_tolerant_recurrent_layer_never_keeps_more_units_at_a_larger_eps(tmp_path):
    """A random bidirectional torch LSTM at a rising eps keeps ever fewer hidden units (refining
    at eps until stable did not: 48 of 64 at eps 1.1, 60 at 1.2), every collapse runs in ONNX
    Runtime with the original's output shape, and eps 0 keeps every unit (no exact symmetry)."""
    import onnx
    import onnxruntime as ort
    from planted_utils import export_torch
    from transformer_lifting import rnn_model

    path = export_torch(rnn_model("LSTM", seed=2, hidden_size=32, bidirectional=True), tmp_path / "lstm.onnx", 6,
                        seq=4)
    model = onnx.load(path)
    x = np.random.default_rng(3).standard_normal((2, 4, 6)).astype(np.float32)
    expected = ort.InferenceSession(path).run(None, {"input": x})[0]
    widths = []
    for eps in np.linspace(0.0, 1.9, 20):
        analysis = analyze(model, eps=float(eps), figures=False)
        (lstm,) = [layer for layer in analysis.layers if layer.op_type == "LSTM"]
        widths.append(lstm.width_after)
        session = ort.InferenceSession(analysis.collapse().SerializeToString())
        assert session.run(None, {"input": x})[0].shape == expected.shape
    assert widths[0] == 64 and widths[-1] < 16
    assert all(later <= earlier for earlier, later in zip(widths, widths[1:])), widths


def test_recurrent_layer_with_a_given_initial_state_is_left_alone():
    rng = np.random.default_rng(18)
    w, r = rng.standard_normal((1, 12, K)), rng.standard_normal((1, 12, 4))
    g = Builder(14)
    y = g.multi("GRU", ["x", g.const(w), g.const(r), "", "", "h0"], 1, hidden_size=4)[0]
    model = g.model({"x": [3, 2, K], "h0": [1, 2, 4]}, y, [3, 1, 2, 4])
    feeds = {"x": rng.standard_normal((3, 2, K)).astype(np.float32), "h0": rng.standard_normal((1, 2, 4)).astype(np.float32)}
    analysis, _, params = compress_and_compare(model, feeds)
    assert params == count_parameters(model) and analysis.layers == []


def attention_model(rng, heads=2, dim=3, extra=2, lift=True, break_key=None, packed=False, q_activation=None):
    """One attention block [B, S, E] with planted head-dimension lifts: each head gains
    ``extra`` Q/K dimensions (Q rows divided by the copy count, K rows copied, so every score
    is unchanged) and ``extra`` V dimensions (copied, output projection columns split).
    ``q_activation`` applies an op to Q after its projection."""
    e = 5
    wq, wk, wv = (rng.standard_normal((heads * dim, e)) for _ in range(3))
    bq, bk, bv = (rng.standard_normal(heads * dim) for _ in range(3))
    wo, bo = rng.standard_normal((e, heads * dim)), rng.standard_normal(e)
    base = sum(a.size for a in (wq, wk, wv, bq, bk, bv, wo, bo)) + 1  # + the score scale
    if lift:
        within = [lift_map(rng, dim, extra) for _ in range(heads)]
        rows = np.concatenate([h * dim + s for h, (s, _) in enumerate(within)])
        copies = np.concatenate([np.bincount(s)[s] for s, _ in within])
        share = np.concatenate([f for _, f in within])
        wq, bq = wq[rows] / copies[:, None], bq[rows] / copies
        wk, bk, wv, bv = wk[rows], bk[rows], wv[rows], bv[rows]
        wo = wo[:, rows] * share
        if break_key is not None:  # this K dimension is no longer a copy: its Q/K dims cannot merge
            wk[break_key] += 0.1
    width = wq.shape[0] // heads
    g = Builder(17)
    if packed:  # one projection, then Split (nn.MultiheadAttention, GPT-2)
        qkv = g.op("Add", [g.op("MatMul", ["x", g.const(np.vstack([wq, wk, wv]).T)]), g.const(np.concatenate([bq, bk, bv]))])
        q, k, v = g.multi("Split", [qkv, g.int_const(np.array([wq.shape[0]] * 3))], 3, axis=-1)
    else:
        q, k, v = (g.op("Add", [g.op("MatMul", ["x", g.const(w.T)]), g.const(b)]) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    if q_activation:
        q = g.op(q_activation, [q])
    split = g.int_const(np.array([0, 0, heads, width]))
    q = g.op("Transpose", [g.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [k, g.int_const(np.array([0, 0, -1, width]))])], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [v, g.int_const(np.array([0, 0, heads, width]))])], perm=[0, 2, 1, 3])
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), g.const(np.array(0.5))]), "mask"])
    o = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.int_const(np.array([0, 0, -1]))])
    y = g.op("Add", [g.op("MatMul", [o, g.const(wo.T)]), g.const(bo)])
    model = g.model({"x": [2, 4, e], "mask": [2, 1, 1, 4]}, y, [2, 4, e])
    feeds = {"x": rng.standard_normal((2, 4, e)).astype(np.float32),
             "mask": np.where(rng.uniform(size=(2, 1, 1, 4)) < 0.2, -1e4, 0).astype(np.float32)}
    return model, feeds, base


def test_attention_head_dimensions_merge_within_heads_keeping_heads_equal():
    model, feeds, base = attention_model(np.random.default_rng(19))
    analysis, out, params = compress_and_compare(model, feeds)
    assert params == base
    assert [layer.width_after for layer in analysis.layers] == [6, 6, 6, 5]
    assert [layer.blocks for layer in analysis.layers] == [2, 2, 2, 1]  # two heads; the projection is whole


def test_attention_without_planted_symmetry_is_unchanged():
    model, feeds, _ = attention_model(np.random.default_rng(20), lift=False)
    _, _, params = compress_and_compare(model, feeds)
    assert params == count_parameters(model)


def test_heads_keep_equal_widths_when_one_head_merges_less():
    """Head 1 loses one of its planted Q/K copies, so it keeps 4 dimensions; head 0 could merge
    down to 3 but must keep 4 too (one Reshape into heads), and the outputs stay exact."""
    rng = np.random.default_rng(21)
    model, feeds, _ = attention_model(rng, break_key=5 + 4)  # a planted copy in head 1
    analysis, _, _ = compress_and_compare(model, feeds)
    assert [layer.width_after for layer in analysis.layers] == [8, 8, 6, 5]


def test_tanh_approximated_gelu_with_pow():
    w1, b1, w2, b2, rng = base_weights(22)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder()
    z = g.op("Gemm", ["x", g.const(w1[source]), g.const(b1[source])], transB=1)
    inner = g.op("Add", [z, g.op("Mul", [g.op("Pow", [z, g.const(np.array(3.0))]), g.const(np.array(0.044715))])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(np.array(np.sqrt(2 / np.pi)))])])
    gelu = g.op("Mul", [g.op("Mul", [z, g.const(np.array(0.5))]), g.op("Add", [t, g.const(np.array(1.0))])])
    y = g.op("Gemm", [gelu, g.const(w2[:, source] * share), g.const(b2)], transB=1)
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    _, _, params = compress_and_compare(model, {"x": rng.standard_normal((5, K)).astype(np.float32)})
    assert params == w1.size + b1.size + w2.size + b2.size + 5  # + the pattern's five scalars


@pytest.mark.parametrize("reads_channels", [False, True])
def test_shape_of_an_activation_holds_its_width_only_when_the_channel_count_is_read(reads_channels):
    """Dynamic-axis exports read sizes back with Shape to build Reshape targets: reading the
    batch size leaves the channels free to merge; a use of the whole shape (here its product,
    added to the output) freezes them."""
    w1, b1, w2, b2, rng = base_weights(23)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder(13)
    h = g.op("Relu", [g.op("Gemm", ["x", g.const(w1[source]), g.const(b1[source])], transB=1)])
    size = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [h]), g.int_const(np.array(0))]), g.int_const(np.array([0]))])
    target = g.op("Concat", [size, g.int_const(np.array([-1]))], axis=0)
    y = g.op("Gemm", [g.op("Reshape", [h, target]), g.const(w2[:, source] * share), g.const(b2)], transB=1)
    if reads_channels:
        count = g.op("Cast", [g.op("ReduceProd", [g.op("Shape", [h])], keepdims=1)], to=1)
        y = g.op("Add", [y, count])
    model = g.model({"x": ["batch", K]}, y, ["batch", M])
    _, _, params = compress_and_compare(model, {"x": rng.standard_normal((3, K)).astype(np.float32)})
    assert params == (count_parameters(model) if reads_channels else w1.size + b1.size + w2.size + b2.size)


def test_reshape_of_leading_axes_passes_channels_gpt2_style():
    """GPT-2's Conv1D runs a Gemm on x.view(-1, C) and views the result back to [B, S, N]:
    Reshapes that keep the channel axis last and whole pass channels, and the target's
    channel count (a constant piece of a runtime Concat) is rewritten."""
    w1, b1, w2, b2, rng = base_weights(24)
    source, share = lift_map(rng, N, EXTRA)
    g = Builder(13)
    flat = g.op("Reshape", ["x", g.int_const(np.array([-1, K]))])
    leading = g.op("Slice", [g.op("Shape", ["x"]), g.int_const(np.array([0])), g.int_const(np.array([2]))])
    h = g.op("Gemm", [flat, g.const(w1[source]), g.const(b1[source])], transB=1)
    h = g.op("Reshape", [h, g.op("Concat", [leading, g.int_const(np.array([len(source)]))], axis=0)])
    h = g.op("Reshape", [g.op("Tanh", [h]), g.int_const(np.array([-1, len(source)]))])
    y = g.op("Gemm", [h, g.const(w2[:, source] * share), g.const(b2)], transB=1)
    model = g.model({"x": [2, 3, K]}, y, [6, M])
    _, _, params = compress_and_compare(model, {"x": rng.standard_normal((2, 3, K)).astype(np.float32)})
    assert params == w1.size + b1.size + w2.size + b2.size


def test_packed_qkv_projection_split_into_heads_collapses():
    """Q, K and V from one projection and a Split: the merged Q rows carry their multiplicity
    back through the Split to the packed weight."""
    model, feeds, base = attention_model(np.random.default_rng(25), packed=True)
    analysis, _, params = compress_and_compare(model, feeds)
    assert params == base
    assert [layer.width_after for layer in analysis.layers] == [18, 5]


def test_attention_merges_only_values_when_queries_cannot_carry_the_multiplicity():
    """Q goes through tanh after its projection, so nothing can scale merged Q dimensions by
    their count: Q and K keep every dimension (their copies stay), V and the output projection
    still merge, and the outputs stay exact."""
    model, feeds, _ = attention_model(np.random.default_rng(26), q_activation="Tanh")
    analysis, _, _ = compress_and_compare(model, feeds)
    assert [layer.width_after for layer in analysis.layers] == [10, 10, 6, 5]


@pytest.mark.parametrize("eps", [0.0, 0.4])
def test_a_depthwise_signature_in_block_rows_clusters_as_the_dense_signature(eps):
    """A depthwise Conv's signature (Eq. 3: each output channel's kernel in the block of its
    input channel's color) is clustered from ``block_rows``, which keeps its inner products in
    far fewer columns: the colors, merge distances and scales are those of the dense signature.
    The input has merged colors and a multiplier of 3 (and one channel alone in its color), and
    two output channels have proportional kernels."""
    from onnxfib.coloring import Tolerance
    from onnxfib.rules.conv import block_rows

    rng = np.random.default_rng(4)
    colors = np.append(np.repeat([0, 1, 1, 2, 3, 3, 3, 4], 3), 5)  # input color of each output channel
    kernels = rng.standard_normal((len(colors), 9))
    kernels[4] = 2.5 * kernels[3]  # channels 3 and 4 read color 1 through proportional kernels
    bias = rng.standard_normal((len(colors), 1))
    bias[4] = 2.5 * bias[3]
    dense = np.zeros((len(colors), colors.max() + 1, 9))
    dense[np.arange(len(colors)), colors] = kernels
    dense = np.hstack([dense.reshape(len(colors), -1), bias])
    compact = np.hstack([block_rows(kernels, colors), bias])
    assert compact.shape[1] <= len(colors) + 1 < dense.shape[1]  # at most a column per channel
    (expected, distances), (got, heights) = [(Tolerance(eps, recorded).cluster(rows), recorded)
                                             for rows, recorded in ((dense, []), (compact, []))]
    assert got.partition == expected.partition and got.partition.labels[3] == got.partition.labels[4]
    np.testing.assert_allclose(heights[0], distances[0], atol=1e-12)
    np.testing.assert_allclose(got.scales, expected.scales, rtol=1e-9)
