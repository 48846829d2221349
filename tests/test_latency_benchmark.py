"""The latency benchmark (benchmarks/latency.py) on tiny models: its twins hold exactly the
compressed models' parameters, and the twin's re-shaped attention computes what transformers'
own attention does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import latency  # noqa: E402
import speed  # noqa: E402
from planted_utils import export_hf_encoder  # noqa: E402

import onnxfib  # noqa: E402

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, vocab_size=100)


@pytest.mark.slow
def test_twin_of_a_compressed_bert_holds_its_parameters_and_fuses_the_same(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    speed.build_bert(tmp_path / "bert.onnx", 2, **TINY)
    compressed = tmp_path / "small.onnx"
    onnxfib.compress(tmp_path / "bert.onnx", eps=0.0, input_shapes={k: (1, 8) for k in speed.BERT_INPUTS}).save(compressed)
    shapes = latency.linear_shapes(onnx.load(compressed))
    assert sorted(shape for name, shape in shapes.items() if "intermediate" in name) == [(32, 56)] * 2  # 8 planted
    torch.manual_seed(0)
    twin = speed.drawn_vectors(latency.narrow_bert(BertModel(BertConfig(num_hidden_layers=2, attn_implementation="eager", **TINY)),
                                                          shapes))
    export_hf_encoder(twin, tmp_path / "twin.onnx", {k: np.ones((1, 16), np.int64) for k in speed.BERT_INPUTS})
    assert latency.float_shapes(onnx.load(compressed)) == latency.float_shapes(onnx.load(tmp_path / "twin.onnx"))
    assert latency.fused_ops(compressed, tmp_path) == latency.fused_ops(tmp_path / "twin.onnx", tmp_path)


@pytest.mark.slow
def test_twin_attention_computes_what_transformers_does():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2, attn_implementation="eager", **TINY)).eval()
    ids = torch.randint(0, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        same = latency.narrow_bert(model, {})(input_ids=ids, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(same.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_narrow_bert_refuses_heads_of_unequal_query_and_key_widths():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=1, **TINY))
    with pytest.raises(ValueError, match="unequal head widths"):
        latency.narrow_bert(model, {"encoder.layer.0.attention.self.query": (32, 28)})


@pytest.mark.slow
def test_cnn_twin_holds_the_compressed_resnets_parameters(tmp_path):
    compressed, twin = latency.build_cnn(tmp_path)
    kept = latency.float_shapes(onnx.load(compressed))
    assert kept == latency.float_shapes(onnx.load(twin))
    before = latency.float_shapes(onnx.load(tmp_path / "cnn.onnx"))
    assert sum(np.prod(s) * n for s, n in before.items()) > sum(np.prod(s) * n for s, n in kept.items())
