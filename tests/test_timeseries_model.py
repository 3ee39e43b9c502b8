"""TimeSeriesLM: soft tokens spliced into input embeddings, the shared-prefix forward, the
answer-token loss and label ranking against float64 references, and save/load."""

import mlx_rft  # noqa: F401

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.models import load_model
from mlx_rft.sft.evaluate import generate_texts, shuffled_rows
from mlx_rft.sft.loss import answer_logprobs, rank_labels, sft_loss
from mlx_rft.sft.prefix import SharedPrefix, common_prefix
from mlx_rft.timeseries.encoder import EncoderConfig
from mlx_rft.timeseries.model import TimeSeriesLM, check_supports_embeddings, load_timeseries_lm
from mlx_rft.timeseries.prompts import MARKER, encode_row, user_turn
from mlx_rft.timeseries.rows import SeriesPart, TSRow


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request, tiny_model_factory):
    path = tiny_model_factory(request.param)
    llm, tok = load_model(str(path), dtype="float32")
    llm.freeze()
    mx.random.seed(0)
    model = TimeSeriesLM(llm, EncoderConfig(hidden_size=llm.args.hidden_size, dim=32, num_heads=2))
    mx.eval(model.parameters())
    return model, tok, path


def _rows(n=4, T=10, seed=0):
    rng = np.random.default_rng(seed)
    return [
        TSRow(("Read the series. Which class? Answer inside <answer></answer> tags.",
               SeriesPart("sensor", (rng.normal(size=(1, T + i)) * 3 + 5).astype(np.float32))),
              "ab"[i % 2])
        for i in range(n)
    ]


def _f64_logits(llm, ids):
    """Reference: the token path in float64 through mlx-lm's own forward."""
    ref = mx.array(llm(mx.array(ids)[None]), dtype=mx.float32)
    return np.asarray(ref[0], np.float64)


def test_soft_tokens_equal_to_token_embeddings_give_the_token_path_logits(tiny):
    model, tok, _ = tiny
    ids = np.asarray(tok.encode("the cat sat on the mat", add_special_tokens=False), np.int32)
    table = model.llm.model.embed_tokens
    emb, lengths = model.embed([[ids]])
    assert lengths == [len(ids)]
    via_embeddings = model.llm(mx.array(ids)[None], input_embeddings=emb)
    via_tokens = model.llm(mx.array(ids)[None])
    np.testing.assert_allclose(np.asarray(via_embeddings), np.asarray(via_tokens), atol=1e-5)
    # Splice the embeddings of ids[2:5] in as if they were soft tokens: same logits.
    soft = table(mx.array(ids[2:5]))
    spliced = mx.concatenate([table(mx.array(ids[:2])), soft, table(mx.array(ids[5:]))])[None]
    np.testing.assert_allclose(
        np.asarray(model.llm(mx.array(ids)[None], input_embeddings=spliced)),
        np.asarray(via_tokens), atol=1e-5,
    )


def test_prompt_pieces_place_one_block_of_soft_tokens_per_channel(tiny):
    model, tok, _ = tiny
    row = TSRow(("two channels:", SeriesPart("acc", np.arange(18, dtype=np.float32).reshape(2, 9))), "a")
    content, channels = user_turn(row)
    assert content.count(MARKER[:1]) == 4 and len(channels) == 2
    assert "acc, channel 1 (9 values), mean 4, std 2.582" in content
    np.testing.assert_allclose(channels[1].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(channels[1].std(), 1, atol=1e-6)
    enc = encode_row(tok, row)
    kinds = [np.issubdtype(p.dtype, np.floating) for p in enc.pieces]
    assert kinds == [False, True, False, True, False]
    emb, lengths = model.embed([enc.pieces])
    patches = -(-9 // model.config.patch_size)
    assert lengths[0] == sum(len(p) for p, k in zip(enc.pieces, kinds) if not k) + 2 * patches
    text_only = encode_row(tok, row, as_text=True)
    assert len(text_only.pieces) == 1 and "2.6" not in tok.decode(list(text_only.pieces[0]))[:0]


def test_answer_loss_and_ranking_match_a_float64_reference(tiny):
    model, tok, _ = tiny
    encs = [encode_row(tok, r) for r in _rows()]
    pieces = [e.pieces for e in encs]
    answers = [e.answer_ids for e in encs]
    logp, row = answer_logprobs(model, pieces, answers)
    # Reference: each row alone, unpadded, full logits, log-softmax in float64.
    ref = []
    for e in encs:
        emb, _ = model.embed([list(e.pieces) + [e.answer_ids]])
        L = emb.shape[1]
        logits = np.asarray(model.llm(mx.zeros((1, L), mx.int32), input_embeddings=emb)[0], np.float64)
        p = L - len(e.answer_ids)
        z = logits[p - 1 : L - 1]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        ref.extend(z[np.arange(len(e.answer_ids)), e.answer_ids] - lse)
    np.testing.assert_allclose(np.asarray(logp, np.float64), ref, atol=2e-5)
    assert list(row) == [b for b, e in enumerate(encs) for _ in e.answer_ids]
    loss, ntok = sft_loss(model, pieces, answers)
    assert int(ntok) == len(ref)
    np.testing.assert_allclose(float(loss), -np.mean(ref), rtol=1e-5)
    labels = [encode_row(tok, TSRow(r.parts, c)).answer_ids for r, c in zip(_rows(2), "ab")]
    scores = rank_labels(model, pieces, labels)
    for b, e in enumerate(encs):
        for k, lab in enumerate(labels):
            lp, _ = answer_logprobs(model, [e.pieces], [lab])
            np.testing.assert_allclose(scores[b, k], float(mx.sum(lp)), atol=1e-4)


def test_the_shared_prefix_forward_equals_the_full_forward(tiny):
    model, tok, _ = tiny
    encs = [encode_row(tok, r) for r in _rows()]
    n = common_prefix([e.pieces[0] for e in encs])
    assert 5 < n < len(encs[0].pieces[0])
    answers = [e.answer_ids for e in encs]
    full, _ = answer_logprobs(model, [e.pieces for e in encs], answers)
    prefix = SharedPrefix(model.llm, encs[0].pieces[0][:n])
    shared, _ = answer_logprobs(model, [prefix.strip(e.pieces) for e in encs], answers, prefix)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(full), atol=1e-5)
    # A different prefix changes the numbers (the check can fail).
    other = SharedPrefix(model.llm, encs[0].pieces[0][:n][::-1].copy())
    wrong, _ = answer_logprobs(model, [prefix.strip(e.pieces) for e in encs], answers, other)
    assert float(mx.abs(wrong - full).max()) > 1e-3
    # Gradients into the encoder are the same through the prefix cache.
    def loss(m, pieces, pre):
        return sft_loss(m, pieces, answers, pre)[0]

    g_full = nn.value_and_grad(model, loss)(model, [e.pieces for e in encs], None)[1]
    g_shared = nn.value_and_grad(model, loss)(model, [prefix.strip(e.pieces) for e in encs], prefix)[1]
    a = np.asarray(g_full["encoder"]["patch"]["weight"])
    b = np.asarray(g_shared["encoder"]["patch"]["weight"])
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.abs(a).max()))


def test_gradients_reach_the_encoder_through_the_frozen_llm_and_skip_its_weights(tiny):
    model, tok, _ = tiny
    encs = [encode_row(tok, r) for r in _rows()]
    _, grads = nn.value_and_grad(model, lambda m: sft_loss(m, [e.pieces for e in encs],
                                                           [e.answer_ids for e in encs])[0])(model)
    from mlx.utils import tree_flatten

    assert {k.split(".")[0] for k, _ in tree_flatten(grads)} == {"encoder", "projector"}

    norms = {k: float(mx.abs(v).max()) for k, v in tree_flatten(grads)}
    assert norms["encoder.patch.weight"] > 0 and norms["projector.fc2.weight"] > 0
    counts = model.parameter_counts()
    llm_size = sum(v.size for _, v in tree_flatten(model.llm.parameters()))
    assert counts["frozen"] == llm_size and counts["trainable"] == sum(
        v.size for k, v in tree_flatten(model.parameters()) if not k.startswith("llm."))


def test_quantized_weights_count_as_unpacked_parameters(tiny_model_factory):
    llm, _ = load_model(str(tiny_model_factory("qwen3")), dtype="float32")
    from mlx.utils import tree_flatten

    before = sum(v.size for _, v in tree_flatten(llm.parameters()))
    nn.quantize(llm, group_size=32, bits=4)
    llm.freeze()
    model = TimeSeriesLM(llm, None)
    counts = model.parameter_counts()
    # Scales and biases are extra, but packed weights must count 8 values per uint32, not 1.
    assert counts["trainable"] == 0 and before <= counts["frozen"] < 1.3 * before


def test_greedy_generation_with_embeddings_matches_mlx_lm_on_the_token_path(tiny):
    from mlx_lm import generate

    model, tok, _ = tiny
    prompts = ["the cat", "a dog ran", "the cat sat on"]
    encs = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        encs.append(type(encode_row(tok, _rows(1)[0]))((np.asarray(ids, np.int32),),
                                                       np.zeros(0, np.int32), ""))
    texts = generate_texts(model, tok, encs, SharedPrefix(model.llm, np.zeros(0, np.int32)), 12)
    for e, text in zip(encs, texts):
        ref = generate(model.llm, tok, prompt=e.pieces[0].tolist(), max_tokens=12, verbose=False)
        assert text == ref


def test_shuffled_rows_move_every_series_to_another_row():
    rows = _rows(7)
    out = shuffled_rows(rows, seed=3)
    donors = []
    for r, s in zip(rows, out):
        assert r.parts[0] == s.parts[0] and r.answer == s.answer
        j = next(i for i, o in enumerate(rows) if o.parts[1].values.shape == s.parts[1].values.shape
                 and np.array_equal(o.parts[1].values, s.parts[1].values))
        donors.append(j)
    assert sorted(donors) == list(range(7)) and all(d != i for i, d in enumerate(donors))


def test_save_and_load_give_the_same_model(tiny, tmp_path):
    model, tok, path = tiny
    model.save(tmp_path / "ts", str(path))
    assert not (path / "timeseries.safetensors").exists()  # next to the LLM folder, not inside
    loaded, _ = load_timeseries_lm(tmp_path / "ts")
    enc = encode_row(tok, _rows(1)[0])
    a, _ = model.embed([enc.pieces])
    b, _ = loaded.embed([enc.pieces])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = EncoderConfig(hidden_size=model.config.hidden_size, dim=16, num_heads=2)
    other = TimeSeriesLM(loaded.llm, bad)
    with pytest.raises(MlxRftError, match="do not match"):
        other.load_series_weights(tmp_path / "ts")


def test_models_without_input_embeddings_are_refused_by_name():
    class NoEmbeddings(nn.Module):
        def __call__(self, inputs, cache=None):
            return inputs

    with pytest.raises(MlxRftError, match="takes no input_embeddings"):
        check_supports_embeddings(NoEmbeddings())


def test_behaviour_logprobs_equal_teacher_forced_ones_with_embeddings(tiny):
    from mlx_rft.policy.logprobs import sequence_logprobs
    from mlx_rft.rollout.engine import generate_rollouts
    from mlx_rft.types import SamplingConfig

    model, tok, _ = tiny
    encs = [encode_row(tok, r) for r in _rows(3, T=9)]  # lengths differ: left padding matters
    emb, lengths = model.embed([e.pieces for e in encs], pad_left=True)
    ids = [model.placeholder_ids(e.pieces) for e in encs]
    assert [len(i) for i in ids] == lengths and len(set(lengths)) > 1
    G = 3
    batch = generate_rollouts(model.llm, tok, ids, G, SamplingConfig(temperature=1.0, max_new_tokens=8),
                              seed=0, prompt_embeddings=emb)
    mask = np.asarray(batch.completion_mask) > 0
    for share in (True, False):
        lp, _ = sequence_logprobs(model.llm, ids, batch.completion_ids, batch.completion_mask, G,
                                  1.0, share_prompt=share, prompt_embeddings=emb)
        diff = np.abs(np.asarray(lp) - np.asarray(batch.logprobs))[mask]
        assert diff.max() <= 1e-4, (share, diff.max())
    # The placeholder ids alone are another prompt: the embeddings really are used.
    plain, _ = sequence_logprobs(model.llm, ids, batch.completion_ids, batch.completion_mask, G, 1.0)
    assert np.abs(np.asarray(plain) - np.asarray(batch.logprobs))[mask].max() > 1e-2


def test_a_row_that_does_not_open_with_the_shared_prefix_is_refused(tiny):
    model, tok, _ = tiny
    enc = encode_row(tok, _rows(1)[0])
    prefix = SharedPrefix(model.llm, enc.pieces[0][:6][::-1].copy())
    with pytest.raises(MlxRftError, match="does not start with the shared prefix"):
        prefix.strip(enc.pieces)


def test_ranking_with_the_prompt_run_once_equals_full_sequences(tiny):
    from mlx_rft.sft.loss import rank_labels_cached

    model, tok, _ = tiny
    rows = [r for r in _rows(4, T=8)]
    rows = [rows[0], TSRow(rows[0].parts, "b")]  # same prompt length: one unpadded batch
    encs = [encode_row(tok, r) for r in rows]
    n = common_prefix([e.pieces[0] for e in encs])
    prefix = SharedPrefix(model.llm, encs[0].pieces[0][: n - 3])
    labels = [encode_row(tok, TSRow(rows[0].parts, c)).answer_ids for c in ("a", "bb", "the cat")]
    assert len({len(a) for a in labels}) > 1  # labels of different lengths
    full = rank_labels(model, [e.pieces for e in encs], labels)
    cached = rank_labels_cached(model, [prefix.strip(e.pieces) for e in encs], labels, prefix)
    np.testing.assert_allclose(cached, full, atol=1e-4)
