"""Separate rollout workers, the parts that need no second process: the message codec, the
rollout records, the job schedule, the off-policy loss weights (against float64 references),
the configuration rules and the role split. The processes themselves: test_distributed.py."""

import mlx_rft  # noqa: F401

import itertools
import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft import GRPOConfig
from mlx_rft.algo.losses import LossConfig, compute_loss, off_policy_weights
from mlx_rft.episodes.runner import Episode
from mlx_rft.errors import MlxRftError
from mlx_rft.rewards.base import RewardResult
from mlx_rft.train.distributed import World
from mlx_rft.types import PromptExample, RolloutBatch
from mlx_rft.workers import JobSchedule, split_roles
from mlx_rft.workers.coordinator import Wakeups
from mlx_rft.workers.link import _flatten_by_dtype, _unflatten, decode, encode
from mlx_rft.workers.records import pack_rollouts, unpack_rollouts
from mlx_rft.workers.schedule import NoWorkersLeft


# ---------------------------------------------------------------------------------- messages
def test_codec_round_trip():
    arrays = {"ids": np.arange(12, dtype=np.int32).reshape(3, 4), "lp": np.array([-0.5, np.nan], np.float32)}
    header = {"step": 7, "texts": ["a", "ü \n"], "x": None, "nan": float("nan")}
    back_header, back = decode(encode(header, arrays))
    assert back_header["step"] == 7 and back_header["texts"] == ["a", "ü \n"] and back_header["x"] is None
    assert np.isnan(back_header["nan"])
    assert back.keys() == arrays.keys()
    np.testing.assert_array_equal(back["ids"], arrays["ids"])
    assert back["ids"].dtype == np.int32
    np.testing.assert_array_equal(back["lp"], arrays["lp"])


def test_codec_never_unpickles():
    payload = encode({}, {"obj": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        decode(payload)


def test_tensors_travel_as_one_buffer_per_dtype_and_come_back_exactly():
    rng = np.random.default_rng(0)
    tensors = [
        mx.array(rng.normal(size=(3, 4)).astype(np.float32)),
        mx.array(rng.normal(size=(5,)).astype(np.float32)).astype(mx.bfloat16),
        mx.array(rng.normal(size=(2, 2, 2)).astype(np.float32)),
        mx.array(np.arange(6, dtype=np.int32).reshape(2, 3)),
        mx.array(rng.normal(size=(1,)).astype(np.float32)).astype(mx.bfloat16),
        mx.zeros((0, 3)),
    ]
    flat = _flatten_by_dtype(tensors)
    assert [b.dtype for b in flat] == [mx.float32, mx.bfloat16, mx.int32]
    assert [b.size for b in flat] == [12 + 8 + 0, 6, 6]
    back = _unflatten([(tuple(t.shape), t.dtype) for t in tensors], flat)
    for a, b in zip(tensors, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert mx.array_equal(a, b).item()


def test_the_trainer_wakes_shortly_before_a_result_is_due(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("mlx_rft.workers.coordinator.time.time", lambda: now[0])
    w = Wakeups()
    w.sent(3)
    assert w.expected(3, [3], worker=1) is None  # nothing known about the worker yet
    w.answered(1, {"step": 2, "seconds": {"busy": 8.0}, "finished_at": 999.0})
    w.answered(1, {"step": 1, "seconds": {"busy": 4.0}, "finished_at": 1000.0})
    # job 3 was sent before the worker was free: it starts at 1000 and takes >= 4 s (the
    # shortest recent job); wake a quarter of that early
    assert w.expected(3, [3], worker=1) == pytest.approx(1000.0 + 4.0 - 1.0)
    now[0] = 1010.0
    w.sent(4)  # queued behind 3, which has not come back yet
    assert w.expected(4, [3, 4], worker=1) == pytest.approx(1010.0 + 3.0)  # at most one job ahead
    now[0] = 1000.5
    assert w.expected(4, [3, 4], worker=1) == pytest.approx(1000.5 + 3.0)


def test_rollouts_and_rewards_round_trip():
    G, T = 2, 3
    examples = [PromptExample(f"p{i}", [1, 2, i], {"answer": str(i)}) for i in range(2)]
    ep = Episode(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 env=object(), turns=2, tool_calls=1, env_tokens=4, end="turns", opening=1)
    ro = RolloutBatch(
        prompt_ids=[e.prompt_ids for e in examples],
        completion_ids=mx.array(np.arange(12).reshape(4, T), dtype=mx.int32),
        completion_mask=mx.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=mx.float32),
        logprobs=mx.array(-np.linspace(0.1, 1.2, 12).reshape(4, T), dtype=mx.float32),
        truncated_logprobs=mx.array(-np.linspace(0.0, 1.1, 12).reshape(4, T), dtype=mx.float32),
        texts=["x", "y", "z", ""], finish_reasons=["stop", "length", "stop", "stop"],
        group_index=[0, 0, 1, 1], group_size=G, episodes=[ep] * 4,
    )
    rw = RewardResult(
        total=np.array([1.0, np.nan, 0.5, 0.0]), per_func={"acc": np.array([1.0, np.nan, 0.5, 0.0])},
        details={"judge/clarity": np.array([0.2, 0.3, np.nan, 1.0])},
        stats={"acc": {"mean": 0.5, "std": 0.4, "failures": 1.0}}, metrics={"acc/parse_failures": 1.0},
        weights={"acc": 1.0}, judges=[], reasons={"acc": "no answer"},
    )
    header, arrays = pack_rollouts(ro, rw)
    header, arrays = decode(encode(header, arrays))  # through the wire format
    ro2, rw2 = unpack_rollouts(header, arrays, examples)
    for name in ("completion_ids", "completion_mask", "logprobs", "truncated_logprobs"):
        a, b = np.asarray(getattr(ro, name)), np.asarray(getattr(ro2, name))
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert ro2.texts == ro.texts and ro2.finish_reasons == ro.finish_reasons
    assert ro2.group_index == ro.group_index and ro2.group_size == G and ro2.prompt_ids == ro.prompt_ids
    assert ro2.episodes[0].as_record() == ep.as_record() and ro2.episodes[0].env is None
    np.testing.assert_array_equal(rw2.total, rw.total)
    np.testing.assert_array_equal(rw2.per_func["acc"], rw.per_func["acc"])
    np.testing.assert_array_equal(rw2.details["judge/clarity"], rw.details["judge/clarity"])
    assert rw2.summary().keys() == rw.summary().keys()
    assert rw2.unscored_reason() == rw.unscored_reason() and rw2.num_unscored == 1
    with pytest.raises(ValueError, match="4 rollouts for 1 prompts"):
        unpack_rollouts(header, arrays, examples[:1])


# ---------------------------------------------------------------------------------- schedule
def test_staleness_zero_is_the_synchronous_order():
    s = JobSchedule([1], start_step=0, num_steps=3, max_staleness=0)
    assert s.ready() == [(1, 1)]
    assert s.ready() == []  # step 2 needs the weights after step 1
    s.answered(1)
    assert s.publish_due(1)
    s.publish(1)
    assert s.ready() == [(2, 1)]
    s.answered(2)
    s.publish(2)
    assert s.ready() == [(3, 1)]
    s.answered(3)
    assert not s.publish_due(3)  # no job is left to use them


def test_staleness_one_keeps_two_jobs_in_flight_over_two_workers():
    s = JobSchedule([1, 2], start_step=0, num_steps=5, max_staleness=1)
    assert s.ready() == [(1, 1), (2, 2)]
    s.answered(1)
    s.publish(1)
    assert s.ready() == [(3, 1)]
    assert s.staleness(2, version=0) == 1 and s.staleness(3, version=1) == 1


def test_resumed_schedule_starts_after_the_checkpoint():
    s = JobSchedule([1], start_step=10, num_steps=12, max_staleness=2)
    assert s.published == 10 and s.ready() == [(11, 1), (12, 1)]


@pytest.mark.parametrize("k, sync, workers", [
    (k, w, n) for k, w, n in itertools.product(range(4), range(1, 4), range(1, 4)) if k >= w - 1
])
def test_every_step_is_sent_once_within_the_staleness_bound(k, sync, workers):
    """A simulated run: the trainer takes each step's delivery, updates, publishes when due."""
    s = JobSchedule(list(range(1, workers + 1)), start_step=0, num_steps=20, max_staleness=k,
                    weight_sync_steps=sync)
    version_at_send, sent = {}, []
    for step, _ in s.ready():
        version_at_send[step] = s.published
        sent.append(step)
    for step in range(1, 21):
        assert step in version_at_send, f"step {step} never sent"
        assert 0 <= s.staleness(step, version_at_send[step]) <= k
        if sync == 1 and step > k:  # as fresh as allowed, no fresher: the overlap k buys
            assert s.staleness(step, version_at_send[step]) == k
        s.answered(step)
        if s.publish_due(step):
            s.publish(step)
        for j, _ in s.ready():
            version_at_send[j] = s.published
            sent.append(j)
    assert sent == list(range(1, 21))


def test_a_failed_worker_hands_its_jobs_to_the_others():
    s = JobSchedule([1, 2, 3], start_step=0, num_steps=9, max_staleness=5)
    jobs = s.ready()
    assert [w for _, w in jobs] == [1, 2, 3, 1, 2, 3]
    moved = s.fail(2, "broke")
    assert [j for j, _ in moved] == [2, 5] and {w for _, w in moved} <= {1, 3}
    assert s.live == [1, 3] and s.queues[2] == []
    assert all(s.owner[j] == w for j, w in moved)
    s.fail(1, "broke too")
    with pytest.raises(NoWorkersLeft, match="rank 1: broke too"):
        s.fail(3, "gone")


def test_schedule_refuses_a_bound_the_weight_sync_cannot_meet():
    with pytest.raises(ValueError, match="max_staleness"):
        JobSchedule([1], 0, 5, max_staleness=0, weight_sync_steps=2)


# ---------------------------------------------------------------------------------- the loss
def _inputs(seed=0, N=4, T=5):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, (N, T))
    behaviour = logp + rng.normal(0, 0.6, (N, T))  # older weights: off by up to ~2 nats
    mask = (rng.uniform(size=(N, T)) > 0.25).astype(np.float64)
    mask[0] = 1.0
    adv = rng.normal(size=N)
    return logp, behaviour, mask, adv


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_off_policy_weights_match_float64(mode):
    logp, behaviour, mask, _ = _inputs()
    cap = 1.5
    w, mean, capped = off_policy_weights(mx.array(logp, mx.float32), mx.array(behaviour, mx.float32),
                                         mx.array(mask, mx.float32), mode, cap)
    ref = np.exp(logp - behaviour)
    expect = np.minimum(ref, cap) if mode == "tis" else np.where(ref > cap, 0.0, ref)
    np.testing.assert_allclose(np.asarray(w), expect * mask, rtol=2e-6, atol=1e-7)
    valid = mask > 0
    assert float(mean) == pytest.approx(ref[valid].mean(), rel=1e-5)
    assert float(capped) == pytest.approx((ref[valid] > cap).mean(), abs=1e-6)
    assert 0 < float(capped) < 1  # the case exercises both sides of the cap


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("with_proximal", [False, True])
def test_corrected_dapo_loss_and_gradient_match_float64(mode, with_proximal):
    """loss = sum_t m_t * -min(r A, clip(r) A) * w_t / sum m, r = exp(logp - proximal),
    w = the capped exp(proximal - behaviour); proximal = this policy (None) or given."""
    logp, behaviour, mask, adv = _inputs(1)
    rng = np.random.default_rng(2)
    proximal = logp + rng.normal(0, 0.15, logp.shape) if with_proximal else logp
    cfg = LossConfig(loss_type="dapo", epsilon=0.2, off_policy_correction=mode, off_policy_cap=1.6)
    f32 = lambda x: mx.array(x, mx.float32)  # noqa: E731

    def loss_of(lp):
        loss, _ = compute_loss(cfg, lp, f32(proximal) if with_proximal else None, None, f32(adv),
                               f32(mask), behaviour_logp=f32(behaviour))
        return loss

    value, grad = mx.value_and_grad(loss_of)(f32(logp))
    w = np.exp(proximal - behaviour)
    w = np.minimum(w, 1.6) if mode == "tis" else np.where(w > 1.6, 0.0, w)
    r = np.exp(logp - proximal)
    A = adv[:, None]
    unclipped, clipped = r * A, np.clip(r, 0.8, 1.2) * A
    per_token = -np.minimum(unclipped, clipped) * w
    expect = (per_token * mask).sum() / mask.sum()
    # d/dlogp: -w A r where the unclipped term is the smaller (or the clip is inactive), else 0
    active = (unclipped <= clipped) | ((r >= 0.8) & (r <= 1.2))
    expect_grad = np.where(active, -w * A * r, 0.0) * mask / mask.sum()
    assert float(value) == pytest.approx(expect, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(grad), expect_grad, rtol=1e-4, atol=1e-7)


def test_no_correction_ignores_the_behaviour_log_probs():
    logp, behaviour, mask, adv = _inputs(3)
    f32 = lambda x: mx.array(x, mx.float32)  # noqa: E731
    cfg = LossConfig(loss_type="dapo")
    a, sa = compute_loss(cfg, f32(logp), f32(behaviour), None, f32(adv), f32(mask))
    b, sb = compute_loss(cfg, f32(logp), f32(behaviour), None, f32(adv), f32(mask), behaviour_logp=f32(logp))
    assert float(a) == float(b) and sb.is_weight_mean is None
    tis = LossConfig(loss_type="dapo", off_policy_correction="tis")
    c, sc = compute_loss(tis, f32(logp), None, None, f32(adv), f32(mask), behaviour_logp=f32(behaviour))
    assert float(c) != float(a) and float(sc.is_weight_mean) > 0


@pytest.mark.parametrize("kw, match", [
    ({"off_policy_correction": "clip"}, "off_policy_correction='clip' is not valid"),
    ({"off_policy_cap": 1.0}, "off_policy_cap=1.0 must be a finite number > 1"),
    ({"max_staleness": -1}, "max_staleness=-1 must be >= 0"),
    ({"weight_sync_steps": 0}, "weight_sync_steps=0 must be >= 1"),
    ({"rollout_workers": -2}, "rollout_workers=-2 must be >= 0"),
    ({"max_staleness": 1, "weight_sync_steps": 3}, "set max_staleness to 2 or more"),
    ({"rollout_workers": 1, "dynamic_sampling": True}, "dynamic_sampling with rollout_workers"),
])
def test_config_rules(kw, match):
    with pytest.raises(MlxRftError, match=match):
        GRPOConfig(**kw).validate()


def test_roles_need_one_process_per_role(monkeypatch):
    assert split_roles(World(None), 0) is None
    with pytest.raises(MlxRftError, match=r"needs 3 processes \(1 trainer \+ 2 workers\) but this run has 1"):
        split_roles(World(None), 2)
    monkeypatch.setenv("MLX_HOSTFILE", "hosts.json")
    with pytest.raises(MlxRftError, match="at most 2 rollout workers; use --backend mpi"):
        split_roles(World(None, 0, 4), 3)


def test_schedule_property_random_failures():
    """Jobs survive any order of worker failures while one worker is left."""
    rng = random.Random(0)
    for _ in range(50):
        s = JobSchedule([1, 2, 3], start_step=0, num_steps=12, max_staleness=2)
        pending = [j for j, _ in s.ready()]
        for victim in rng.sample([1, 2, 3], 2):
            s.fail(victim, "x")
        assert sorted(s.owner) == sorted(pending) and set(s.owner.values()) == set(s.live)
