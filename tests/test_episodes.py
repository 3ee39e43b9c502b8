"""Multi-turn episodes end to end: the engine's reply feeding (exact against a plain forward over
the whole episode, and against prefilling the same history from scratch), masks, turn and token
limits, environment errors and tool timeouts, the trainer with an environment, and resume."""

import time

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
import pytest

from mlx_rft.config import GRPOConfig
from mlx_rft.episodes import Environment, EpisodeLimits, EpisodeRunner, GuessNumber, make_envs
from mlx_rft.episodes.render import ReplyRenderer
from mlx_rft.errors import MlxRftError
from mlx_rft.models import load_model
from mlx_rft.policy.logprobs import sequence_logprobs
from mlx_rft.rollout import RolloutStats, generate_rollouts
from mlx_rft import GRPOTrainer
from mlx_rft.types import SamplingConfig

ARCHS = ["qwen3", "qwen3_moe", "llama"]
QUESTIONS = ["What is 2 + 3?", "Paris is the capital of which country? Answer in one word.", "def add(a, b):"]


@pytest.fixture
def tiny(tiny_model_factory):
    return lambda arch="qwen3": load_model(tiny_model_factory(arch))


def chat(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)


class ScriptedTurns:
    """A turn handler with fixed replies: row r gets replies of varying lengths until turn
    `last(r)`; rows with r % 4 == 0 end after their first turn."""

    def __init__(self, max_tokens=80, turns=3):
        self.max_tokens, self.turns, self.count, self.replies = max_tokens, turns, {}, {}

    def end_turn(self, row, ids, text, reason, used):
        n = self.count[row] = self.count.get(row, 0) + 1
        if reason == "tokens" or row % 4 == 0 or n >= self.turns:
            return None
        reply = [5 + (row + n) % 7] * (1 + (row * 3 + n) % 6)
        if used + len(reply) >= self.max_tokens:
            return None
        self.replies.setdefault(row, []).append(reply)
        return reply


def teacher_forced(model, prompt, ids, T):
    logits = model(mx.array([prompt + ids]))[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    z = logits.astype(mx.float32) / T
    lp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(lp, mx.array(ids)[:, None], axis=-1)[:, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_turn_logprobs_equal_teacher_forced_over_the_whole_episode(tiny, arch):
    model, tok = tiny(arch)
    prompts = [chat(tok, q) for q in QUESTIONS]
    T, G = 0.8, 4
    turns = ScriptedTurns()
    stats = RolloutStats()
    batch = generate_rollouts(model, tok, prompts, G, SamplingConfig(temperature=T, max_new_tokens=7),
                              seed=1, turns=turns, stats=stats)
    ids, mask = np.array(batch.completion_ids), np.array(batch.completion_mask)
    worst = 0.0
    for n in range(batch.num_rows):
        k = int(np.nonzero(mask[n])[0].max()) + 1
        seq = ids[n, :k].tolist()
        # The replies sit in the sequence, in order, with the mask 0 exactly there.
        replies = turns.replies.get(n, [])
        assert int((mask[n, :k] == 0).sum()) == sum(len(r) for r in replies)
        env_tokens = [t for t, m in zip(seq, mask[n, :k]) if m == 0]
        assert env_tokens == [t for r in replies for t in r]
        assert turns.count[n] == (1 if n % 4 == 0 else 3)
        ref = teacher_forced(model, prompts[n // G], seq, T)
        got = np.array(batch.logprobs[n, :k])
        worst = max(worst, float(np.abs(got - ref)[mask[n, :k] > 0].max()))
        assert np.all(got[mask[n, :k] == 0] == 0.0)
    assert worst <= 1e-4, worst
    assert stats.env_tokens == int(sum(len(r) for rs in turns.replies.values() for r in rs))
    assert stats.completion_tokens == int(mask.sum()) and stats.reply_feeds >= 1
    # The training pass (prompt shared or not) gives the behaviour log-probs back.
    for share in (True, False):
        lp, _ = sequence_logprobs(model, prompts, batch.completion_ids, batch.completion_mask, G, T,
                                  share_prompt=share)
        assert float(mx.abs((lp - batch.logprobs) * batch.completion_mask).max()) <= 1e-4


def test_a_fed_reply_continues_like_a_fresh_prefill_of_the_same_history(tiny):
    """Greedy: the turn after a reply equals a single-turn rollout whose prompt is the history."""
    model, tok = tiny("llama")
    prompts = [chat(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)

    class OneReply:
        max_tokens = 100

        def __init__(self):
            self.seen = {}

        def end_turn(self, row, ids, text, reason, used):
            self.seen.setdefault(row, []).append(list(ids))
            return [7, 8, 9][: 1 + row % 3] if len(self.seen[row]) == 1 else None

    turns = OneReply()
    batch = generate_rollouts(model, tok, prompts, 1, cfg, turns=turns)
    for n in range(3):
        first, second = turns.seen[n]
        reply = [7, 8, 9][: 1 + n % 3]
        fresh = generate_rollouts(model, tok, [prompts[n] + first + reply], 1, cfg)
        assert second == np.array(fresh.completion_ids[0]).tolist()
        k = len(first) + len(reply) + len(second)
        assert np.array(batch.completion_ids[n, :k]).tolist() == first + reply + second


class Echo(Environment):
    """Replies to each turn with a fixed user message until `turns` turns; counts what it saw."""

    def __init__(self, turns=3, error_at=None, bad_at=None):
        self.turns, self.error_at, self.bad_at, self.seen = turns, error_at, bad_at, 0

    def step(self, messages):
        self.seen += 1
        if self.seen == self.error_at:
            raise RuntimeError("the environment broke")
        if self.seen == self.bad_at:
            return "not a list"
        return None if self.seen >= self.turns else [{"role": "user", "content": "go on"}]


def run_episodes(model, tok, rows, factory, G=2, limits=EpisodeLimits(max_turns=3, max_tokens=200),
                 max_new_tokens=5, seed=0):
    envs, openings = make_envs(factory, rows, G)
    runner = EpisodeRunner(envs, openings, ReplyRenderer(tok), limits)
    prompts = [tok.apply_chat_template(o, add_generation_prompt=True) for o in openings[::G]]
    batch = generate_rollouts(model, tok, prompts, G, SamplingConfig(max_new_tokens=max_new_tokens),
                              seed=seed, turns=runner)
    return batch, runner.episodes


def test_rows_end_at_their_own_turns_and_limits(tiny):
    model, tok = tiny()
    rows = [{"prompt": "hello"}, {"prompt": "two"}, {"prompt": "three"}]
    made = iter([1, 1, 3, 3, 9, 9])  # row 0 ends at turn 1, row 1 runs 3 turns, row 2 hits max_turns
    batch, eps = run_episodes(model, tok, rows, lambda: Echo(turns=next(made)))
    assert [e.turns for e in eps] == [1, 1, 3, 3, 3, 3]
    assert [e.end for e in eps] == ["length", "length", "length", "length", "turns", "turns"]
    for n, e in enumerate(eps):
        # The episode's messages: opening, then assistant / user alternating; the reply tokens
        # are masked out and the last turn is the row's text.
        roles = [m["role"] for m in e.messages[e.opening:]]
        assert roles == ["assistant", "user"] * (e.turns - 1) + ["assistant"]
        assert batch.texts[n] == e.messages[-1]["content"]
        assert e.env_tokens == int((np.array(batch.completion_mask[n]) == 0).sum()
                                   - (batch.completion_ids.shape[1] - _extent(batch, n)))
        assert int(batch.completion_mask[n].sum()) == 5 * e.turns  # every turn hit max_new_tokens


def _extent(batch, n):
    return int(np.nonzero(np.array(batch.completion_mask[n]))[0].max()) + 1


def test_the_episode_token_limit_cuts_a_row(tiny):
    model, tok = tiny()
    limits = EpisodeLimits(max_turns=10, max_tokens=30)
    batch, eps = run_episodes(model, tok, [{"prompt": "hi"}], lambda: Echo(turns=99), G=2, limits=limits,
                              max_new_tokens=8)
    for n, e in enumerate(eps):
        assert e.end == "tokens" and 1 < e.turns < 10
        assert _extent(batch, n) <= 30


def test_an_environment_error_ends_its_episode_only(tiny):
    model, tok = tiny()
    made = iter([Echo(turns=3, error_at=2), Echo(turns=3), Echo(turns=3, bad_at=1), Echo(turns=3)])
    _, eps = run_episodes(model, tok, [{"prompt": "a"}, {"prompt": "b"}], lambda: next(made))
    assert eps[0].end == "error" and "RuntimeError: the environment broke" in eps[0].error
    assert eps[0].turns == 2
    assert eps[1].end == "length" and eps[1].turns == 3
    assert eps[2].end == "error" and "return a list" in eps[2].error and eps[2].turns == 1


def test_reset_must_not_differ_within_a_group(tiny):
    count = iter(range(100))

    class Moody(Environment):
        def reset(self, row):
            return [{"role": "user", "content": f"hello {next(count)}"}]

    with pytest.raises(MlxRftError, match="different opening messages"):
        make_envs(Moody, [{"prompt": "x"}], 2)


def test_a_slow_tool_is_answered_with_a_timeout_error(tiny):
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "done"

    from mlx_rft.episodes import as_tool

    class Slow(Environment):
        tools = (as_tool(slow, timeout=0.2),)

    env = Slow()
    t0 = time.perf_counter()
    reply = env.step([{"role": "assistant", "content":
                       '<tool_call>{"name": "slow", "arguments": {"seconds": 3}}</tool_call>'}])
    assert time.perf_counter() - t0 < 2.0
    assert "timed out" in reply[0]["content"] and env.tool_errors == 1 and env.tool_calls == 1


def test_reply_rendering_follows_the_chat_template(tiny):
    _, tok = tiny()
    r = ReplyRenderer(tok)
    reply = [{"role": "tool", "content": "42"}]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # After a sampled EOS the template's end marker is not repeated; after a stop string it is.
    assert r.reply_text(reply, ended_with_eos=True) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert r.reply_text(reply, ended_with_eos=False).startswith("<|im_end|>\n<|im_start|>tool")
    ids = r.reply_ids(reply, eos)
    assert tok.decode(ids) == r.reply_text(reply, True) and eos in ids


def test_penalties_are_refused_with_episodes(tiny):
    model, tok = tiny()
    with pytest.raises(MlxRftError, match="not supported in multi-turn"):
        generate_rollouts(model, tok, [chat(tok, "hi")], 1,
                          SamplingConfig(repetition_penalty=1.2, max_new_tokens=4), turns=ScriptedTurns())


# ---------------------------------------------------------------- the trainer


def guess_cfg(model_dir, out, **kw):
    base = dict(model=str(model_dir), env="guess", task_size=8, eval_size=2, max_new_tokens=6,
                max_turns=3, output_dir=str(out), save_every=2, learning_rate=3e-3, group_size=4,
                prompts_per_step=2, seed=3)
    base.update(kw)
    return GRPOConfig(**base)


def test_trainer_runs_episodes_and_logs_them(tiny_qwen3, tmp_path):
    import json

    res = GRPOTrainer(guess_cfg(tiny_qwen3, tmp_path, num_steps=2)).train()
    steps = [h for h in res.history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert h["episode/turns"] == 3.0  # a random model never guesses: every episode runs 3 turns
        assert h["episode/truncated_turns"] == 1.0 and h["episode/env_tokens"] > 0
        # At most 3 turns x 6 sampled tokens (a turn may end at EOS): the replies are not counted.
        assert 12 < h["completion/mean_length"] <= 18.0
    line = json.loads((tmp_path / "rollouts.jsonl").read_text().splitlines()[0])
    ep = line["episode"]
    assert [m["role"] for m in ep["messages"]] == ["assistant", "user", "assistant", "user", "assistant"]
    assert "<guess>" in ep["messages"][1]["content"] and ep["end"] == "turns"
    assert "eval/accuracy" in res.eval_after


def vowel_share(prompts, completions, **columns):
    """A reward that varies within groups (a random model never wins the game)."""
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in completions]


def test_trainer_resume_mid_run_is_exact_with_episodes(tiny_qwen3, tmp_path):
    def run(out, steps, resume=None):
        t = GRPOTrainer(guess_cfg(tiny_qwen3, out, num_steps=steps, resume=resume),
                        reward_funcs=[vowel_share])
        return t, t.train()

    full, a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, b = run(tmp_path / "b", 4, resume="latest")
    wa = dict(tree_flatten(full.policy.trainable_parameters()))
    wb = dict(tree_flatten(resumed.policy.trainable_parameters()))
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6, err_msg=k)
    la = [h["loss"] for h in a.history if "loss" in h]
    lb = [h["loss"] for h in b.history if "loss" in h]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-6)
    assert any(abs(x) > 1e-6 for x in la)  # the steps did learn something


def test_arithmetic_env_scores_through_its_environment_with_a_constant_baseline(tiny_qwen3, tmp_path):
    cfg = guess_cfg(tiny_qwen3, tmp_path, env="arithmetic", num_steps=1, max_prompt_length=1024)
    trainer = GRPOTrainer(cfg)
    res = trainer.train()
    assert trainer.episodes.stop == ("</tool_call>",)  # a tool call ends its turn
    ev = res.eval_after
    assert ev["eval/accuracy"] == 0.0 and "eval/constant_baseline" in ev and "eval/distinct_answers" in ev


def test_constant_baseline_scores_episodes_through_their_environment():
    from mlx_rft.episodes import Arithmetic, Episode
    from mlx_rft.episodes.data import environment_reward
    from mlx_rft.evaluate import constant_answer_baseline
    from mlx_rft.rewards import RewardSet
    from mlx_rft.types import PromptExample

    rows = Arithmetic.make_rows(3, seed=0)
    rows[1]["answer"] = rows[0]["answer"]
    examples = [PromptExample(prompt="p", prompt_ids=[1], columns=r) for r in rows]
    envs, openings = make_envs(Arithmetic, rows, 1)
    eps = [Episode(messages=[*o, {"role": "assistant", "content": "no answer"}], env=e, opening=len(o))
           for e, o in zip(envs, openings)]
    # Two of three rows share an answer: saying it every time scores 2/3 through the environments.
    assert constant_answer_baseline(RewardSet([environment_reward()]), examples, [None] * 3,
                                    episodes=eps) == pytest.approx(2 / 3)


def test_guess_rows_and_bad_env_names_get_clear_errors(tiny_qwen3, tmp_path):
    with pytest.raises(MlxRftError, match="arithmetic"):
        GRPOTrainer(guess_cfg(tiny_qwen3, tmp_path, env="nope", num_steps=1)).train()
    rows = GuessNumber.make_rows(3, seed=0)
    assert rows == GuessNumber.make_rows(3, seed=0) and all(1 <= r["secret"] <= 100 for r in rows)


def test_default_model_tool_episodes_logprobs_equal_teacher_forced(default_model_dir):
    """SmolLM2-135M-Instruct, float32, the arithmetic environment with the real calculator.

    The shared-prompt training pass (what the loss uses) gives the behaviour log-probs back to 1e-4.
    Against a plain unpadded forward over the whole multi-turn sequence the bound is 2e-4: on these
    ~350-token left-padded prompts the batched forward's float32 error reaches 1.1e-4 after a fed
    reply and 1.4e-4 in a first turn, where single-turn rollouts of the same prompts show the same
    (tokens of log-prob around -4, relative error ~3e-5). The reply path itself is exact on the tiny
    models (2e-6) and continues like a fresh prefill (tests above)."""
    from mlx_rft import cpu
    from mlx_rft.episodes.data import episode_setup, episode_dataset
    from mlx_rft.episodes.envs import Arithmetic

    model, tok = load_model(default_model_dir)
    setup = episode_setup(GRPOConfig(env="arithmetic", max_new_tokens=40), tok)
    examples = list(episode_dataset(Arithmetic.make_rows(3, seed=11), tok, setup, source="t",
                                    max_prompt_length=512))
    prompts = [e.prompt_ids for e in examples]
    T, G = 0.7, 4
    sampling = setup.sampling(SamplingConfig(temperature=T, max_new_tokens=40))
    with cpu.speedups(model):
        runner = setup.runner(examples, G)
        batch = generate_rollouts(model, tok, prompts, G, sampling, seed=2, turns=runner)
        mask = np.array(batch.completion_mask)
        assert sum(e.turns >= 2 for e in runner.episodes) >= 2  # episodes that called the tool
        after_reply = whole = 0.0
        for n in range(batch.num_rows):
            k = _extent(batch, n)
            seq = np.array(batch.completion_ids[n, :k]).tolist()
            diff = np.abs(np.array(batch.logprobs[n, :k]) - teacher_forced(model, prompts[n // G], seq, T))
            env = np.nonzero(mask[n, :k] == 0)[0]
            first = int(env[0]) if len(env) else k
            if first < k:
                after_reply = max(after_reply, float(diff[first:][mask[n, first:k] > 0].max()))
            whole = max(whole, float(diff[mask[n, :k] > 0].max()))
        assert after_reply > 0.0  # some tokens came after a reply
        assert whole <= 2e-4, whole
        lp, _ = sequence_logprobs(model, prompts, batch.completion_ids, batch.completion_mask, G, T)
        assert float(mx.abs((lp - batch.logprobs) * batch.completion_mask).max()) <= 1e-4


def test_tools_on_task_rows_keep_the_task_system_prompt_and_add_the_tools(tiny_qwen3, tmp_path):
    from mlx_rft.train.run_data import build_run_data

    _, tok = load_model(tiny_qwen3)
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
    cfg = guess_cfg(tiny_qwen3, tmp_path, env=None, tools=["calculator"], system_prompt="Answer briefly.",
                    eval_size=4)
    data = build_run_data(cfg, tok, rows, reward_specs=[vowel_share])
    assert len(data.train) == 8 and len(data.eval) == 4
    first = data.train[0]
    # The task's system message comes first, the tools' description after it, then the question.
    assert first.prompt.index("Answer briefly.") < first.prompt.index("<tools>") < first.prompt.index("What is")
    assert '"name": "calculator"' in first.prompt and data.episodes.stop == ("</tool_call>",)
    env = data.episodes.factory()
    assert env.reset(first.columns)[0]["content"].startswith("Answer briefly.")
    reply = env.step([{"role": "assistant", "content":
                       '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 2"}}</tool_call>'}])
    assert reply == [{"role": "tool", "name": "calculator", "content": "4"}]


def test_eval_command_scores_episodes_of_an_environment(tiny_qwen3, capsys):
    import json

    from mlx_rft.evaluate import main

    main(["--model", str(tiny_qwen3), "--env", "arithmetic", "--limit", "3", "--max-new-tokens", "6",
          "--max-turns", "2"])
    out = json.loads(capsys.readouterr().out)
    # The environment's held-out rows, scored by the environment (a random model gets none right).
    assert out["prompts"] == 3 and out["eval/accuracy"] == 0.0 and "eval/constant_baseline" in out
