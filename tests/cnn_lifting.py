"""Planted redundancy for convolutional networks: lift channels, the CNN analogue of tests/lifting.py.

Conv channels play the role of neurons (paper Eq. 15): the kernel ``W[o, i]`` between input
channel ``i`` and output channel ``o`` is one "weight". A *lift* adds channels to internal tensors
of a network. Each lifted tensor has a :class:`ChannelMap`: ``source[j]`` is the base channel that
lifted channel ``j`` copies and ``fraction[j]`` its share of that channel's outgoing kernels
(positive, summing to 1 over the copies of each base channel). Given the maps:

- producers index their *output* axis by ``source``: conv/linear rows (out-channel kernels) and
  biases, ConvTranspose ``weight[:, o]`` (its layout is ``[in, out/groups, k...]``), and every
  per-channel tensor of a BatchNorm (weight, bias, running mean and variance);
- consumers index their *input* axis by ``source`` and multiply it by ``fraction`` (the outgoing
  kernel is split among the copies): conv ``weight[:, i]``, ConvTranspose ``weight[i]``, linear
  columns;
- a depthwise conv (``groups == in == out``) maps input channel ``c`` to output channel ``c``, so
  its input and output are one lifted tensor: its kernels and biases are copied per channel (no
  split: each copy reads its own copy of the input);
- coupled tensors share one map: both summands of a residual Add, the input and output of BN,
  activations, pooling and depthwise convs;
- a Concat of lifted tensors has the concatenation of their maps (:func:`concat_maps`), and a
  Split/chunk of a lifted tensor restricts it (lift both halves of a ``chunk(2)`` by the same
  number of channels so the halves stay equal).

The lifted network computes the base's function (to float rounding) and collapsing its clusters
(rows by their mean, columns by their sum, DESIGN.md Eq. 10) gives back the base parameters.

A model describes its lift by ``channel_spec()``: module name -> group reference(s). A group
reference is ``None`` (not lifted: the network's input or output), a group name, or a tuple of
names (their concatenation, in order). Conv/Linear/ConvTranspose entries are ``(input, output)``
pairs; BatchNorm and depthwise conv entries are a single reference. The five topologies below are
parameterised by a ``widths`` dict keyed by group name, so ``type(model)(widths=lifted_widths)``
builds the lifted architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ChannelMap",
    "channel_map",
    "concat_maps",
    "lift_channels",
    "collapse_channels",
    "lift_model",
    "train_briefly",
    "torch_threads",
    "ConvBNAct",
    "ResNetish",
    "DenseNetish",
    "MobileNetish",
    "YOLOish",
    "UNetish",
    "TOPOLOGIES",
]


# ------------------------------------------------------------------------------ channel maps


@dataclass(frozen=True)
class ChannelMap:
    """Lifted channel ``j`` copies base channel ``source[j]`` and takes ``fraction[j]`` of its
    outgoing kernels; ``n_base`` is the base tensor's channel count."""

    source: np.ndarray
    fraction: np.ndarray
    n_base: int

    def __post_init__(self):
        source = np.asarray(self.source)
        if source.ndim != 1 or source.shape != np.shape(self.fraction):
            raise ValueError("source and fraction must be 1-D and of equal length")
        if source.size and (source.min() < 0 or source.max() >= self.n_base):
            raise ValueError(f"source entries must lie in [0, {self.n_base})")
        if np.unique(source).size != self.n_base:
            raise ValueError("every base channel needs at least one lifted channel")
        if np.any(np.asarray(self.fraction) <= 0):
            raise ValueError("fractions must be positive")
        totals = np.zeros(self.n_base)
        np.add.at(totals, source, self.fraction)
        if not np.allclose(totals, 1.0, rtol=0, atol=1e-12):
            raise ValueError("fractions must sum to 1 over the copies of each base channel")

    @property
    def n_lifted(self) -> int:
        return int(self.source.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """Number of lifted copies of each base channel (the cluster sizes)."""
        return np.bincount(self.source, minlength=self.n_base)


def channel_map(n: int, extra: int, rng: np.random.Generator) -> ChannelMap:
    """``n`` base channels plus ``extra`` copies of randomly chosen ones (``source[:n] ==
    arange(n)``); shares drawn from [0.5, 1.5] and normalised, so no share is tiny."""
    if n < 1 or extra < 0:
        raise ValueError(f"need n >= 1 and extra >= 0, got n={n}, extra={extra}")
    source = np.concatenate([np.arange(n), rng.integers(0, n, size=extra)]).astype(np.int64)
    raw = rng.uniform(0.5, 1.5, size=source.shape[0])
    totals = np.zeros(n)
    np.add.at(totals, source, raw)
    return ChannelMap(source=source, fraction=raw / totals[source], n_base=n)


def concat_maps(*maps: ChannelMap) -> ChannelMap:
    """The map of ``cat(t_1, ..., t_k)`` along channels: sources offset by the base widths before."""
    offsets = np.cumsum([0] + [m.n_base for m in maps[:-1]])
    return ChannelMap(
        source=np.concatenate([m.source + off for m, off in zip(maps, offsets)]),
        fraction=np.concatenate([m.fraction for m in maps]),
        n_base=int(sum(m.n_base for m in maps)),
    )


# ------------------------------------------------------------------------- parameter layouts


def _resolve(maps: Mapping[str, ChannelMap], ref) -> ChannelMap | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        return maps[ref]
    return concat_maps(*(maps[r] for r in ref))


def _layout(module: nn.Module, spec, maps) -> dict[str, dict[int, tuple[ChannelMap, bool]]]:
    """For each direct parameter/buffer of ``module``: axis -> (map, split?). Axes not listed
    are copied unchanged; an empty dict copies the tensor as it is."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        m = _resolve(maps, spec)
        per_channel = {0: (m, False)} if m is not None else {}
        return {"weight": per_channel, "bias": per_channel, "running_mean": per_channel,
                "running_var": per_channel, "num_batches_tracked": {}}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d)):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if module.groups == 1:
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise TypeError(f"a dense conv spec is an (input, output) pair, got {spec!r}")
            m_in, m_out = _resolve(maps, spec[0]), _resolve(maps, spec[1])
            in_axis, out_axis = (0, 1) if transposed else (1, 0)
            weight = {}
            if m_in is not None:
                weight[in_axis] = (m_in, True)
            if m_out is not None:
                weight[out_axis] = (m_out, False)
            return {"weight": weight, "bias": {0: (m_out, False)} if m_out is not None else {}}
        if module.groups == module.in_channels == module.out_channels:
            if isinstance(spec, tuple) and not (len(spec) == 2 and spec[0] == spec[1]):
                raise TypeError(f"a depthwise conv couples its input and output: one group, got {spec!r}")
            m = _resolve(maps, spec[0] if isinstance(spec, tuple) else spec)
            per_channel = {0: (m, False)} if m is not None else {}
            return {"weight": per_channel, "bias": per_channel}
        raise NotImplementedError(
            f"grouped conv with groups={module.groups}, in={module.in_channels}, out={module.out_channels}: "
            "only dense (groups=1) and depthwise (groups=in=out) convolutions lift")
    if isinstance(module, nn.Linear):
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise TypeError(f"a Linear spec is an (input, output) pair, got {spec!r}")
        m_in, m_out = _resolve(maps, spec[0]), _resolve(maps, spec[1])
        weight = {}
        if m_in is not None:
            weight[1] = (m_in, True)
        if m_out is not None:
            weight[0] = (m_out, False)
        return {"weight": weight, "bias": {0: (m_out, False)} if m_out is not None else {}}
    raise TypeError(f"no channel layout for {type(module).__name__}")


def _lift_tensor(t: np.ndarray, axes: dict[int, tuple[ChannelMap, bool]]) -> np.ndarray:
    for axis, (m, split) in axes.items():
        if t.shape[axis] != m.n_base:
            raise ValueError(f"axis {axis} of a {t.shape} tensor has {t.shape[axis]} channels, map has {m.n_base}")
        t = np.take(t, m.source, axis=axis)
        if split:
            shape = [1] * t.ndim
            shape[axis] = -1
            t = t * m.fraction.reshape(shape)
    return t


def _collapse_tensor(t: np.ndarray, axes: dict[int, tuple[ChannelMap, bool]]) -> np.ndarray:
    """Eq. 10 per axis: split axes (consumer columns) sum over a cluster, others take the mean."""
    for axis, (m, split) in axes.items():
        if t.shape[axis] != m.n_lifted:
            raise ValueError(f"axis {axis} of a {t.shape} tensor has {t.shape[axis]} channels, map has {m.n_lifted}")
        moved = np.moveaxis(t, axis, 0)
        out = np.zeros((m.n_base,) + moved.shape[1:], dtype=np.float64)
        np.add.at(out, m.source, moved)
        if not split:
            out /= m.counts.reshape((-1,) + (1,) * (out.ndim - 1))
        t = np.moveaxis(out, 0, axis)
    return t


def _transfer(src: nn.Module, dst: nn.Module, maps, spec: Mapping, fn) -> None:
    """Fill every parameter and buffer of ``dst`` from ``src`` through ``fn(tensor, axes)``."""
    src_modules = dict(src.named_modules())
    unused = set(spec) - set(src_modules)
    if unused:
        raise KeyError(f"channel_spec names modules the model does not have: {sorted(unused)}")
    for name, d in dst.named_modules():
        s = src_modules[name]
        tensors = dict(d.named_parameters(recurse=False)) | dict(d.named_buffers(recurse=False))
        if not tensors:
            continue
        layout = _layout(d, spec[name], maps) if name in spec else {}
        for tname, target in tensors.items():
            if target is None:
                continue
            value = getattr(s, tname).detach()
            axes = layout.get(tname, {})
            if not axes:
                if value.shape != target.shape:
                    raise ValueError(f"{name}.{tname}: {tuple(value.shape)} vs {tuple(target.shape)} and no "
                                     "channel_spec entry says how to map it")
                with torch.no_grad():
                    target.copy_(value)
                continue
            new = fn(value.double().numpy(), axes)
            if new.shape != tuple(target.shape):
                raise ValueError(f"{name}.{tname}: mapped to {new.shape}, the target has {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.ascontiguousarray(new)).to(target.dtype))


def lift_channels(base: nn.Module, lifted: nn.Module, maps: Mapping[str, ChannelMap], spec: Mapping) -> nn.Module:
    """Copy ``base``'s parameters and buffers into ``lifted`` (same class, wider tensors) through
    ``maps`` (group name -> :class:`ChannelMap`) and ``spec`` (module name -> group references, see
    the module docstring). Modules not in ``spec`` must have identical shapes and are copied.
    Returns ``lifted`` in eval mode."""
    _transfer(base, lifted, maps, spec, _lift_tensor)
    return lifted.eval()


def collapse_channels(lifted: nn.Module, base_like: nn.Module, maps: Mapping[str, ChannelMap],
                      spec: Mapping) -> nn.Module:
    """The inverse of :func:`lift_channels` (Eq. 10): write ``lifted``'s collapsed parameters into
    ``base_like`` (an instance with the base widths): rows, biases and BN tensors by their
    cluster mean, consumer columns by their cluster sum."""
    _transfer(lifted, base_like, maps, spec, _collapse_tensor)
    return base_like.eval()


def lift_model(base: nn.Module, extra: Mapping[str, int], rng: np.random.Generator):
    """Lift one of the topologies below: ``extra[g]`` copies added to group ``g``.

    Returns ``(lifted, maps)``; ``lifted`` is a new eval-mode instance of ``type(base)``."""
    unknown = set(extra) - set(base.widths)
    if unknown:
        raise KeyError(f"unknown channel groups {sorted(unknown)}; the model has {sorted(base.widths)}")
    maps = {g: channel_map(w, int(extra.get(g, 0)), rng) for g, w in base.widths.items()}
    widths = {g: m.n_lifted for g, m in maps.items()}
    lifted = type(base)(widths=widths, **base.config)
    return lift_channels(base, lifted, maps, base.channel_spec()), maps


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch with ``n`` intra-op threads, restoring the setting afterwards. Tiny models train
    and export much faster on one thread when the cores are shared (no spinning workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_briefly(model: nn.Module, input_shape: tuple[int, ...], steps: int = 30, batch: int = 32,
                  lr: float = 0.05, seed: int = 0) -> nn.Module:
    """A few SGD steps on seeded Gaussian images against a random teacher of the same
    architecture (MSE): moves the weights off their initialisation and gives the BatchNorms
    real running statistics. Returns ``model`` in eval mode."""
    with torch_threads(1):
        return _train(model, input_shape, steps, batch, lr, seed)


def _train(model, input_shape, steps, batch, lr, seed):
    torch.manual_seed(seed)
    teacher = type(model)(widths=model.widths, **model.config).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, *input_shape)
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -------------------------------------------------------------------------------- topologies


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation (``relu``, ``relu6``, ``silu`` or ``None``)."""

    ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, None: nn.Identity}

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str | None = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.ACTS[act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _cba(name: str, gin, gout) -> dict:
    return {f"{name}.conv": (gin, gout), f"{name}.bn": gout}


def _dw(name: str, g) -> dict:
    return {f"{name}.conv": g, f"{name}.bn": g}


class _Topology(nn.Module):
    """Common protocol: ``widths`` (group -> channels), ``config`` (other constructor kwargs),
    ``channel_spec()``, ``input_shape`` (C, H, W) and ``default_extra`` (a lift that grows
    every group)."""

    WIDTHS: dict[str, int] = {}
    input_shape: tuple[int, int, int] = (3, 16, 16)
    default_extra: dict[str, int] = {}

    def __init__(self, widths: Mapping[str, int] | None, **config):
        super().__init__()
        self.widths = dict(self.WIDTHS if widths is None else widths)
        if set(self.widths) != set(self.WIDTHS):
            raise KeyError(f"{type(self).__name__} needs widths for {sorted(self.WIDTHS)}")
        self.config = config


class ResNetish(_Topology):
    """Stem conv-bn-relu; a basic block with an identity shortcut; a stride-2 block with a
    1x1 conv + bn downsampling shortcut; global average pool, flatten, linear."""

    WIDTHS = {"s": 8, "b1": 8, "b2": 12, "d": 12}
    default_extra = {"s": 5, "b1": 4, "b2": 6, "d": 3}

    def __init__(self, widths=None, in_ch: int = 3, classes: int = 5):
        super().__init__(widths, in_ch=in_ch, classes=classes)
        w = self.widths
        self.input_shape = (in_ch, 16, 16)
        self.stem = ConvBNAct(in_ch, w["s"])
        self.b1c1 = ConvBNAct(w["s"], w["b1"])
        self.b1c2 = ConvBNAct(w["b1"], w["s"], act=None)
        self.b2c1 = ConvBNAct(w["s"], w["b2"], stride=2)
        self.b2c2 = ConvBNAct(w["b2"], w["d"], act=None)
        self.short = ConvBNAct(w["s"], w["d"], k=1, stride=2, act=None)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w["d"], classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1c2(self.b1c1(x)))
        x = F.relu(self.short(x) + self.b2c2(self.b2c1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def channel_spec(self):
        return {**_cba("stem", None, "s"), **_cba("b1c1", "s", "b1"), **_cba("b1c2", "b1", "s"),
                **_cba("b2c1", "s", "b2"), **_cba("b2c2", "b2", "d"), **_cba("short", "s", "d"),
                "fc": ("d", None)}


class DenseNetish(_Topology):
    """Stem; a dense block of two conv-bn-relu layers, each output concatenated to its input;
    a transition 1x1 conv-bn-relu + 2x2 average pool; global pool, flatten, linear."""

    WIDTHS = {"s": 8, "g1": 6, "g2": 6, "t": 10}
    default_extra = {"s": 4, "g1": 3, "g2": 5, "t": 4}

    def __init__(self, widths=None, in_ch: int = 3, classes: int = 5):
        super().__init__(widths, in_ch=in_ch, classes=classes)
        w = self.widths
        self.input_shape = (in_ch, 16, 16)
        self.stem = ConvBNAct(in_ch, w["s"])
        self.l1 = ConvBNAct(w["s"], w["g1"])
        self.l2 = ConvBNAct(w["s"] + w["g1"], w["g2"])
        self.trans = ConvBNAct(w["s"] + w["g1"] + w["g2"], w["t"], k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w["t"], classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = F.avg_pool2d(self.trans(x), 2)
        return self.fc(torch.flatten(self.pool(x), 1))

    def channel_spec(self):
        return {**_cba("stem", None, "s"), **_cba("l1", "s", "g1"), **_cba("l2", ("s", "g1"), "g2"),
                **_cba("trans", ("s", "g1", "g2"), "t"), "fc": ("t", None)}


class MobileNetish(_Topology):
    """Stem conv-bn-relu6; depthwise-separable block (depthwise 3x3 + bn + relu6, pointwise 1x1 +
    bn); inverted residual (1x1 expand + relu6, depthwise 3x3 + relu6, 1x1 linear projection,
    identity shortcut); 1x1 conv-bn-relu6; global pool, flatten, linear."""

    WIDTHS = {"c": 8, "d": 8, "e": 16, "f": 12}
    default_extra = {"c": 4, "d": 5, "e": 6, "f": 3}

    def __init__(self, widths=None, in_ch: int = 3, classes: int = 5):
        super().__init__(widths, in_ch=in_ch, classes=classes)
        w = self.widths
        self.input_shape = (in_ch, 16, 16)
        self.stem = ConvBNAct(in_ch, w["c"], stride=2, act="relu6")
        self.dw = ConvBNAct(w["c"], w["c"], groups=w["c"], act="relu6")
        self.pw = ConvBNAct(w["c"], w["d"], k=1, act=None)
        self.expand = ConvBNAct(w["d"], w["e"], k=1, act="relu6")
        self.dw2 = ConvBNAct(w["e"], w["e"], groups=w["e"], act="relu6")
        self.project = ConvBNAct(w["e"], w["d"], k=1, act=None)
        self.last = ConvBNAct(w["d"], w["f"], k=1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w["f"], classes)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = x + self.project(self.dw2(self.expand(x)))
        return self.fc(torch.flatten(self.pool(self.last(x)), 1))

    def channel_spec(self):
        return {**_cba("stem", None, "c"), **_dw("dw", "c"), **_cba("pw", "c", "d"), **_cba("expand", "d", "e"),
                **_dw("dw2", "e"), **_cba("project", "e", "d"), **_cba("last", "d", "f"), "fc": ("f", None)}


class YOLOish(_Topology):
    """Conv-bn-SiLU stem and stride-2 conv; a C2f block (1x1 conv, split into ``a`` and ``b``, a
    residual bottleneck on ``b``, concat ``[a, b, bottleneck(b)]``, 1x1 conv); a 1x1 conv head
    whose map is the output.

    ``split="split"`` uses ``torch.split(x, [a, b], 1)`` (Ultralytics' ``forward_split``; a Split
    with constant sizes in both exporters); ``split="chunk"`` uses ``x.chunk(2, 1)`` (Ultralytics'
    ``forward``; the legacy exporter computes the Slice bounds from the runtime Shape), which needs
    ``a == b``, so lift both halves by the same count."""

    WIDTHS = {"c1": 8, "c2": 12, "a": 6, "b": 6, "y": 6, "c3": 12}
    default_extra = {"c1": 4, "c2": 3, "a": 2, "b": 4, "y": 5, "c3": 4}

    def __init__(self, widths=None, in_ch: int = 3, out_ch: int = 6, split: str = "split"):
        super().__init__(widths, in_ch=in_ch, out_ch=out_ch, split=split)
        w = self.widths
        if split not in ("split", "chunk"):
            raise ValueError(f"split is 'split' or 'chunk', got {split!r}")
        if split == "chunk" and w["a"] != w["b"]:
            raise ValueError(f"chunk(2) needs equal halves, got a={w['a']}, b={w['b']}")
        self.split = split
        self.input_shape = (in_ch, 16, 16)
        self.stem = ConvBNAct(in_ch, w["c1"], act="silu")
        self.down = ConvBNAct(w["c1"], w["c2"], stride=2, act="silu")
        self.cv1 = ConvBNAct(w["c2"], w["a"] + w["b"], k=1, act="silu")
        self.m1 = ConvBNAct(w["b"], w["y"], act="silu")
        self.m2 = ConvBNAct(w["y"], w["b"], act="silu")
        self.cv2 = ConvBNAct(w["a"] + 2 * w["b"], w["c3"], k=1, act="silu")
        self.head = nn.Conv2d(w["c3"], out_ch, 1)

    def forward(self, x):
        x = self.cv1(self.down(self.stem(x)))
        if self.split == "chunk":
            a, b = x.chunk(2, 1)
        else:
            a, b = torch.split(x, [self.widths["a"], self.widths["b"]], 1)
        m = b + self.m2(self.m1(b))
        return self.head(self.cv2(torch.cat([a, b, m], 1)))

    def channel_spec(self):
        return {**_cba("stem", None, "c1"), **_cba("down", "c1", "c2"), **_cba("cv1", "c2", ("a", "b")),
                **_cba("m1", "b", "y"), **_cba("m2", "y", "b"), **_cba("cv2", ("a", "b", "b"), "c3"),
                "head": ("c3", None)}


class UNetish(_Topology):
    """Encoder: two conv-bn-relu (the skip), 2x2 max pool, conv-bn-relu, bottleneck conv-bn-relu;
    decoder: ConvTranspose 2x2 stride 2 (+ bias, relu), concat with the skip, conv-bn-relu; 1x1
    output conv. Input 1x28x28, output map 2x28x28."""

    WIDTHS = {"e1": 8, "s1": 8, "e2": 12, "b": 12, "u": 8, "d": 8}
    default_extra = {"e1": 3, "s1": 4, "e2": 5, "b": 4, "u": 6, "d": 3}

    def __init__(self, widths=None, in_ch: int = 1, out_ch: int = 2):
        super().__init__(widths, in_ch=in_ch, out_ch=out_ch)
        w = self.widths
        self.input_shape = (in_ch, 28, 28)
        self.enc1a = ConvBNAct(in_ch, w["e1"])
        self.enc1b = ConvBNAct(w["e1"], w["s1"])
        self.enc2 = ConvBNAct(w["s1"], w["e2"])
        self.bott = ConvBNAct(w["e2"], w["b"])
        self.up = nn.ConvTranspose2d(w["b"], w["u"], 2, stride=2)
        self.dec = ConvBNAct(w["u"] + w["s1"], w["d"])
        self.out = nn.Conv2d(w["d"], out_ch, 1)

    def forward(self, x):
        skip = self.enc1b(self.enc1a(x))
        x = self.bott(self.enc2(F.max_pool2d(skip, 2)))
        x = F.relu(self.up(x))
        return self.out(self.dec(torch.cat([x, skip], 1)))

    def channel_spec(self):
        return {**_cba("enc1a", None, "e1"), **_cba("enc1b", "e1", "s1"), **_cba("enc2", "s1", "e2"),
                **_cba("bott", "e2", "b"), "up": ("b", "u"), **_cba("dec", ("u", "s1"), "d"),
                "out": ("d", None)}


TOPOLOGIES = {
    "resnet": ResNetish,
    "densenet": DenseNetish,
    "mobilenet": MobileNetish,
    "yolo": YOLOish,
    "unet": UNetish,
}
