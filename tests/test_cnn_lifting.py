"""The CNN channel-lifting helpers themselves (tests/cnn_lifting.py), checked in torch only: a
lifted network computes its base's function to float rounding, has the expected widths, and
collapses (Eq. 10) back to the base parameters; broken lifts are caught."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from cnn_lifting import (
    TOPOLOGIES,
    ChannelMap,
    ConvBNAct,
    YOLOish,
    channel_map,
    collapse_channels,
    concat_maps,
    lift_channels,
    lift_model,
    train_briefly,
)


def _out(model, x):
    """The model's output computed in float64 on a copy, so the comparison does not depend on the
    machine's float32 summation order (CPUs differ in which convolution kernel they pick)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).numpy()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1.0))


# -------------------------------------------------------------------------------------- maps


def test_channel_map_properties():
    m = channel_map(5, 9, np.random.default_rng(0))
    assert m.n_base == 5 and m.n_lifted == 14
    assert np.array_equal(m.source[:5], np.arange(5))
    assert np.all(m.fraction > 0)
    sums = np.zeros(5)
    np.add.at(sums, m.source, m.fraction)
    np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-12)
    assert m.counts.sum() == 14 and np.all(m.counts >= 1)
    # No lift: identity map with unit fractions.
    m0 = channel_map(4, 0, np.random.default_rng(0))
    assert np.array_equal(m0.source, np.arange(4)) and np.allclose(m0.fraction, 1.0)


def test_concat_maps_offsets_sources():
    rng = np.random.default_rng(1)
    a, b, c = channel_map(3, 2, rng), channel_map(4, 3, rng), channel_map(2, 0, rng)
    m = concat_maps(a, b, c)
    assert m.n_base == 9 and m.n_lifted == 5 + 7 + 2
    assert np.array_equal(m.source, np.concatenate([a.source, b.source + 3, c.source + 7]))
    assert np.array_equal(m.fraction, np.concatenate([a.fraction, b.fraction, c.fraction]))


@pytest.mark.parametrize("source,fraction,n", [
    ([0, 1, 1], [1.0, 0.5, 0.6], 2),   # shares of channel 1 sum to 1.1
    ([0, 0], [0.5, 0.5], 2),           # base channel 1 has no copy
    ([0, 2], [1.0, 1.0], 2),           # out of range
    ([0, 1, 1], [1.0, 1.2, -0.2], 2),  # negative share
])
def test_channel_map_rejects_inconsistent_maps(source, fraction, n):
    with pytest.raises(ValueError):
        ChannelMap(np.array(source), np.array(fraction), n)


# ------------------------------------------------------------------------ single layers


def test_conv_producer_rows_and_consumer_split():
    """conv1 -> bn -> relu -> conv2: rows of conv1 and the BN copied, conv2's input slices split."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    train_bn_stats(base)
    lifted = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 2, 3, padding=1))
    m = channel_map(4, 3, np.random.default_rng(2))
    lift_channels(base, lifted, {"h": m}, {"0": (None, "h"), "1": "h", "3": ("h", None)})
    w0, w3 = base[0].weight.detach().numpy(), base[3].weight.detach().numpy()
    np.testing.assert_array_equal(lifted[0].weight.detach().numpy(), w0[m.source])
    np.testing.assert_array_equal(lifted[1].running_var.numpy(), base[1].running_var.numpy()[m.source])
    np.testing.assert_allclose(lifted[3].weight.detach().numpy(), w3[:, m.source] * m.fraction[None, :, None, None],
                               rtol=1e-6)
    x = torch.randn(5, 3, 8, 8)
    _close(_out(lifted, x), _out(base, x))


def test_conv_transpose_axis_order():
    """ConvTranspose weights are [in, out/groups, k, k]: axis 0 splits, axis 1 copies."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Tanh(),
                         nn.Conv2d(3, 2, 1))
    lifted = nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.ConvTranspose2d(6, 8, 2, stride=2), nn.Tanh(),
                           nn.Conv2d(8, 2, 1))
    rng = np.random.default_rng(3)
    maps = {"p": channel_map(4, 2, rng), "q": channel_map(3, 5, rng)}
    lift_channels(base, lifted, maps, {"0": (None, "p"), "2": ("p", "q"), "4": ("q", None)})
    x = torch.randn(4, 2, 5, 5)
    _close(_out(lifted, x), _out(base, x))


def test_depthwise_conv_copies_per_channel():
    torch.manual_seed(2)
    base = nn.Sequential(ConvBNAct(3, 4, act="relu6"), ConvBNAct(4, 4, groups=4, act="relu6"), nn.Conv2d(4, 2, 1))
    train_bn_stats(base)
    lifted = nn.Sequential(ConvBNAct(3, 9, act="relu6"), ConvBNAct(9, 9, groups=9, act="relu6"), nn.Conv2d(9, 2, 1))
    m = channel_map(4, 5, np.random.default_rng(4))
    spec = {"0.conv": (None, "c"), "0.bn": "c", "1.conv": "c", "1.bn": "c", "2": ("c", None)}
    lift_channels(base, lifted, {"c": m}, spec)
    dw_base, dw_lifted = base[1].conv.weight.detach().numpy(), lifted[1].conv.weight.detach().numpy()
    np.testing.assert_array_equal(dw_lifted, dw_base[m.source])
    x = torch.randn(4, 3, 6, 6)
    _close(_out(lifted, x), _out(base, x))


def test_grouped_conv_is_refused():
    base, lifted = nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(6, 6, 1, groups=2)
    wrapper_b, wrapper_l = nn.Sequential(base), nn.Sequential(lifted)
    with pytest.raises(NotImplementedError):
        lift_channels(wrapper_b, wrapper_l, {"g": channel_map(4, 2, np.random.default_rng(0))}, {"0": "g"})


def test_unmapped_shape_change_is_refused():
    base, lifted = nn.Sequential(nn.Conv2d(3, 4, 1)), nn.Sequential(nn.Conv2d(3, 6, 1))
    with pytest.raises(ValueError, match="no channel_spec entry"):
        lift_channels(base, lifted, {}, {})


def train_bn_stats(model, steps: int = 5):
    """Give BatchNorms non-trivial running statistics and affine parameters."""
    in_ch = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for _ in range(steps):
            model(torch.randn(16, in_ch, 8, 8))
    model.eval()


# ------------------------------------------------------------------------------ topologies


@pytest.fixture(scope="module")
def trained():
    """Each topology, briefly trained (seeded)."""
    models = {}
    for i, (name, cls) in enumerate(TOPOLOGIES.items()):
        base = cls()
        models[name] = train_briefly(base, base.input_shape, steps=20, batch=16, seed=10 + i)
    return models


@pytest.mark.slow  # trains every topology (module fixture)
@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_lifted_topology_same_function(trained, name):
    base = trained[name]
    lifted, maps = lift_model(base, base.default_extra, np.random.default_rng(20))
    assert lifted.widths == {g: w + base.default_extra[g] for g, w in base.widths.items()}
    assert _params(lifted) > _params(base)
    # BatchNorm statistics are real (training moved them), so the check is not trivially easy.
    bn = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bn)
    gen = torch.Generator().manual_seed(5)
    for scale in (1.0, 3.0):
        x = torch.randn(6, *base.input_shape, generator=gen) * scale
        ref, got = _out(base, x), _out(lifted, x)
        _close(got, ref)


@pytest.mark.slow  # trains every topology (module fixture)
@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_lifted_topology_collapses_to_base(trained, name):
    base = trained[name]
    lifted, maps = lift_model(base, base.default_extra, np.random.default_rng(21))
    back = collapse_channels(lifted, type(base)(widths=base.widths, **base.config), maps, base.channel_spec())
    for (k, v), (k2, v2) in zip(base.state_dict().items(), back.state_dict().items()):
        assert k == k2
        np.testing.assert_allclose(v2.double().numpy(), v.double().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow  # trains every topology (module fixture)
def test_yolo_chunk_variant_lifts_equal_halves(trained):
    base = YOLOish(split="chunk")
    base.load_state_dict(trained["yolo"].state_dict())
    base.eval()
    extra = {"a": 3, "b": 3, "y": 2, "c3": 1}
    lifted, _ = lift_model(base, extra, np.random.default_rng(22))
    x = torch.randn(4, *base.input_shape)
    _close(_out(lifted, x), _out(base, x))
    with pytest.raises(ValueError, match="equal halves"):
        lift_model(base, {"a": 1, "b": 2}, np.random.default_rng(22))


@pytest.mark.slow  # trains every topology (module fixture)
def test_lift_grows_only_listed_groups(trained):
    base = trained["resnet"]
    lifted, maps = lift_model(base, {"b1": 3}, np.random.default_rng(23))
    assert lifted.widths == {**base.widths, "b1": base.widths["b1"] + 3}
    assert maps["s"].n_lifted == maps["s"].n_base
    x = torch.randn(3, *base.input_shape)
    _close(_out(lifted, x), _out(base, x))
    with pytest.raises(KeyError):
        lift_model(base, {"nope": 1}, np.random.default_rng(0))


@pytest.mark.slow  # trains every topology (module fixture)
@pytest.mark.parametrize("breakage", ["no_split", "residual_maps_differ"])
def test_broken_lift_changes_the_function(trained, breakage):
    """Sensitivity: the function check above would notice a wrong lift."""
    base = trained["resnet"]
    rng = np.random.default_rng(24)
    maps = {g: channel_map(w, 4, rng) for g, w in base.widths.items()}
    spec = base.channel_spec()
    if breakage == "no_split":
        # Consumer kernels not split: each copy passes on the whole original kernel.
        lifted = type(base)(widths={g: m.n_lifted for g, m in maps.items()}, **base.config)
        lift_channels(base, lifted, maps, spec)
        with torch.no_grad():
            cols = torch.from_numpy(1.0 / maps["b1"].fraction).float()
            lifted.b1c2.conv.weight.mul_(cols[None, :, None, None])
    else:
        # The identity block's branch output uses another map than its shortcut.
        other = channel_map(base.widths["s"], 4, np.random.default_rng(99))
        assert not np.array_equal(other.source, maps["s"].source)
        lifted = type(base)(widths={g: m.n_lifted for g, m in maps.items()}, **base.config)
        lift_channels(base, lifted, {**maps, "s_branch": other}, {**spec, "b1c2.conv": ("b1", "s_branch"),
                                                                   "b1c2.bn": "s_branch"})
    x = torch.randn(4, *base.input_shape)
    ref, got = _out(base, x), _out(lifted, x)
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()
