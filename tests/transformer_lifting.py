"""Planted redundancy for transformers and recurrent networks: the analogue of tests/lifting.py.

A *lift* adds hidden units that copy existing ones and splits the consumers' columns among the
copies (the :class:`cnn_lifting.ChannelMap` of a lifted tensor: ``source[j]`` is the base unit
that lifted unit ``j`` copies, ``fraction[j]`` its share of the outgoing weights, positive and
summing to 1 over the copies of each base unit). The lifted network computes the base's function
(to float rounding) and collapsing its clusters (rows by their mean, columns by their sum,
DESIGN.md Eq. 10) gives back the base parameters.

Lifts provided here:

- **Feed-forward blocks** (:func:`lift_bert_ffn`, :func:`lift_transformer_ffn`): the hidden
  tensor between the FFN's two Linears is lifted (``intermediate.dense`` / ``linear1`` rows and
  biases copied, ``output.dense`` / ``linear2`` columns split). The activation between them (GELU,
  ReLU) is element-wise, so the function is unchanged; LayerNorm and attention are untouched.
- **Attention head dimensions** (:func:`lift_bert_heads`): every head of a BERT self-attention
  gets ``extra`` more dimensions (heads must keep equal widths for the Reshape into heads). Query
  and key share one map per head: key rows are copied, query rows are copied *and divided by the
  cluster size* ``m`` (the dot product ``q . k`` sums the ``m`` copies), so both Q and K carry a
  fiber on the same head dimensions (DESIGN.md section 2, attention). Value dimensions have their
  own map: value rows copied, the attention output projection's columns split. The module keeps
  its original softmax scaling (``1 / sqrt(base head size)``).
- **Recurrent hidden units** (:func:`lift_rnn`): ``nn.LSTM`` (gate blocks i, f, g, o) and
  ``nn.GRU`` (r, z, n), any number of layers, uni- or bidirectional. For each (layer, direction)
  the hidden state gets a map: the unit's rows are copied in every gate block of ``weight_ih``,
  ``weight_hh`` and both biases; the columns of ``weight_hh`` reading the copied unit (the
  recurrent input) are split; the next layer's ``weight_ih`` columns (its input is the
  concatenation of the directions' hidden states) and the head Linear's columns are split too.
  With the same hidden state at step ``t`` on every copy, every gate pre-activation is copied, so
  the cell (LSTM) and the state are copied at ``t + 1``: by induction from the zero initial state
  the lifted RNN carries copies of the base's hidden units. Directions and layers get independent
  maps unless ``tie_directions``.

All lifts return a new module (the base is not modified) and the maps they used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from cnn_lifting import ChannelMap, channel_map, concat_maps

__all__ = [
    "lift_linear_pair",
    "lift_bert_ffn",
    "lift_bert_heads",
    "lift_bert_stream",
    "HeadLift",
    "transformer_stack",
    "lift_transformer_ffn",
    "RNNHead",
    "rnn_model",
    "lift_rnn",
    "RNN_GATES",
]


# ----------------------------------------------------------------------------- Linear pairs


def _linear(weight: np.ndarray, bias: np.ndarray | None, like: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` holding ``weight`` (out, in) and ``bias``, in ``like``'s dtype."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    dtype=like.weight.dtype, device=like.weight.device)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if bias is not None:
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return lin.train(like.training)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().cpu().numpy()


def lift_rows(weight: np.ndarray, bias: np.ndarray | None, m: ChannelMap, scale: np.ndarray | None = None):
    """Producer side: rows (and bias entries) indexed by ``m.source``, times ``scale`` if given."""
    s = np.ones(m.n_lifted) if scale is None else scale
    return weight[m.source] * s[:, None], None if bias is None else bias[m.source] * s


def split_columns(weight: np.ndarray, m: ChannelMap) -> np.ndarray:
    """Consumer side: columns indexed by ``m.source``, each times its fraction."""
    return weight[:, m.source] * m.fraction[None, :]


def lift_linear_pair(producer: nn.Linear, consumer: nn.Linear, extra: int, rng: np.random.Generator):
    """Lift the tensor between ``producer`` and ``consumer`` (anything element-wise may sit between
    them) by ``extra`` units. Returns ``(new_producer, new_consumer, map)``."""
    m = channel_map(producer.out_features, extra, rng)
    w, b = lift_rows(_np(producer.weight), _np(producer.bias), m)
    new_producer = _linear(w, b, producer)
    new_consumer = _linear(split_columns(_np(consumer.weight), m), _np(consumer.bias), consumer)
    return new_producer, new_consumer, m


def _per_layer(extra: int | Sequence[int], n: int) -> list[int]:
    extra = [int(extra)] * n if np.isscalar(extra) else [int(e) for e in extra]
    if len(extra) != n or any(e < 0 for e in extra):
        raise ValueError(f"need {n} non-negative extra counts, got {extra}")
    return extra


# ------------------------------------------------------------------------ HF BERT (MiniLM)


def lift_bert_ffn(model: nn.Module, extra: int | Sequence[int], rng: np.random.Generator):
    """Lift every layer's FFN hidden tensor of a Hugging Face BERT-style model (``BertModel`` or
    anything with ``.encoder.layer[i].intermediate.dense`` / ``.output.dense``): ``extra`` (per
    layer, or one count for all) copies of random intermediate units. Returns ``(lifted, maps)``."""
    lifted = copy.deepcopy(model)
    layers = _bert_layers(lifted)
    maps = []
    for layer, e in zip(layers, _per_layer(extra, len(layers))):
        prod, cons, m = lift_linear_pair(layer.intermediate.dense, layer.output.dense, e, rng)
        layer.intermediate.dense, layer.output.dense = prod, cons
        maps.append(m)
    return lifted, maps


def _bert_layers(model: nn.Module):
    encoder = model.encoder if hasattr(model, "encoder") else model.bert.encoder
    return list(encoder.layer)


@dataclass(frozen=True)
class HeadLift:
    """One self-attention's head-dimension lift: per-head maps of the query/key dimensions and of
    the value dimensions (each over the base head size)."""

    qk: list[ChannelMap]
    v: list[ChannelMap]

    def full(self, which: str) -> ChannelMap:
        """The map over all heads' dimensions (heads laid out one after the other)."""
        return concat_maps(*(self.qk if which == "qk" else self.v))


def lift_bert_heads(model: nn.Module, extra: int, rng: np.random.Generator):
    """Give every attention head of every layer ``extra`` more dimensions (see the module
    docstring): Q/K dimensions copied (query rows divided by the cluster size), V dimensions
    copied with the output projection's columns split. The lifted self-attention modules get the
    new ``attention_head_size``/``all_head_size`` and keep their base ``scaling``. Works for the
    eager attention of ``transformers``' BERT. Returns ``(lifted, [HeadLift per layer])``."""
    lifted = copy.deepcopy(model)
    lifts = []
    for layer in _bert_layers(lifted):
        att = layer.attention.self
        if not hasattr(att, "scaling"):
            # Older transformers divide by sqrt(attention_head_size), which the lift changes.
            raise TypeError("lift_bert_heads needs a self-attention with a fixed `scaling` (transformers >= 5)")
        heads, d = att.num_attention_heads, att.attention_head_size
        scaling = float(att.scaling)
        qk = [channel_map(d, extra, rng) for _ in range(heads)]
        v = [channel_map(d, extra, rng) for _ in range(heads)]
        hl = HeadLift(qk=qk, v=v)
        mqk, mv = hl.full("qk"), hl.full("v")
        # The q . k sum over a cluster of m copies counts the product m times: divide Q by m.
        q_scale = 1.0 / mqk.counts[mqk.source]
        att.query = _linear(*lift_rows(_np(att.query.weight), _np(att.query.bias), mqk, q_scale), att.query)
        att.key = _linear(*lift_rows(_np(att.key.weight), _np(att.key.bias), mqk), att.key)
        att.value = _linear(*lift_rows(_np(att.value.weight), _np(att.value.bias), mv), att.value)
        dense = layer.attention.output.dense
        layer.attention.output.dense = _linear(split_columns(_np(dense.weight), mv), _np(dense.bias), dense)
        att.attention_head_size = d + extra
        att.all_head_size = heads * (d + extra)
        att.scaling = scaling
        lifts.append(hl)
    return lifted, lifts


def _layer_norm(norm: nn.LayerNorm, m: ChannelMap) -> nn.LayerNorm:
    lifted = nn.LayerNorm(m.n_lifted, eps=norm.eps, dtype=norm.weight.dtype)
    with torch.no_grad():
        lifted.weight.copy_(norm.weight[torch.from_numpy(m.source)])
        lifted.bias.copy_(norm.bias[torch.from_numpy(m.source)])
    return lifted.train(norm.training)


def _embedding(emb: nn.Embedding, m: ChannelMap) -> nn.Embedding:
    lifted = nn.Embedding(emb.num_embeddings, m.n_lifted, padding_idx=emb.padding_idx, dtype=emb.weight.dtype)
    with torch.no_grad():
        lifted.weight.copy_(emb.weight[:, torch.from_numpy(m.source)])
    return lifted.train(emb.training)


def lift_bert_stream(model: nn.Module, extra: int, rng: np.random.Generator):
    """Lift the residual stream (hidden size) of a Hugging Face BERT-style model by ``extra``
    copies of random stream channels: embedding columns, every writer's rows (attention output
    and FFN output projections) and every LayerNorm's weight and bias copied; every reader's
    columns (Q/K/V, FFN input, pooler) split. The lifted LayerNorms see the copies, so their
    statistics are the base's multiplicity-weighted ones: the lift is *not* the base's function,
    but collapsing it with weighted LayerNorms reproduces the lift. Returns ``(lifted, map)``."""
    lifted = copy.deepcopy(model)
    emb = lifted.embeddings
    m = channel_map(emb.word_embeddings.embedding_dim, extra, rng)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        setattr(emb, name, _embedding(getattr(emb, name), m))
    emb.LayerNorm = _layer_norm(emb.LayerNorm, m)

    def writer(lin: nn.Linear) -> nn.Linear:
        return _linear(*lift_rows(_np(lin.weight), _np(lin.bias), m), lin)

    def reader(lin: nn.Linear) -> nn.Linear:
        return _linear(split_columns(_np(lin.weight), m), _np(lin.bias), lin)

    for layer in _bert_layers(lifted):
        att = layer.attention
        qkv = (att.self.query, att.self.key, att.self.value)
        att.self.query, att.self.key, att.self.value = (reader(lin) for lin in qkv)
        att.output.dense, att.output.LayerNorm = writer(att.output.dense), _layer_norm(att.output.LayerNorm, m)
        layer.intermediate.dense = reader(layer.intermediate.dense)
        layer.output.dense, layer.output.LayerNorm = writer(layer.output.dense), _layer_norm(layer.output.LayerNorm, m)
    if getattr(lifted, "pooler", None) is not None:
        lifted.pooler.dense = reader(lifted.pooler.dense)
    return lifted, m


# ------------------------------------------------------------------- torch transformer stacks


class _Stack(nn.Module):
    """``head(stack(x))`` for an ``nn.TransformerEncoder`` (``stack(x)``) or an
    ``nn.TransformerDecoder`` (``stack(x, x)``: the input is both target and memory)."""

    def __init__(self, stack: nn.Module, head: nn.Linear, decoder: bool):
        super().__init__()
        self.stack, self.head, self.decoder = stack, head, decoder

    def forward(self, x):
        y = self.stack(x, x) if self.decoder else self.stack(x)
        return self.head(y)


def transformer_stack(kind: str, seed: int, d_model: int = 16, nhead: int = 2, dim_feedforward: int = 32,
                      num_layers: int = 2, n_out: int = 5, activation: str | None = None) -> nn.Module:
    """A random (seeded) ``batch_first`` transformer encoder or decoder stack with a Linear head:
    input ``[batch, seq, d_model]``, output ``[batch, seq, n_out]``; dropout 0, eval mode.
    Every layer gets its own random weights; LayerNorm weights and biases and the biases are
    randomised too (not the identity, not zero). ``activation``
    defaults to ReLU for the encoder and GELU for the decoder."""
    if kind not in ("encoder", "decoder"):
        raise ValueError(kind)
    torch.manual_seed(seed)
    if kind == "encoder":
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True,
                                           activation=activation or "relu")
        stack = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
    else:
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True,
                                           activation=activation or "gelu")
        stack = nn.TransformerDecoder(layer, num_layers)
    model = _Stack(stack, nn.Linear(d_model, n_out), decoder=kind == "decoder")
    with torch.no_grad():
        for m in model.modules():
            # nn.TransformerEncoder/Decoder deep-copy one layer: re-draw every layer's weights so
            # the layers differ (exporters share equal initializers, which would hide the lift).
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
                m.in_proj_bias.uniform_(-0.3, 0.3)
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def lift_transformer_ffn(model: nn.Module, extra: int | Sequence[int], rng: np.random.Generator):
    """Lift the FFN hidden tensor (``linear1`` rows, ``linear2`` columns) of every layer of an
    ``nn.TransformerEncoder``/``Decoder`` (or a module with ``.stack`` holding one).
    Returns ``(lifted, maps)``."""
    lifted = copy.deepcopy(model)
    stack = lifted.stack if hasattr(lifted, "stack") else lifted
    layers = list(stack.layers)
    maps = []
    for layer, e in zip(layers, _per_layer(extra, len(layers))):
        prod, cons, m = lift_linear_pair(layer.linear1, layer.linear2, e, rng)
        layer.linear1, layer.linear2 = prod, cons
        maps.append(m)
    return lifted, maps



def plant_mha_head_duplicates(model: nn.Module) -> tuple[nn.Module, int]:
    """In every ``nn.MultiheadAttention`` (packed ``in_proj``), make head dimension 1 of every
    head a copy of dimension 0 in both Q and K (weights and bias), and V dimension 3 a copy of
    dimension 2. The function changes, but the copies are exact fibers: a collapse merges one
    Q/K pair and one V pair per head, removing ``heads * (3 * (E + 1) + E)`` parameters per
    attention (Q, K and V rows with their biases, and one ``out_proj`` column). Returns
    ``(planted copy, parameters the collapse removes)``."""
    planted = copy.deepcopy(model)
    removed = 0
    with torch.no_grad():
        for m in planted.modules():
            if not isinstance(m, nn.MultiheadAttention):
                continue
            e, dh = m.embed_dim, m.head_dim
            w, b = m.in_proj_weight, m.in_proj_bias
            for h in range(m.num_heads):
                for block, (src, dst) in ((0, (0, 1)), (1, (0, 1)), (2, (2, 3))):  # q, k, v
                    rows = block * e + h * dh
                    w[rows + dst] = w[rows + src]
                    b[rows + dst] = b[rows + src]
            removed += m.num_heads * (3 * (e + 1) + e)
    return planted.eval(), removed


# ------------------------------------------------------------------------------ LSTM / GRU

RNN_GATES = {"LSTM": 4, "GRU": 3}  # torch's gate blocks: LSTM i, f, g, o; GRU r, z, n


class RNNHead(nn.Module):
    """``head(rnn(x))`` for a ``batch_first`` ``nn.LSTM``/``nn.GRU``: ``read="all"`` applies the
    head to every step's output (``[batch, seq, D * hidden]``), ``read="last"`` to the last layer's
    final hidden states of the directions, concatenated (``[batch, D * hidden]``)."""

    def __init__(self, rnn: nn.Module, head: nn.Linear, read: str = "all"):
        super().__init__()
        if read not in ("all", "last"):
            raise ValueError(read)
        self.rnn, self.head, self.read = rnn, head, read

    def forward(self, x):
        out, state = self.rnn(x)
        if self.read == "all":
            return self.head(out)
        h = state[0] if isinstance(state, tuple) else state  # [layers * D, batch, hidden]
        d = 2 if self.rnn.bidirectional else 1
        last = h[-d:]  # the last layer's directions
        return self.head(torch.cat(list(last), dim=-1))


def rnn_model(cell: str, seed: int, input_size: int = 6, hidden_size: int = 8, num_layers: int = 1,
              bidirectional: bool = False, n_out: int = 3, read: str = "all") -> RNNHead:
    """A seeded random ``batch_first`` LSTM/GRU with a Linear head (:class:`RNNHead`), eval mode.
    Biases are spread out so the gates are not all near 0.5."""
    torch.manual_seed(seed)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}[cell]
    rnn = cls(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("bias"):
                p.uniform_(-0.5, 0.5)
    d = 2 if bidirectional else 1
    return RNNHead(rnn, nn.Linear(d * hidden_size, n_out), read=read).eval()


def _rnn_suffixes(rnn: nn.Module) -> list[str]:
    return ["", "_reverse"] if rnn.bidirectional else [""]


def lift_rnn(model: RNNHead, extra: int, rng: np.random.Generator, tie_directions: bool = False):
    """Lift the hidden size of an :class:`RNNHead`'s LSTM/GRU by ``extra`` units (every layer and
    direction; ``hidden_size`` is one number in torch). Each (layer, direction) gets its own random
    map (one per layer with ``tie_directions``). Returns ``(lifted, maps)`` with ``maps[layer]`` a
    list of one map per direction."""
    rnn = model.rnn
    cell = type(rnn).__name__
    if cell not in RNN_GATES or getattr(rnn, "proj_size", 0):
        raise TypeError(f"lift_rnn supports nn.LSTM and nn.GRU without projections, not {cell}")
    gates, H = RNN_GATES[cell], rnn.hidden_size
    sfx = _rnn_suffixes(rnn)
    maps: list[list[ChannelMap]] = []
    for _ in range(rnn.num_layers):
        if tie_directions:
            m = channel_map(H, extra, rng)
            maps.append([m] * len(sfx))
        else:
            maps.append([channel_map(H, extra, rng) for _ in sfx])
    H2 = H + extra
    new = type(rnn)(rnn.input_size, H2, num_layers=rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                    dropout=rnn.dropout, bidirectional=rnn.bidirectional,
                    dtype=rnn.weight_ih_l0.dtype)
    old = {n: _np(p) for n, p in rnn.named_parameters()}
    params = {}
    for layer in range(rnn.num_layers):
        # The layer's input: the features (layer 0) or the previous layer's directions, concatenated.
        in_map = None if layer == 0 else concat_maps(*maps[layer - 1])
        for d, s in enumerate(sfx):
            m = maps[layer][d]
            rows = np.concatenate([g * H + m.source for g in range(gates)])
            w_ih = old[f"weight_ih_l{layer}{s}"][rows]
            params[f"weight_ih_l{layer}{s}"] = w_ih if in_map is None else split_columns(w_ih, in_map)
            params[f"weight_hh_l{layer}{s}"] = split_columns(old[f"weight_hh_l{layer}{s}"][rows], m)
            if rnn.bias:
                params[f"bias_ih_l{layer}{s}"] = old[f"bias_ih_l{layer}{s}"][rows]
                params[f"bias_hh_l{layer}{s}"] = old[f"bias_hh_l{layer}{s}"][rows]
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    head = model.head
    new_head = _linear(split_columns(_np(head.weight), concat_maps(*maps[-1])), _np(head.bias), head)
    return RNNHead(new.train(rnn.training), new_head, read=model.read).train(model.training), maps
