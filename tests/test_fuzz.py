"""A seeded, bounded fuzz of the command line (benchmarks/fuzz.py): every mutation kind once on
the suite's models, each run in a child process with a timeout, the contract checked on each
(exit 0/1/2, no traceback, no hang, input unchanged, nothing at OUT on failure, exit-0 outputs
pass the full checker and match ONNX Runtime on the input). The long run is
``python benchmarks/fuzz.py --cases 1000``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402


@pytest.mark.slow
def test_every_mutation_kind_keeps_the_contract():
    records = fuzz.fuzz(fuzz.cases(len(fuzz.KINDS), seed=0), jobs=2)
    assert [r["kinds"] for r in records] == [[kind] for kind in fuzz.KINDS]
    broken = [f"{r['case']}: {'; '.join(r['problems'])} ({r['error']})" for r in records if r["problems"]]
    assert not broken, "\n".join(broken)
    exits = {r["exit"] for r in records}
    assert exits >= {0, 2}  # both valid mutants (compressed) and invalid ones (refused) were run


@pytest.mark.slow
def test_the_real_entry_point_keeps_the_contract_on_a_truncated_and_a_valid_model():
    """Two cases through ``python -m onnxfib`` itself, not a forked child."""
    selected = [case for case in fuzz.cases(len(fuzz.KINDS), seed=0)
                if case.kinds in (("truncate",), ("tensor_as_constant",))]
    records = fuzz.fuzz(selected, jobs=2, spawn=True)
    assert [r["problems"] for r in records] == [[], []], records
    assert sorted(r["exit"] for r in records) == [0, 2]


@pytest.mark.slow
def test_a_run_past_its_timeout_counts_as_a_hang(tmp_path):
    case = fuzz.Case(0, "digits_mlp", ("tensor_as_constant",), "compress", 1)
    record = fuzz.run_case(case, fuzz.seeds()["digits_mlp"], tmp_path, timeout=0.05)
    assert record["exit"] is None and any("hang" in line for line in record["problems"])


def test_an_output_unlike_the_input_or_invalid_is_caught(tmp_path):
    """The exit-0 check fails on a valid model whose outputs differ from the input's in ONNX
    Runtime, and on a file the checker refuses."""
    case = fuzz.Case(0, "tiny_mlp", (), "compress", 1)
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = fuzz.tiny_mlp()
    onnx.save(model, str(source))
    for tensor in model.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor) * np.float32(2)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(out))
    assert any("differs from ONNX Runtime" in line for line in fuzz._check_output(out, source, case))
    out.write_bytes(source.read_bytes()[:40])
    assert any("full check" in line for line in fuzz._check_output(out, source, case))
    onnx.save(fuzz.tiny_mlp(), str(out))
    assert fuzz._check_output(out, source, case) == []
