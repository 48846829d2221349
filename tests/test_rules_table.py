"""Every per-channel op rule on a tiny model per op, against a planted lift.

Truth: a producer whose output channels are copies of a base layer's (``lift_map``), read by a
consumer whose columns split the base's by shares summing to 1, so the lifted model computes the
base model exactly. Through an op that acts per channel, the copies must stay one fiber (the
partition ``source`` induces); the collapse must reproduce the lifted model in ONNX Runtime and
have the parameter count of the base model built directly. An op that declines must say why
(``Analysis.barriers``), and its neighbours keep their widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import Builder, compress_and_compare, lift_map

from onnxfib.analysis import analyze
from onnxfib.cli import main
from onnxfib.rules import Declined, Registry, Site, default_registry
from onnxfib.rules.axes import PadSite
from onnxfib.stats import count_parameters

CIN, BASE, EXTRA, OUT = 3, 4, 3, 2
OPSET = 20  # Gelu (20), Mish (18), reductions with an axes input (18)


@dataclass(frozen=True)
class Case:
    """One op applied to the producer's output ``h`` (channels on axis 1): ``inputs`` builds the
    op's other inputs, ``image`` says NCHW (else [N, C])."""

    op: str
    attrs: dict = field(default_factory=dict)
    inputs: Callable[[Builder], list[str]] = lambda g: []
    image: bool = True
    site: type[Site] | None = None  # the site class the rule must bind, where it matters
    rank_out: int = 4  # the op's output rank (images)


def _axes(*axes: int) -> Callable[[Builder], list[str]]:
    return lambda g: [g.int_const(np.array(axes))]


POOL = {"kernel_shape": [2, 2]}
CASES = [
    *(Case(op) for op in ("Abs", "Ceil", "Cos", "Exp", "Floor", "Round", "Sign", "Sin",
                          "Softsign", "HardSwish", "Mish", "Relu", "Tanh")),
    Case("Celu", {"alpha": 0.7}), Case("Elu", {"alpha": 0.5}), Case("Gelu"),
    Case("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), Case("Selu"),
    Case("ThresholdedRelu", {"alpha": 0.2}),
    Case("AveragePool", POOL), Case("MaxPool", POOL), Case("LpPool", {**POOL, "p": 2}),
    Case("GlobalLpPool", {"p": 3}), Case("GlobalMaxPool"), Case("GlobalAveragePool"),
    *(Case(op, inputs=_axes(2, 3)) for op in ("ReduceL1", "ReduceL2", "ReduceLogSumExp",
                                              "ReduceMax", "ReduceMin", "ReduceSumSquare",
                                              "ReduceMean")),
    Case("ReduceMax", {"keepdims": 0}, _axes(-1), rank_out=3),  # [N, C, H]: channels stay axis 1
    Case("Pad", inputs=lambda g: [g.int_const(np.array([0, 0, 1, 0, 0, 0, 0, 2]))], site=PadSite),
    Case("Pad", {"mode": "edge"}, lambda g: [g.int_const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))],
         site=PadSite),
    Case("Pad", inputs=lambda g: [g.int_const(np.array([0, 0, 1, 1, 0, 0, 1, 1])),
                                  g.const(np.array(0.5))], site=PadSite),  # not homogeneous
    Case("Sigmoid", image=False), Case("Softsign", image=False),
]


def _model(case: Case, rows: np.ndarray, bias: np.ndarray, columns: np.ndarray):
    """x -> Conv 1x1 (or Gemm) with kernel rows ``rows`` -> the op -> a Conv 1x1 (or Gemm)
    reading ``columns`` -> y."""
    g = Builder(OPSET)
    if not case.image:
        h = g.op("Gemm", ["x", g.const(rows), g.const(bias)], transB=1)
        h = g.op(case.op, [h, *case.inputs(g)], **case.attrs)
        return g.model({"x": [2, CIN]}, g.op("Gemm", [h, g.const(columns)], transB=1), None)
    h = g.op("Conv", ["x", g.const(rows[:, :, None, None]), g.const(bias)])
    h = g.op(case.op, [h, *case.inputs(g)], **case.attrs)
    kernel = columns.reshape(*columns.shape, *[1] * (case.rank_out - 2))
    return g.model({"x": [2, CIN, 4, 4]}, g.op("Conv", [h, g.const(kernel)]), None)


def _planted(case: Case, seed: int):
    """The lifted model, the base model, the lift's source map, and inputs."""
    rng = np.random.default_rng(seed)
    rows, bias = rng.standard_normal((BASE, CIN)), rng.standard_normal(BASE)
    columns = rng.standard_normal((OUT, BASE))
    source, share = lift_map(rng, BASE, EXTRA)
    lifted = _model(case, rows[source], bias[source], columns[:, source] * share)
    base = _model(case, rows, bias, columns)
    x = rng.standard_normal([2, CIN, 4, 4] if case.image else [2, CIN]).astype(np.float32)
    return lifted, base, source, {"x": x}


def _op_site(analysis, op: str) -> Site:
    return next(site for site in analysis.sites if site.nodes[0].op == op)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}{'' if c.image else '-2d'}"
                         + "".join(f"-{k}" for k in c.attrs if k != "kernel_shape"))
def test_each_op_keeps_copied_channels_one_fiber_and_collapses_to_the_base(case):
    lifted, base, source, feeds = _planted(case, seed=len(case.op))
    analysis = analyze(lifted, eps=0.0)
    site = _op_site(analysis, case.op)
    assert case.site is None or type(site) is case.site
    labels = analysis.fiber(site.outputs[0]).partition.labels
    same = labels[:, None] == labels[None, :]
    np.testing.assert_array_equal(same, source[:, None] == source[None, :])
    assert not analysis.barriers
    _, _, params = compress_and_compare(lifted, feeds, atol=1e-4)
    assert params == count_parameters(base)


@dataclass(frozen=True)
class Barrier:
    """An op in a form no rule binds, and the reason the analysis must give."""

    case: Case
    reason: str


BARRIERS = [
    Barrier(Case("Pad", inputs=lambda g: [g.int_const(np.array([0, 1, 0, 0, 0, 1, 0, 0]))]),
            "Pad of the channel axis"),
    Barrier(Case("ReduceMean", inputs=_axes(1)), "ReduceMean over the channel axis"),
    Barrier(Case("ReduceMax"), "ReduceMax over every axis"),
    Barrier(Case("Gather", {"axis": 1}, lambda g: [g.int_const(np.arange(BASE + EXTRA)[::-1])]),
            "Gather along the channel axis"),
    Barrier(Case("Reshape", inputs=lambda g: [g.int_const(np.array([2, 1, -1, 4, 4]))],
                 rank_out=5), "Reshape 4-D to 5-D splits the channel axis"),
    Barrier(Case("LpNormalization", {"axis": 1}), "no rule for ai.onnx LpNormalization"),
    Barrier(Case("Concat", {"axis": 1}, lambda g: [g.const(np.zeros((2, 1, 4, 4)))]),
            "Concat of a tracked tensor with an untracked one"),
]


@pytest.mark.parametrize("barrier", BARRIERS, ids=lambda b: b.case.op)
def test_a_declining_op_is_a_barrier_with_its_reason(barrier):
    """The neighbours of a barrier keep their widths: the producer is frozen, the collapse
    changes nothing that ONNX Runtime could tell."""
    case = barrier.case
    rng = np.random.default_rng(3)
    source, share = lift_map(rng, BASE, EXTRA)
    rows, bias = rng.standard_normal((BASE, CIN))[source], rng.standard_normal(BASE)[source]
    g = Builder(OPSET)
    h = g.op("Conv", ["x", g.const(rows[:, :, None, None]), g.const(bias)])
    y = g.op("Relu", [g.op(case.op, [h, *case.inputs(g)], **case.attrs)])
    model = g.model({"x": [2, CIN, 4, 4]}, y, None)
    analysis = analyze(model, eps=0.0)
    (found,) = analysis.barriers
    assert found.op_type == case.op and barrier.reason in found.reason, found
    (layer,) = analysis.layers
    assert layer.width_after == layer.width == BASE + EXTRA and layer.fibers == BASE
    assert f"{case.op} '{found.name}'" in layer.frozen
    x = rng.standard_normal((2, CIN, 4, 4)).astype(np.float32)
    compress_and_compare(model, {"x": x})


def test_inspect_names_each_barrier_and_its_reason(tmp_path, capsys):
    barrier = BARRIERS[3]  # Gather along the channel axis
    rng = np.random.default_rng(4)
    g = Builder(OPSET)
    kernel = rng.standard_normal((BASE, CIN, 1, 1))
    h = g.op("Conv", ["x", g.const(kernel), g.const(np.zeros(BASE))])
    y = g.op("Gather", [h, g.int_const(np.arange(BASE))], axis=1)
    onnx.save(g.model({"x": [1, CIN, 2, 2]}, y, None), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    table = capsys.readouterr().out
    assert "Barriers" in table and barrier.reason in table and "Gather_" in table


def test_alternative_rules_are_tried_in_order_and_the_first_reason_is_kept():
    registry = default_registry()
    reshape = dict(registry._rules)[("", "Reshape")]
    assert [rule.__module__.rsplit(".", 1)[1] for rule in reshape] == ["reshape", "attention",
                                                                         "attention"]
    lone = Registry()
    lone.register("Relu", lambda node, graph, known: Declined("first"))
    with pytest.raises(ValueError, match="already registered"):
        lone.register("Relu", lambda node, graph, known: Declined("second"))
    lone.register("Relu", lambda node, graph, known: Declined("second"), alternative=True)
    assert lone.bind(_relu_node(), None, {}) == Declined("first")
    assert Registry().bind(_relu_node(), None, {}) == Declined("no rule for ai.onnx Relu")


def _relu_node() -> gs.Node:
    return gs.Node("Relu", "relu", inputs=[gs.Variable("a")], outputs=[gs.Variable("b")])
