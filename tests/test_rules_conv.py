"""Convolution and layout rules on hand-built graphs with a planted channel lift.

Truth: the base network's parameter count (known by construction) and the original model's
outputs in onnxruntime. Channel lifts copy a producer's output channels (kernel, bias, batch
norm statistics) and split the consumer's input-channel kernels by fractions summing to 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, compress_and_compare, lift_map

CIN, C, D = 3, 4, 5


def conv_pair(rng, spatial_dims=2, extra=3):
    """Base weights of conv(CIN->C) and conv(C->D), and their lifted versions."""
    k = (3,) * spatial_dims
    w1, b1 = rng.standard_normal((C, CIN, *k)), rng.standard_normal(C)
    w2, b2 = rng.standard_normal((D, C, *k)), rng.standard_normal(D)
    source, share = lift_map(rng, C, extra)
    expand = (None, slice(None)) + (None,) * spatial_dims
    lifted = (w1[source], b1[source], w2[:, source] * share[expand])
    return (w1, b1, w2, b2), lifted, source


def size(*arrays):
    return sum(np.size(a) for a in arrays)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_conv_any_rank_collapses_to_the_base(spatial_dims):
    rng = np.random.default_rng(spatial_dims)
    (w1, b1, w2, b2), (lw1, lb1, lw2), _ = conv_pair(rng, spatial_dims)
    g = Builder()
    pads = [1] * (2 * spatial_dims)
    h = g.op("Relu", [g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=pads)])
    y = g.op("Conv", [h, g.const(lw2), g.const(b2)], strides=[2] * spatial_dims)
    shape = [2, CIN] + [6] * spatial_dims
    model = g.model({"x": shape}, y, None)
    x = rng.standard_normal(shape).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, w2, b2)


def test_batch_norm_pooling_flatten_and_a_dense_head():
    rng = np.random.default_rng(10)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng)
    stats = [rng.uniform(0.5, 2.0, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.5, 2.0, C)]
    head = rng.standard_normal((D, C * 4))  # after a 2x2 max pool of 4x4 maps: features (c, s), s < 4
    frac = 1.0 / np.bincount(source)[source]
    lifted_head = head.reshape(D, C, 4)[:, source, :] * frac[None, :, None]
    g = Builder()
    h = g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])
    h = g.op("BatchNormalization", [h, *(g.const(s[source]) for s in stats)], epsilon=1e-3)
    h = g.op("MaxPool", [g.op("Relu", [h])], kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("Gemm", [g.op("Flatten", [h], axis=1), g.const(lifted_head.reshape(D, -1)), g.const(np.zeros(D))], transB=1)
    model = g.model({"x": [2, CIN, 4, 4]}, y, [2, D])
    x = rng.standard_normal((2, CIN, 4, 4)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, *stats, head) + D


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_narrows_with_its_input(multiplier):
    rng = np.random.default_rng(20 + multiplier)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng)
    dw = rng.standard_normal((C * multiplier, 1, 3, 3))
    dwb = rng.standard_normal(C * multiplier)
    rows = (source[:, None] * multiplier + np.arange(multiplier)).ravel()  # output o = c*mult + k
    pw = rng.standard_normal((D, C * multiplier, 1, 1))
    counts = np.bincount(source)[source]
    lifted_pw = pw[:, rows] / np.repeat(counts, multiplier)[None, :, None, None]
    g = Builder()
    h = g.op("Relu", [g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])])
    h = g.op("Clip", [g.op("Conv", [h, g.const(dw[rows]), g.const(dwb[rows])], group=len(source), pads=[1, 1, 1, 1]),
                      g.const(np.array(0.0)), g.const(np.array(6.0))])
    y = g.op("Conv", [h, g.const(lifted_pw), g.const(np.zeros(D))])
    model = g.model({"x": [1, CIN, 5, 5]}, y, None)
    x = rng.standard_normal((1, CIN, 5, 5)).astype(np.float32)
    _, out, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, dw, dwb, pw) + D + 2
    group = next(n for n in out.graph.node if n.op_type == "Conv" and any(a.name == "group" for a in n.attribute))
    assert next(a.i for a in group.attribute if a.name == "group") == C


def test_conv_transpose_and_resize_with_sizes():
    rng = np.random.default_rng(30)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng)
    counts = np.bincount(source)[source]
    up = rng.standard_normal((C, D, 2, 2))  # ConvTranspose kernel: [in, out, k, k]
    g = Builder(13)
    h = g.op("Tanh", [g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])])
    sizes = np.array([1, len(source), 8, 8], dtype=np.int64)
    h = g.op("Resize", [h, "", "", g.int_const(sizes)], mode="nearest")
    y = g.op("ConvTranspose", [h, g.const(up[source] / counts[:, None, None, None]), g.const(np.zeros(D))], strides=[2, 2])
    model = g.model({"x": [1, CIN, 4, 4]}, y, None)
    x = rng.standard_normal((1, CIN, 4, 4)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, up) + D


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_concat_and_split_track_channel_ranges(opset):
    """Two lifted branches are concatenated, then split at a boundary the merge moves; the
    split sizes (attribute, input or an equal split made unequal) are rewritten."""
    rng = np.random.default_rng(40 + opset)
    wa, ba = rng.standard_normal((3, CIN, 3, 3)), rng.standard_normal(3)
    wb, bb = rng.standard_normal((2, CIN, 3, 3)), rng.standard_normal(2)
    sa, sb = np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0])  # both lifted to 4: an equal split of 8
    wc, wd = rng.standard_normal((D, 3, 1, 1)), rng.standard_normal((D, 2, 1, 1))

    def share(s: np.ndarray) -> np.ndarray:
        return 1.0 / np.bincount(s)[s]

    g = Builder(opset)
    a = g.op("Relu", [g.op("Conv", ["x", g.const(wa[sa]), g.const(ba[sa])])])
    b = g.op("Sigmoid", [g.op("Conv", ["x", g.const(wb[sb]), g.const(bb[sb])])])
    cat = g.op("Concat", [a, b], axis=1)
    if opset >= 18:
        left, right = g.multi("Split", [cat], 2, axis=1, num_outputs=2)
    elif opset >= 13:
        left, right = g.multi("Split", [cat, g.int_const(np.array([4, 4]))], 2, axis=1)
    else:
        left, right = g.multi("Split", [cat], 2, axis=1, split=[4, 4])
    y = g.op("Add", [g.op("Conv", [left, g.const(wc[:, sa] * share(sa)[None, :, None, None])]),
                     g.op("Conv", [right, g.const(wd[:, sb] * share(sb)[None, :, None, None])])])
    model = g.model({"x": [1, CIN, 4, 4]}, y, None)
    x = rng.standard_normal((1, CIN, 4, 4)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(wa, ba, wb, bb, wc, wd)  # split sizes are int64, not parameters


def test_slice_of_channels_and_reduction_over_space():
    rng = np.random.default_rng(50)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng, extra=4)
    order = np.argsort(source, kind="stable")  # lifted copies next to their source: slices stay whole
    source = source[order]
    lw1, lb1 = w1[source], b1[source]
    keep = int(np.searchsorted(source, 2))  # channels of sources 0 and 1
    head = rng.standard_normal((D, 2))
    counts = np.bincount(source)[source][:keep]
    g = Builder(13)
    h = g.op("Relu", [g.op("Conv", ["x", g.const(lw1), g.const(lb1)])])
    h = g.op("Slice", [h, g.int_const(np.array([0])), g.int_const(np.array([keep])), g.int_const(np.array([1]))])
    h = g.op("ReduceMean", [h], axes=[2, 3], keepdims=0)
    y = g.op("Gemm", [h, g.const(head[:, source[:keep]] / counts), g.const(np.zeros(D))], transB=1)
    model = g.model({"x": [2, CIN, 4, 4]}, y, [2, D])
    x = rng.standard_normal((2, CIN, 4, 4)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, head) + D


def test_grouped_conv_merges_inside_groups_keeping_groups_equal():
    """A group-2 conv reads a lifted tensor: copies are planted inside each group (2 per group),
    so both groups narrow by the same count; the grouped conv's own output is a lift too."""
    rng = np.random.default_rng(60)
    w1, b1 = rng.standard_normal((6, CIN, 3, 3)), rng.standard_normal(6)  # two groups of 3 channels
    within = [lift_map(rng, 3, 2) for _ in range(2)]
    rows = np.concatenate([g * 3 + s for g, (s, _) in enumerate(within)])
    grouped = rng.standard_normal((4, 3, 3, 3))  # 2 groups: 2 outputs each, reading 3 inputs each
    gb = rng.standard_normal(4)
    out_rows = np.array([0, 1, 0, 2, 3, 3])  # group 0 outputs 0,1 (+copy of 0); group 1 outputs 2,3 (+copy of 3)
    out_share = 1.0 / np.bincount(out_rows)[out_rows]
    lifted_grouped = np.concatenate([grouped[:2][:, within[0][0]] * within[0][1][None, :, None, None],
                                     grouped[2:][:, within[1][0]] * within[1][1][None, :, None, None]])
    lifted_grouped = np.concatenate([lifted_grouped[[0, 1, 0]], lifted_grouped[[2, 3, 3]]])
    head = rng.standard_normal((D, 4, 1, 1))
    g = Builder()
    h = g.op("Relu", [g.op("Conv", ["x", g.const(w1[rows]), g.const(b1[rows])])])
    h = g.op("Relu", [g.op("Conv", [h, g.const(lifted_grouped), g.const(gb[out_rows])], group=2)])
    y = g.op("Conv", [h, g.const(head[:, out_rows] * out_share[None, :, None, None])])
    model = g.model({"x": [1, CIN, 5, 5]}, y, None)
    x = rng.standard_normal((1, CIN, 5, 5)).astype(np.float32)
    analysis, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, grouped, gb, head)
    assert [layer.width_after for layer in analysis.layers] == [6, 4, D]


def test_transpose_to_channels_last_and_per_channel_prelu():
    rng = np.random.default_rng(70)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng)
    slope = rng.uniform(0.05, 0.3, C)
    head = rng.standard_normal((C, D))  # MatMul over the channels-last axis
    g = Builder()
    h = g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])
    h = g.op("PRelu", [h, g.const(slope[source][:, None, None])])
    h = g.op("Transpose", [h], perm=[0, 2, 3, 1])
    y = g.op("MatMul", [h, g.const(head[source] / np.bincount(source)[source][:, None])])
    model = g.model({"x": [2, CIN, 3, 3]}, y, None)
    x = rng.standard_normal((2, CIN, 3, 3)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, slope, head)


def test_opset_9_batch_norm_and_upsample():
    rng = np.random.default_rng(80)
    (w1, b1, w2, b2), (lw1, lb1, lw2), source = conv_pair(rng)
    stats = [rng.uniform(0.5, 2.0, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.5, 2.0, C)]
    g = Builder(9)
    h = g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])
    h = g.op("Relu", [g.op("BatchNormalization", [h, *(g.const(s[source]) for s in stats)])])
    h = g.op("Upsample", [h, g.const(np.array([1.0, 1.0, 2.0, 2.0]))], mode="nearest")
    y = g.op("Conv", [h, g.const(lw2), g.const(b2)])
    model = g.model({"x": [1, CIN, 3, 3]}, y, None)
    x = rng.standard_normal((1, CIN, 3, 3)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, *stats, w2, b2) + 4  # + Upsample's float scales


def test_opset_9_sum_residual_and_a_scale_given_through_unsqueeze():
    """Caffe2-era exports: residuals as the variadic Sum, per-channel scales as
    Mul(x, Unsqueeze(constant)); both are folded or understood, and the lift still collapses."""
    rng = np.random.default_rng(90)
    (w1, b1, _, _), (lw1, lb1, _), source = conv_pair(rng)
    w2, b2 = rng.standard_normal((C, C, 1, 1)), rng.standard_normal(C)
    scale = rng.uniform(0.5, 2.0, C)
    head = rng.standard_normal((D, C, 1, 1))
    counts = np.bincount(source)[source]
    g = Builder(9)
    a = g.op("Relu", [g.op("Conv", ["x", g.const(lw1), g.const(lb1)], pads=[1, 1, 1, 1])])
    b = g.op("Conv", [a, g.const(w2[source][:, source] / counts[None, :, None, None]), g.const(b2[source])])
    b = g.op("Mul", [b, g.op("Unsqueeze", [g.const(scale[source])], axes=[1, 2])])
    c = g.op("Relu", [g.op("Sum", [a, b])])
    y = g.op("Conv", [c, g.const(head[:, source] / counts[None, :, None, None])])
    model = g.model({"x": [1, CIN, 4, 4]}, y, None)
    x = rng.standard_normal((1, CIN, 4, 4)).astype(np.float32)
    _, _, params = compress_and_compare(model, {"x": x})
    assert params == size(w1, b1, w2, b2, scale, head)


def test_tensor_between_two_grouped_convs_respects_both_group_structures():
    """u is written by a group-2 conv and read by a group-3 conv. Channels 2 and 3 of u are
    equal but lie in different groups of the writer: they may not merge, although the reader
    would allow it (ShuffleNet-style stacks of grouped convs)."""
    rng = np.random.default_rng(100)
    w1 = rng.standard_normal((3, CIN, 3, 3))
    t_rows = np.array([0, 1, 2, 0, 1, 2])  # t[3:6] copies t[0:3]
    b = rng.standard_normal((6, 3, 1, 1))
    b[3] = b[2]  # u[3] (group 1, reading t[3:6]) equals u[2] (group 0, reading t[0:3])
    b[1], b[5] = b[0], b[4]  # merges inside the writer's groups, so every reader group merges one pair
    c = rng.standard_normal((6, 2, 1, 1))
    g = Builder()
    t = g.op("Relu", [g.op("Conv", ["x", g.const(w1[t_rows])])])
    u = g.op("Conv", [t, g.const(b)], group=2)  # read directly: one tensor, both group structures
    y = g.op("Conv", [u, g.const(c)], group=3)
    model = g.model({"x": [1, CIN, 4, 4]}, y, None)
    x = rng.standard_normal((1, CIN, 4, 4)).astype(np.float32)
    analysis, _, _ = compress_and_compare(model, {"x": x})
    assert [layer.width_after for layer in analysis.layers][1] == 6  # 2 and 3 apart, so no group may narrow
