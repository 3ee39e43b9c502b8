"""The rollout engine end to end on tiny models of every supported architecture (and, marked
slow, the real default model): exactness against mlx-lm and against a plain teacher-forced
forward pass, groups, seeds, stopping, row dropping and memory."""

import dataclasses
import gc

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_logits_processors

from mlx_rft import cpu
from mlx_rft.errors import MlxRftError
from mlx_rft.models import load_model
from mlx_rft.rollout import RolloutStats, generate_rollouts
from mlx_rft.types import RolloutBatch, SamplingConfig

ARCHS = ["qwen3", "qwen3_moe", "llama"]
QUESTIONS = [
    "What is 2 + 3?",
    "Paris is the capital of which country? Answer in one word please.",
    "def add(a, b):",
]


def chat(tokenizer, content):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


@pytest.fixture
def tiny(tiny_model_factory):
    """tiny(arch) -> freshly loaded (model, tokenizer); tests may change the tokenizer."""
    return lambda arch="qwen3", **kw: load_model(tiny_model_factory(arch, **kw))


def completion(batch: RolloutBatch, n: int) -> list[int]:
    k = int(batch.completion_mask[n].sum())
    return batch.completion_ids[n, :k].tolist()


def reference_greedy(model, prompt, n):
    """mlx-lm's single-sequence greedy decode, n tokens, no EOS handling."""
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(tok) for tok, _ in steps]


def teacher_forced_logprobs(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of `tokens` from one plain forward over prompt + tokens."""
    seq = mx.array([prompt + tokens])
    logits = model(seq)[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].astype(mx.float32)
    z = logits / temperature
    lp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(lp, mx.array(tokens)[:, None], axis=-1)[:, 0])


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_mlx_lm_token_for_token(tiny, arch):
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS]  # three different lengths in one batch
    batch = generate_rollouts(
        model, tok, prompts, 2, SamplingConfig(temperature=0, max_new_tokens=24), ignore_eos=True
    )
    for b, p in enumerate(prompts):
        ref = reference_greedy(model, p, 24)
        assert completion(batch, 2 * b) == ref
        assert completion(batch, 2 * b + 1) == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_each_prompt_alone(tiny, arch):
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS] + [[5, 9]]
    cfg = SamplingConfig(temperature=0, max_new_tokens=16)
    together = generate_rollouts(model, tok, prompts, 1, cfg, ignore_eos=True)
    for b, p in enumerate(prompts):
        alone = generate_rollouts(model, tok, [p], 1, cfg, ignore_eos=True)
        assert completion(together, b) == completion(alone, 0)
        assert np.allclose(
            np.array(together.logprobs[b]), np.array(alone.logprobs[0]), atol=1e-5
        )


def test_prompts_may_be_lists_or_arrays(tiny):
    model, tok = tiny("qwen3")
    prompts = [chat(tok, q) for q in QUESTIONS[:2]]
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    lists = generate_rollouts(model, tok, prompts, 1, cfg)
    arrays = generate_rollouts(model, tok, [mx.array(prompts[0]), np.array(prompts[1])], 1, cfg)
    assert np.array_equal(np.array(lists.completion_ids), np.array(arrays.completion_ids))
    assert arrays.prompt_ids == prompts


def test_chunked_prefill_changes_nothing(tiny):
    model, tok = tiny("qwen3")
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12)
    whole = generate_rollouts(model, tok, prompts, 2, cfg, seed=4)
    chunked = generate_rollouts(model, tok, prompts, 2, cfg, seed=4, prefill_step_size=5)
    assert np.array_equal(np.array(whole.completion_ids), np.array(chunked.completion_ids))
    assert np.allclose(np.array(whole.logprobs), np.array(chunked.logprobs), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_equal_teacher_forced_at_temperature(tiny, arch):
    """Recorded behaviour log-probs vs a plain forward over prompt + completion at T = 0.7.

    Measured max |diff| in float32: 2.4e-6 on the tiny models (bound 1e-4)."""
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS]
    T = 0.7
    batch = generate_rollouts(
        model, tok, prompts, 3, SamplingConfig(temperature=T, max_new_tokens=20), seed=3
    )
    worst = 0.0
    for n in range(batch.num_rows):
        toks = completion(batch, n)
        ref = teacher_forced_logprobs(model, prompts[batch.group_index[n]], toks, T)
        got = np.array(batch.logprobs[n, : len(toks)])
        worst = max(worst, float(np.abs(got - ref).max()))
        assert np.all(np.array(batch.logprobs[n, len(toks) :]) == 0.0)  # 0 at padding
    assert worst <= 1e-4, worst


def test_truncated_logprobs_equal_teacher_forced_top_k_distribution(tiny):
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS]
    T, K = 1.3, 5
    batch = generate_rollouts(
        model, tok, prompts, 2, SamplingConfig(temperature=T, top_k=K, max_new_tokens=12), seed=0
    )
    for n in range(batch.num_rows):
        toks = completion(batch, n)
        prompt = prompts[batch.group_index[n]]
        logits = model(mx.array([prompt + toks]))[0, len(prompt) - 1 : -1] / T
        z = np.array(logits, np.float64)
        kth = np.sort(z, axis=1)[:, -K][:, None]
        zt = np.where(z >= kth, z, -np.inf)
        lse = np.log(np.exp(zt - zt.max(1, keepdims=True)).sum(1)) + zt.max(1)
        ref = zt[np.arange(len(toks)), toks] - lse
        assert np.isfinite(ref).all()  # every sampled token is inside the top-k
        got = np.array(batch.truncated_logprobs[n, : len(toks)])
        assert np.abs(got - ref).max() < 1e-4
        # The behaviour log-prob ignores truncation, so it is strictly lower.
        assert np.all(np.array(batch.logprobs[n, : len(toks)]) < got)


def test_greedy_logprobs_are_untempered_log_softmax(tiny):
    model, tok = tiny("qwen3")
    prompt = chat(tok, QUESTIONS[0])
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    batch = generate_rollouts(model, tok, [prompt], 1, cfg)
    toks = completion(batch, 0)
    ref = teacher_forced_logprobs(model, prompt, toks, 1.0)
    assert np.abs(np.array(batch.logprobs[0, : len(toks)]) - ref).max() < 1e-4
    assert np.all(np.array(batch.truncated_logprobs) == 0.0)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_penalties_match_mlx_lm_processors_per_row(tiny, arch):
    """Greedy with all three penalties equals mlx-lm's single-sequence processors, per row."""
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS]
    kw = dict(repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.4)
    cfg = SamplingConfig(temperature=0, max_new_tokens=20, repetition_context_size=12, **kw)
    batch = generate_rollouts(model, tok, prompts, 1, cfg, ignore_eos=True)
    plain = generate_rollouts(
        model, tok, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=20), ignore_eos=True
    )
    changed = False
    for b, p in enumerate(prompts):
        procs = make_logits_processors(
            repetition_penalty=kw["repetition_penalty"], repetition_context_size=12,
            presence_penalty=kw["presence_penalty"], presence_context_size=12,
            frequency_penalty=kw["frequency_penalty"], frequency_context_size=12,
        )  # fmt: skip
        steps = generate_step(mx.array(p), model, max_tokens=20, logits_processors=procs)
        ref = [int(t) for t, _ in steps]
        assert completion(batch, b) == ref
        changed |= completion(plain, b) != ref
    assert changed  # the penalties did something on these prompts


# ---------------------------------------------------------------- groups and seeds


def test_groups_layout_and_diversity(tiny):
    model, tok = tiny("qwen3")
    prompts = [chat(tok, q) for q in QUESTIONS[:2]]
    G = 4
    cfg = SamplingConfig(temperature=0, max_new_tokens=10)
    greedy = generate_rollouts(model, tok, prompts, G, cfg)
    assert greedy.group_index == [0] * G + [1] * G and greedy.group_size == G
    assert greedy.num_rows == 2 * G and greedy.prompt_ids == prompts
    for b in range(2):
        rows = [completion(greedy, b * G + g) for g in range(G)]
        assert all(r == rows[0] for r in rows)  # T = 0: identical within a group
    sampled = generate_rollouts(
        model, tok, prompts, G, SamplingConfig(temperature=1.5, max_new_tokens=10), seed=0
    )
    for b in range(2):
        rows = {tuple(completion(sampled, b * G + g)) for g in range(G)}
        assert len(rows) == G  # T > 0: G different samples


def test_fixed_seed_reproduces_and_leaves_global_prng_alone(tiny):
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12)
    mx.random.seed(123)
    state = np.array(mx.random.state[0])
    a = generate_rollouts(model, tok, prompts, 2, cfg, seed=7)
    assert np.array_equal(np.array(mx.random.state[0]), state)  # global PRNG untouched
    b = generate_rollouts(model, tok, prompts, 2, cfg, seed=7)
    c = generate_rollouts(model, tok, prompts, 2, cfg, seed=8)
    assert np.array_equal(np.array(a.completion_ids), np.array(b.completion_ids))
    assert np.array_equal(np.array(a.logprobs), np.array(b.logprobs))
    assert a.texts == b.texts
    assert not np.array_equal(np.array(a.completion_ids), np.array(c.completion_ids))
    # seed=None draws from the global PRNG, so mx.random.seed makes it repeatable.
    mx.random.seed(5)
    d = generate_rollouts(model, tok, prompts, 2, cfg)
    mx.random.seed(5)
    e = generate_rollouts(model, tok, prompts, 2, cfg)
    assert np.array_equal(np.array(d.completion_ids), np.array(e.completion_ids))


# ---------------------------------------------------------------- stopping


def test_every_eos_id_stops_its_row_and_stays_in_the_mask(tiny):
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS[:2]]
    cfg = SamplingConfig(temperature=0, max_new_tokens=16)
    free = generate_rollouts(model, tok, prompts, 1, cfg, ignore_eos=True)
    row0, row1 = completion(free, 0), completion(free, 1)
    # Two extra EOS ids: the 4th token of row 0 and the 7th of row 1 (first occurrences).
    e0 = row0[3]
    e1 = next(t for t in row1[6:] if t not in row1[:6] and t not in row0[:4])
    # Each row stops at its first token that is either extra EOS id.
    cut0 = 1 + min(i for i, t in enumerate(row0) if t in (e0, e1))
    cut1 = 1 + min(i for i, t in enumerate(row1) if t in (e0, e1))
    tok.eos_token_ids = set(tok.eos_token_ids) | {e0, e1}
    batch = generate_rollouts(model, tok, prompts, 1, cfg)
    assert batch.finish_reasons[0] == "stop"
    assert completion(batch, 0) == row0[:cut0]  # EOS kept in ids and mask
    assert int(batch.completion_mask[0].sum()) == cut0
    assert batch.texts[0] == tok.decode(row0[: cut0 - 1])  # ...but not in the text
    assert completion(batch, 1) == row1[:cut1]
    assert batch.finish_reasons[1] == "stop"
    assert batch.completion_ids.shape[1] == max(int(m) for m in batch.lengths.tolist())


def test_length_finish_and_ignore_eos(tiny):
    model, tok = tiny("qwen3")
    prompt = chat(tok, QUESTIONS[0])
    cfg = SamplingConfig(temperature=0, max_new_tokens=9)
    free = generate_rollouts(model, tok, [prompt], 1, cfg, ignore_eos=True)
    assert free.finish_reasons == ["length"] and len(completion(free, 0)) == 9
    tok.eos_token_ids = {completion(free, 0)[0]}  # the very first token is now an EOS
    stopped = generate_rollouts(model, tok, [prompt], 1, cfg)
    assert stopped.finish_reasons == ["stop"] and completion(stopped, 0) == completion(free, 0)[:1]
    assert stopped.texts == [""]
    ignored = generate_rollouts(model, tok, [prompt], 1, cfg, ignore_eos=True)
    assert completion(ignored, 0) == completion(free, 0)


def _boundary_stop_string(tok, ids):
    """A 4-char stop string spanning the boundary before token i (2 chars on each side)."""
    texts = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for i in range(1, len(ids)):
        a, b = texts[i], texts[i + 1]
        if "\ufffd" in b or not b.startswith(a) or len(a) < 2 or len(b) - len(a) < 2:
            continue
        stop = a[-2:] + b[len(a) : len(a) + 2]
        if b.find(stop) == len(a) - 2 and stop not in texts[i] and stop.strip() == stop:
            return stop, i, a[:-2]
    return None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stop_string_across_token_boundary(tiny, arch):
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40)
    free = generate_rollouts(model, tok, prompts, 2, cfg, seed=11, ignore_eos=True)
    found = [(n, _boundary_stop_string(tok, completion(free, n))) for n in range(free.num_rows)]
    n, (stop, i, text) = next((n, f) for n, f in found if f is not None)
    batch = generate_rollouts(
        model, tok, prompts, 2, SamplingConfig(temperature=1.0, max_new_tokens=40, stop=[stop]),
        seed=11, ignore_eos=True,
    )  # fmt: skip
    ids = completion(free, n)
    assert batch.finish_reasons[n] == "stop"
    assert completion(batch, n) == ids[: i + 1]  # up to and including the completing token
    assert int(batch.completion_mask[n].sum()) == i + 1
    assert batch.texts[n] == text  # cut where the stop string starts
    assert np.allclose(
        np.array(batch.logprobs[n, : i + 1]), np.array(free.logprobs[n, : i + 1]), atol=1e-6
    )
    for m in range(batch.num_rows):  # every other row either never contains it or stops too
        full = tok.decode(completion(free, m))
        if stop not in full:
            assert batch.finish_reasons[m] == "length" and batch.texts[m] == full
        else:
            assert batch.finish_reasons[m] == "stop" and stop not in batch.texts[m]
            assert batch.texts[m] == full[: full.find(stop)]


def test_earliest_of_several_stop_strings_wins(tiny):
    model, tok = tiny("llama")
    prompt = chat(tok, QUESTIONS[1])
    cfg = SamplingConfig(temperature=0, max_new_tokens=30)
    free = generate_rollouts(model, tok, [prompt], 1, cfg, ignore_eos=True)
    ids = completion(free, 0)
    text = tok.decode(ids)
    clean = [i for i in range(len(text) - 2) if "\ufffd" not in text[i : i + 3]]
    late = text[clean[-1] : clean[-1] + 3]
    early = next(text[i : i + 2] for i in clean if i >= len(text) // 3)
    stops = [late, early, "never-there"]
    first = min(text.find(s) for s in stops[:2])
    # The first token after which the decoded text contains either stop string:
    k = next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))
    cfg = SamplingConfig(temperature=0, max_new_tokens=30, stop=stops)
    batch = generate_rollouts(model, tok, [prompt], 1, cfg, ignore_eos=True)
    assert batch.finish_reasons == ["stop"]
    assert batch.texts[0] == text[:first]
    assert completion(batch, 0) == ids[:k]
    assert k < len(ids)
    # include_stop keeps the earliest stop string itself (and nothing the token decoded after it).
    winner = min((s for s in stops[:2] if s in text), key=text.find)
    kept = generate_rollouts(
        model, tok, [prompt], 1, dataclasses.replace(cfg, include_stop=True), ignore_eos=True
    )
    assert kept.texts[0] == text[: first + len(winner)] and kept.texts[0].endswith(winner)
    assert completion(kept, 0) == ids[:k]


# ---------------------------------------------------------------- batch compute and memory


def test_finished_rows_leave_the_batch(tiny):
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40)
    free = generate_rollouts(model, tok, prompts, 4, cfg, seed=2, ignore_eos=True)
    # Make a common token an EOS so rows finish at different steps.
    counts = np.bincount(np.array(free.completion_ids).ravel())
    tok.eos_token_ids = {int(np.argsort(counts)[-3])}
    stats = RolloutStats()
    batch = generate_rollouts(model, tok, prompts, 4, cfg, seed=2, stats=stats)
    lengths = [int(x) for x in batch.lengths.tolist()]
    assert min(lengths) < max(lengths)
    assert stats.compactions >= 1
    # Compute actually spent is far below "every row runs until the longest is done".
    assert stats.row_steps < 0.8 * batch.num_rows * stats.decode_steps
    assert stats.row_steps >= sum(lengths) - batch.num_rows  # (first tokens come from prefill)
    assert stats.completion_tokens == sum(lengths)
    assert stats.prompt_tokens == sum(len(p) for p in prompts)
    # Dropping rows does not change what the kept rows generate.
    for n in range(batch.num_rows):
        assert completion(batch, n) == completion(free, n)[: lengths[n]]


def test_cache_grows_past_its_first_allocation(tiny):
    """300 new tokens outgrow the first 256-position block: outputs still match mlx-lm."""
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS[:2]]
    cfg = SamplingConfig(temperature=0, max_new_tokens=300)
    batch = generate_rollouts(model, tok, prompts, 2, cfg, ignore_eos=True)
    for b, p in enumerate(prompts):
        assert completion(batch, 2 * b) == reference_greedy(model, p, 300)


def test_nothing_stays_alive_after_a_rollout(tiny):
    model, tok = tiny("qwen3")
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=30)
    generate_rollouts(model, tok, prompts, 4, cfg, seed=0)  # warm up compiled kernels
    mx.synchronize()
    gc.collect()
    before = mx.get_active_memory()
    batch = generate_rollouts(model, tok, prompts, 4, cfg, seed=0)
    del batch
    mx.synchronize()
    gc.collect()
    assert mx.get_active_memory() - before <= 64 * 1024, mx.get_active_memory() - before


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(tiny):
    model, tok = tiny("qwen3")
    cfg = SamplingConfig(max_new_tokens=4)
    with pytest.raises(MlxRftError, match="group_size"):
        generate_rollouts(model, tok, [[1, 2]], 0, cfg)
    with pytest.raises(MlxRftError, match="prompt_ids is empty"):
        generate_rollouts(model, tok, [], 2, cfg)
    with pytest.raises(MlxRftError, match="prompt 1"):
        generate_rollouts(model, tok, [[1, 2], []], 2, cfg)
    with pytest.raises(MlxRftError, match="prompt 0 .*tokenize"):
        generate_rollouts(model, tok, ["hello"], 2, cfg)
    with pytest.raises(MlxRftError, match="token id 384 .* 384 entries"):
        generate_rollouts(model, tok, [[1, 384]], 2, cfg)
    with pytest.raises(MlxRftError, match="top_p"):
        generate_rollouts(model, tok, [[1, 2]], 2, SamplingConfig(top_p=0))
    model.make_cache = lambda: [RotatingKVCache(max_size=8) for _ in model.layers]
    with pytest.raises(MlxRftError, match="RotatingKVCache"):
        generate_rollouts(model, tok, [[1, 2]], 2, cfg)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_greedy_matches_mlx_lm_and_logprobs_match_teacher_forcing(default_model_dir):
    """SmolLM2-135M-Instruct, float32: greedy equals mlx_lm.stream_generate token for token, and
    sampled log-probs at T = 0.7 equal a plain forward's (measured max |diff| 3.4e-5; bound
    1e-4)."""
    model, tok = load_model(default_model_dir)
    # mlx-lm's generation and the teacher-forced pass with the CPU paths the engine uses.
    with cpu.speedups(model):
        prompts = [chat(tok, q) for q in ["What is 2 + 3?", "Name a primary colour.", "Say hi."]]
        cfg = SamplingConfig(temperature=0, max_new_tokens=32)
        greedy = generate_rollouts(model, tok, prompts, 2, cfg)
        for b, p in enumerate(prompts):
            # stream_generate's last response carries the EOS token when it stopped on one.
            ref = [r.token for r in stream_generate(model, tok, p, max_tokens=32)]
            got = completion(greedy, 2 * b)
            assert got == ref
            if greedy.finish_reasons[2 * b] == "stop":
                assert got[-1] in tok.eos_token_ids and not set(got[:-1]) & set(tok.eos_token_ids)
            else:
                assert greedy.finish_reasons[2 * b] == "length" and len(got) == 32
                assert not set(got) & set(tok.eos_token_ids)
            assert completion(greedy, 2 * b + 1) == completion(greedy, 2 * b)
        T = 0.7
        cfg = SamplingConfig(temperature=T, max_new_tokens=24)
        batch = generate_rollouts(model, tok, prompts, 2, cfg, seed=0)
        worst = 0.0
        for n in range(batch.num_rows):
            toks = completion(batch, n)
            ref = teacher_forced_logprobs(model, prompts[batch.group_index[n]], toks, T)
            worst = max(worst, float(np.abs(np.array(batch.logprobs[n, : len(toks)]) - ref).max()))
        assert worst <= 1e-4, worst
