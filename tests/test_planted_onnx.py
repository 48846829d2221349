"""Planted redundancy in hand-made ONNX MLPs (no exporter), fuzzed with hypothesis.

Random widths, depths, lift sizes, activations, Gemm or MatMul + Add, plain or proportional
lifts: ``onnxfib.compress(eps=0)`` must return exactly the base's parameter count and the lifted
model's outputs (checked here in onnxruntime, rtol 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lifting import dense_param_count, lift_layers, onnx_mlp
from planted_utils import assert_same_outputs, eval_inputs

onnxfib = pytest.importorskip("onnxfib")
from onnxfib.stats import count_parameters  # noqa: E402


@st.composite
def planted_mlps(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 8), min_size=depth, max_size=depth))
    extra = draw(st.lists(st.integers(0, 8), min_size=depth, max_size=depth))
    n_in = draw(st.integers(2, 16))
    n_out = draw(st.integers(1, 5))
    activation = draw(st.sampled_from(["relu", "tanh", "sigmoid", "leakyrelu"]))
    proportional = activation in ("relu", "leakyrelu") and draw(st.booleans())
    use_gemm = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return n_in, widths, n_out, extra, activation, proportional, use_gemm, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planted_mlps())
@pytest.mark.slow
def test_hand_made_lift_collapses_to_base(case):
    n_in, widths, n_out, extra, activation, proportional, use_gemm, seed = case
    rng = np.random.default_rng(seed)
    sizes = [n_in, *widths, n_out]
    Ws = [rng.standard_normal((sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]) for i in range(len(sizes) - 1)]
    bs = [rng.uniform(-0.5, 0.5, size=s) for s in sizes[1:]]
    LW, Lb, _ = lift_layers(Ws, bs, extra, rng, proportional=proportional)
    lifted = onnx_mlp(LW, Lb, activation, use_gemm=use_gemm)
    expected = dense_param_count(Ws, bs)
    assert count_parameters(onnx_mlp(Ws, bs, activation, use_gemm=use_gemm)) == expected

    result = onnxfib.compress(lifted, eps=0.0)
    got = count_parameters(result.model)
    assert got == expected, (case, got, expected,
                             [(l.name, l.width, l.fibers, l.width_after, l.frozen) for l in result.report.layers])
    onnx.checker.check_model(result.model, full_check=True)
    inputs = [x[:, :n_in] for x in eval_inputs(64, n_real=100, n_random=32, seed=seed % 1000)]
    assert_same_outputs(lifted, result.model, inputs, rtol=1e-5)
