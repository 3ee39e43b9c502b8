"""GRPO-family losses vs float64 NumPy references (values and gradients), hand cases, invariants."""

import mlx_rft  # noqa: F401

import itertools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rft.algo.losses import (
    LOSSES,
    LossConfig,
    compute_loss,
    high_entropy_mask,
    mask_truncated_completions,
)
from mlx_rft.errors import MlxRftError
from mlx_rft.policy.logprobs import sequence_logprobs

N, T = 6, 8
LENGTHS = [8, 5, 1, 0, 3, 8]  # includes an empty row (e.g. a truncated completion masked out)
MAX_LEN = 12


# ----------------------------------------------------------------------------------------------
# float64 NumPy reference, written from the formulas


def np_high_entropy_mask(entropy, mask, q):
    valid = mask > 0
    thr = np.quantile(entropy[valid], 1.0 - q)  # linear interpolation, like torch.quantile
    return ((entropy >= thr) & valid).astype(np.float64)


def np_loss(logp, logp_sg, old, ref, adv, mask, cfg, entropy=None, gtc=None):
    """The loss as a function of `logp`; `logp_sg` holds the values seen through stop_gradient."""
    valid = mask > 0
    old_ = logp_sg if old is None else old
    A = adv[:, None]
    eh = cfg.eps_high

    def weights(lp):
        lr = np.where(valid, lp - old_, 0.0)
        if cfg.importance_sampling_level == "token":
            return np.exp(lr)
        return np.exp(lr.sum(-1, keepdims=True) / np.maximum(mask.sum(-1, keepdims=True), 1))

    if cfg.loss_type == "cispo":
        pt = -np.minimum(weights(logp_sg), 1 + eh) * A * logp
    else:
        r = weights(logp)
        c1 = r if cfg.delta is None else np.minimum(r, cfg.delta)
        c2 = np.clip(r, 1 - cfg.epsilon, 1 + eh)
        pt = -np.minimum(c1 * A, c2 * A)
    if cfg.top_entropy_quantile < 1:
        pt = pt * np_high_entropy_mask(entropy, mask, cfg.top_entropy_quantile)
    if cfg.beta > 0:
        d = np.where(valid, ref - logp, 0.0)
        pt = pt + cfg.beta * (np.exp(d) - d - 1)
    if cfg.entropy_coef > 0:
        pt = pt - cfg.entropy_coef * entropy
    pt = np.where(valid, np.broadcast_to(pt, mask.shape), 0.0)
    total = (pt * mask).sum()
    if cfg.loss_type == "grpo":
        return ((pt * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    if cfg.loss_type == "bnpo":
        return total / max(mask.sum(), 1)
    if cfg.loss_type == "dr_grpo":
        return total / (mask.shape[0] * cfg.max_completion_length)
    return total / max(mask.sum() if gtc is None else gtc, 1)


def np_grad(logp, old, ref, adv, mask, cfg, entropy=None, gtc=None, h=1e-6):
    """Central differences of np_loss w.r.t. logp (stop-gradient values held fixed)."""
    g = np.zeros_like(logp)
    for idx in np.ndindex(*logp.shape):
        plus, minus = logp.copy(), logp.copy()
        plus[idx] += h
        minus[idx] -= h
        g[idx] = (
            np_loss(plus, logp, old, ref, adv, mask, cfg, entropy, gtc)
            - np_loss(minus, logp, old, ref, adv, mask, cfg, entropy, gtc)
        ) / (2 * h)
    return g


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
    logp = np.log(rng.uniform(0.05, 0.95, size=(N, T))).astype(np.float32)
    # Ratios spread over ~[0.6, 1.6] so every clipping branch is exercised.
    old = (logp + rng.normal(0, 0.25, size=(N, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, size=(N, T))).astype(np.float32)
    # Padding holds garbage, which must not leak into anything.
    logp = np.where(mask > 0, logp, rng.uniform(-50, 5, size=(N, T))).astype(np.float32)
    old = np.where(mask > 0, old, rng.uniform(-50, 5, size=(N, T))).astype(np.float32)
    # Alternating signs, so both long rows and both short rows see positive and negative A.
    adv = ((np.abs(rng.normal(size=N)) + 0.1) * np.array([1, -1, 1, -1, 1, -1])).astype(np.float32)
    entropy = rng.uniform(0, 3, size=(N, T)).astype(np.float32)
    return logp, old, ref, adv, mask, entropy


def mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, entropy=None, gtc=None, rows=None):
    def f(lp):
        return compute_loss(
            cfg, lp, None if old is None else mx.array(old), mx.array(ref), mx.array(adv),
            mx.array(mask), entropy=None if entropy is None else mx.array(entropy),
            global_token_count=gtc, num_sequences=rows,
        )

    (loss, stats), g = mx.value_and_grad(lambda lp: (lambda o: (o[0], o[1].as_dict()))(f(lp)))(mx.array(logp))
    return loss, stats, g


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


CLIPS = {
    "symmetric": dict(epsilon=0.2),
    "asymmetric": dict(epsilon=0.2, epsilon_high=0.28),
    "delta": dict(epsilon=0.2, epsilon_high=0.28, delta=1.3),
}


@pytest.mark.parametrize(
    "loss_type,level,clip,beta,top_q",
    list(itertools.product(LOSSES, ["token", "sequence"], CLIPS, [0.0, 0.04], [1.0, 0.4])),
)
def test_matches_numpy_reference(loss_type, level, clip, beta, top_q):
    logp, old, ref, adv, mask, entropy = make_inputs()
    cfg = LossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta,
        max_completion_length=MAX_LEN, top_entropy_quantile=top_q, **CLIPS[clip],
    )
    f64 = [x.astype(np.float64) for x in (logp, old, ref, adv, mask, entropy)]
    expected = np_loss(f64[0], f64[0], *f64[1:5], cfg, f64[5])
    expected_grad = np_grad(*f64[:5], cfg, f64[5])
    loss, stats, grad = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, entropy)
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected), (loss.item(), expected)
    assert rel_err(grad, expected_grad) <= 1e-5
    assert np.all(np.asarray(grad)[mask == 0] == 0)  # padding gets no gradient
    assert stats["num_tokens"].item() == mask.sum()


@pytest.mark.parametrize("loss_type", LOSSES)
def test_entropy_bonus_matches_numpy_reference(loss_type):
    logp, old, ref, adv, mask, entropy = make_inputs(2)
    cfg = LossConfig(loss_type=loss_type, max_completion_length=MAX_LEN, entropy_coef=0.05, beta=0.04)
    f64 = [x.astype(np.float64) for x in (logp, old, ref, adv, mask, entropy)]
    expected = np_loss(f64[0], f64[0], *f64[1:5], cfg, f64[5])
    plain = np_loss(f64[0], f64[0], *f64[1:5], LossConfig(
        loss_type=loss_type, max_completion_length=MAX_LEN, beta=0.04), f64[5])
    assert abs(expected - plain) > 1e-3  # the bonus moves the loss
    loss, _, grad = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, entropy)
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected), (loss.item(), expected)
    assert rel_err(grad, np_grad(*f64[:5], cfg, f64[5])) <= 1e-5


def test_hand_entropy_bonus():
    # One token, A = 0, entropy 2.0: the loss is -entropy_coef * H = -0.02 (any aggregation of
    # a single token); without entropy the bonus is refused.
    cfg = LossConfig(loss_type="dapo", entropy_coef=0.01)
    one = mx.array([[math.log(0.5)]])
    loss, _ = compute_loss(cfg, one, None, None, mx.array([0.0]), mx.ones((1, 1)), entropy=mx.array([[2.0]]))
    assert loss.item() == pytest.approx(-0.02, rel=1e-6)
    with pytest.raises(MlxRftError, match="entropy_coef > 0"):
        compute_loss(cfg, one, None, None, mx.array([0.0]), mx.ones((1, 1)))
    with pytest.raises(MlxRftError, match="entropy_coef"):
        LossConfig(entropy_coef=-1.0)


def test_reference_exercises_every_branch():
    """The random inputs hit low clips, high clips, the delta cap and unclipped tokens."""
    logp, old, _, adv, mask, _ = make_inputs()
    r = np.exp(logp - old)[mask > 0]
    a = np.broadcast_to(adv[:, None], mask.shape)[mask > 0]
    assert ((r < 0.8) & (a < 0)).any() and ((r > 1.28) & (a > 0)).any()
    assert ((r > 1.3) & (a < 0)).any()  # delta caps the unclipped term here
    assert ((r > 0.8) & (r < 1.2)).any()


def test_stats_match_numpy():
    logp, old, ref, adv, mask, entropy = make_inputs(1)
    cfg = LossConfig(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.1)
    _, stats, _ = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, entropy)
    valid = mask > 0
    r = np.exp(logp.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], mask.shape)
    low = (r < 0.8) & (a < 0)
    high = (r > 1.28) & (a > 0)
    d = ref.astype(np.float64) - logp
    kl = np.exp(d) - d - 1
    for name, value in [
        ("clip_low", low[valid].mean()),
        ("clip_high", high[valid].mean()),
        ("clip_region", (low | high)[valid].mean()),
        ("ratio_mean", r[valid].mean()),
        ("kl_mean", kl[valid].mean()),
        ("entropy_mean", entropy[valid].mean()),
    ]:
        assert stats[name].item() == pytest.approx(value, rel=1e-5), name
    # Sequence level: fractions over rows with tokens.
    cfg = LossConfig(loss_type="grpo", importance_sampling_level="sequence")
    _, stats, _ = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask)
    lengths = mask.sum(-1)
    rs = np.exp((np.where(valid, logp.astype(np.float64) - old, 0)).sum(-1) / np.maximum(lengths, 1))
    rows = lengths > 0
    assert stats["ratio_mean"].item() == pytest.approx(rs[rows].mean(), rel=1e-5)
    hi = ((rs > 1.2) & (adv > 0))[rows].mean()
    assert stats["clip_high"].item() == pytest.approx(hi, abs=1e-7)


# ----------------------------------------------------------------------------------------------
# Hand-derived cases


def one(x):
    return mx.array([[x]], dtype=mx.float32)


def scalar_case(cfg, logp, old, adv, ref=None):
    def f(lp):
        loss, _ = compute_loss(
            cfg, lp, None if old is None else one(old), None if ref is None else one(ref),
            mx.array([adv]), mx.ones((1, 1)),
        )
        return loss

    loss, g = mx.value_and_grad(f)(one(logp))
    return loss.item(), g.item()


def test_hand_clipping():
    lp, old = math.log(0.5), math.log(0.4)  # ratio 0.5 / 0.4 = 1.25
    cfg = LossConfig(loss_type="grpo", epsilon=0.2)
    # A = +1: -min(1.25, clip(1.25) = 1.2) = -1.2; the clipped branch has no gradient.
    assert scalar_case(cfg, lp, old, 1.0) == pytest.approx((-1.2, 0.0), abs=1e-6)
    # A = -1: -min(-1.25, -1.2) = 1.25; d/dlogp (-r A) = -A r = 1.25.
    assert scalar_case(cfg, lp, old, -1.0) == pytest.approx((1.25, 1.25), abs=1e-6)
    # epsilon_high 0.3: 1.25 is inside [0.8, 1.3], so A = +1 gives -1.25 and gradient -1.25.
    asym = LossConfig(loss_type="grpo", epsilon=0.2, epsilon_high=0.3)
    assert scalar_case(asym, lp, old, 1.0) == pytest.approx((-1.25, -1.25), abs=1e-6)
    # delta 1.1 caps the unclipped term: -min(-1.1, -1.2) = 1.2, constant in logp.
    capped = LossConfig(loss_type="grpo", epsilon=0.2, delta=1.1)
    assert scalar_case(capped, lp, old, -1.0) == pytest.approx((1.2, 0.0), abs=1e-6)
    # ratio 0.5 / 0.7 = 0.714 < 0.8 with A = -1: -min(-0.714, -0.8) = 0.8, clipped, no gradient.
    assert scalar_case(cfg, lp, math.log(0.7), -1.0) == pytest.approx((0.8, 0.0), abs=1e-6)


def test_hand_kl():
    # logp = log 0.5, ref = log 0.25: d = ref - logp = -ln 2, k3 = 0.5 + ln 2 - 1 = 0.193147.
    # With A = 0 the loss is beta * k3; d k3 / d logp = 1 - exp(d) = 0.5, times beta.
    cfg = LossConfig(loss_type="bnpo", beta=0.1)
    loss, g = scalar_case(cfg, math.log(0.5), None, 0.0, ref=math.log(0.25))
    assert loss == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-6)
    assert g == pytest.approx(0.05, rel=1e-6)


def test_hand_cispo():
    # ratio 1.25 capped at 1 + 0.2: loss = -1.2 * A * logp = -1.2 * ln 0.5 = 0.831777;
    # the weight is a constant, so d/dlogp = -1.2 * A = -1.2.
    cfg = LossConfig(loss_type="cispo", epsilon=0.2)
    loss, g = scalar_case(cfg, math.log(0.5), math.log(0.4), 1.0)
    assert loss == pytest.approx(-1.2 * math.log(0.5), rel=1e-6)
    assert g == pytest.approx(-1.2, rel=1e-6)


def test_hand_aggregations():
    # Row 0: one token, A = 2; row 1: three tokens, A = -1; ratio 1 (old None), so each token's
    # loss is -A: a = -2 and b = c = d = 1.
    mask = mx.array([[1, 0, 0], [1, 1, 1]], dtype=mx.float32)
    logp = mx.log(mx.array([[0.5, 0.1, 0.1], [0.3, 0.6, 0.2]]))
    adv = mx.array([2.0, -1.0])
    cases = {
        "grpo": (-2 + 3 / 3) / 2,  # mean over rows of per-row token means
        "bnpo": (-2 + 3) / 4,  # token mean over the batch
        "dr_grpo": (-2 + 3) / (2 * 4),  # sum / (N * max_completion_length = 4)
        "dapo": (-2 + 3) / 10,  # sum / global token count 10
    }
    for loss_type, expected in cases.items():
        cfg = LossConfig(loss_type=loss_type, max_completion_length=4)
        loss, _ = compute_loss(cfg, logp, None, None, adv, mask, global_token_count=10)
        assert loss.item() == pytest.approx(expected, rel=1e-6), loss_type


def test_hand_gspo():
    # Two tokens with log-ratios 0.1 and 0.3: sequence weight exp(0.2) = 1.2214 > 1.2.
    logp = mx.array([[math.log(0.5), math.log(0.6)]])
    old = logp - mx.array([[0.1, 0.3]])
    mask = mx.ones((1, 2))
    cfg = LossConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.2)

    def run(a):
        return mx.value_and_grad(lambda lp: compute_loss(cfg, lp, old, None, mx.array([a]), mask)[0])(logp)

    # A = +1: clipped at 1.2 for the whole sequence, no gradient.
    loss, g = run(1.0)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-7)
    # A = -1: loss exp(0.2); d/dlogp_t = -A * r * (1/2) per token.
    loss, g = run(-1.0)
    assert loss.item() == pytest.approx(math.exp(0.2), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), [[math.exp(0.2) / 2] * 2], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Invariants


def plain_policy_gradient(loss_type, adv, mask, gtc):
    """-A * m_t / (the variant's normaliser): REINFORCE with the variant's token weighting."""
    lengths = np.maximum(mask.sum(-1, keepdims=True), 1)
    norm = {
        "grpo": lengths * mask.shape[0],
        "bnpo": mask.sum(),
        "dr_grpo": mask.shape[0] * MAX_LEN,
        "dapo": gtc,
        "cispo": gtc,
    }[loss_type]
    return -adv[:, None] * mask / norm


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSSES, ["token", "sequence"])))
def test_ratio_one_gives_plain_policy_gradient(loss_type, level):
    logp, _, ref, adv, mask, _ = make_inputs(2)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_LEN,
                     epsilon=0.2, epsilon_high=0.28, delta=1.5)
    expected = plain_policy_gradient(loss_type, adv.astype(np.float64), mask.astype(np.float64), 50.0)
    # old_logp None (on-policy) and old_logp equal to logp in value give the same gradient.
    for old in (None, logp.copy()):
        _, stats, g = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, gtc=50.0)
        assert rel_err(g, expected) <= 1e-6
        assert stats["ratio_mean"].item() == pytest.approx(1.0)
        assert stats["clip_region"].item() == 0.0


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSSES, ["token", "sequence"])))
def test_zero_advantages_give_zero_policy_gradient(loss_type, level):
    logp, old, ref, _, mask, _ = make_inputs(3)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_LEN)
    _, _, g = mlx_loss_and_grad(cfg, logp, old, ref, np.zeros(N, np.float32), mask)
    assert np.abs(np.asarray(g)).max() == 0.0
    # ... but the KL term alone still pulls towards the reference.
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_LEN, beta=0.1)
    _, _, g = mlx_loss_and_grad(cfg, logp, old, ref, np.zeros(N, np.float32), mask)
    assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_dapo_gradient_accumulation_is_exact(loss_type):
    """Two micro-batches normalised by the global token count sum to the full batch."""
    logp, old, ref, adv, mask, _ = make_inputs(4)
    cfg = LossConfig(loss_type=loss_type, epsilon_high=0.28, beta=0.04)
    total = float(mask.sum())
    full_loss, _, full_grad = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask)
    parts = [slice(0, 2), slice(2, N)]  # unequal halves with unequal token counts
    losses, grads = [], []
    for s in parts:
        loss, _, g = mlx_loss_and_grad(cfg, logp[s], old[s], ref[s], adv[s], mask[s], gtc=total)
        losses.append(loss.item())
        grads.append(np.asarray(g))
    assert sum(losses) == pytest.approx(full_loss.item(), rel=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), rtol=1e-6, atol=1e-9)
    # Without the global count each half would be its own token mean: not the full loss.
    naive = sum(mlx_loss_and_grad(cfg, logp[s], old[s], ref[s], adv[s], mask[s])[0].item() for s in parts)
    assert abs(naive - full_loss.item()) > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_row_normalised_accumulation(loss_type):
    """num_sequences makes summed micro-batch losses the full-batch loss (grpo, dr_grpo) or,
    for bnpo, the mean of the micro-batches' token means (TRL's accumulation)."""
    logp, old, ref, adv, mask, _ = make_inputs(8)
    cfg = LossConfig(loss_type=loss_type, max_completion_length=MAX_LEN, beta=0.04)
    parts = [slice(0, 3), slice(3, N)]  # equal row counts, unequal token counts
    full_loss, _, full_grad = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask)
    losses, grads = [], []
    for s in parts:
        loss, stats, g = mlx_loss_and_grad(cfg, logp[s], old[s], ref[s], adv[s], mask[s], rows=N)
        losses.append(loss.item())
        grads.append(np.asarray(g))
    if loss_type == "bnpo":
        alone = [mlx_loss_and_grad(cfg, logp[s], old[s], ref[s], adv[s], mask[s]) for s in parts]
        assert sum(losses) == pytest.approx(np.mean([a[0].item() for a in alone]), rel=1e-6)
        assert abs(sum(losses) - full_loss.item()) > 1e-3  # a token mean of token means differs
    else:
        assert sum(losses) == pytest.approx(full_loss.item(), rel=1e-6)
        np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), rtol=1e-6, atol=1e-9)
    with pytest.raises(MlxRftError, match="num_sequences"):
        mlx_loss_and_grad(cfg, logp, old, ref, adv, mask, rows=N - 1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_gspo_token_form_has_the_same_value_and_gradient(loss_type):
    """GSPO-token, s_t = sg(s) * pi_t / sg(pi_t), equals the sequence level for per-row advantages
    (the reason it is not a separate option)."""
    logp, old, ref, adv, mask, _ = make_inputs(9)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level="sequence", epsilon=0.2, delta=1.4)
    m, a, o = mx.array(mask), mx.array(adv)[:, None], mx.array(old)

    def gspo_token(lp):
        seq = (mx.where(m > 0, lp - o, 0.0)).sum(-1, keepdims=True) / mx.maximum(m.sum(-1, keepdims=True), 1)
        r = mx.exp(mx.stop_gradient(seq) + lp - mx.stop_gradient(lp))
        per_token = -mx.minimum(mx.minimum(r, 1.4) * a, mx.clip(r, 0.8, 1.2) * a) * m
        if loss_type == "grpo":
            return (per_token.sum(-1) / mx.maximum(m.sum(-1), 1)).mean()
        return per_token.sum() / m.sum()

    ours, _, g_ours = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask)
    theirs, g_theirs = mx.value_and_grad(gspo_token)(mx.array(logp))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert rel_err(g_ours, g_theirs) <= 1e-6
    assert np.abs(np.asarray(g_ours)).max() > 0


def test_gspo_weights_are_shared_within_a_sequence():
    """Sequence level: every token of a row sees the same ratio, so clipping is all-or-nothing."""
    logp, old, ref, adv, mask, _ = make_inputs(5)
    cfg = LossConfig(loss_type="bnpo", importance_sampling_level="sequence", epsilon=0.05)
    _, _, g = mlx_loss_and_grad(cfg, logp, old, ref, adv, mask)
    g = np.asarray(g)
    for n in range(N):
        row = g[n][mask[n] > 0]
        if row.size:
            np.testing.assert_allclose(row, row[0], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradient through a real (tiny) model: central differences along a random unit direction


def test_gradient_through_model_matches_finite_differences(tiny_model_factory):
    """mx.grad of sequence_logprobs + loss == (L(p + h d) - L(p - h d)) / 2h, per weight tensor.

    float32 (MLX's CPU float64 transcendentals are only float32-accurate, so float64 does not
    help), h = 0.03 along a unit direction in one tensor at a time. Measured: relative error
    <= 4e-4 for every tensor below; a 10% error in the softmax term of the head's backward pass
    shows up as >= 2e-3. Advantages are all positive so the loss does not cancel to ~0, which
    would drown the differences in float32 rounding.
    """
    from mlx_rft.models import load_model

    model, _ = load_model(tiny_model_factory("qwen3"), dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [[5, 9, 33, 2], [17, 4]]
    ids = mx.array(rng.integers(3, 384, size=(4, 5)), dtype=mx.int32)
    mask = mx.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=mx.float32)
    logp0, ent = sequence_logprobs(model, prompts, ids, mask, 2, 0.9, with_entropy=True)
    old = logp0 + mx.array(rng.normal(0, 0.1, size=(4, 5))) * mask
    ref = logp0 - mx.array(rng.normal(0, 0.2, size=(4, 5))) * mask
    adv = mx.array([1.0, 0.5, 0.7, 1.2])
    cfg = LossConfig(loss_type="grpo", epsilon=0.2, epsilon_high=0.28, beta=0.05, top_entropy_quantile=0.6)

    def loss_fn(m):
        lp, _ = sequence_logprobs(m, prompts, ids, mask, 2, 0.9, chunk_size=3)
        return compute_loss(cfg, lp, old, ref, adv, mask, entropy=ent)[0]

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    params = dict(tree_flatten(model.parameters()))
    h = 0.03
    for name in [
        "model.embed_tokens.weight",  # tied: input embedding and LM head
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ]:
        d = mx.array(rng.normal(size=params[name].shape), dtype=mx.float32)
        d = d / mx.sqrt((d * d).sum())
        analytic = (grads[name] * d).sum().item()

        def at(step, name=name, d=d):
            model.update(tree_unflatten([(name, params[name] + step * d)]))
            value = loss_fn(model).item()
            model.update(tree_unflatten([(name, params[name])]))
            return value

        numeric = (at(h) - at(-h)) / (2 * h)
        assert abs(analytic) > 1e-3, name
        assert analytic == pytest.approx(numeric, rel=1e-3), name


# ----------------------------------------------------------------------------------------------
# Helpers and errors


def test_high_entropy_mask_matches_numpy_quantile():
    rng = np.random.default_rng(6)
    ent = rng.uniform(0, 4, size=(5, 7)).astype(np.float32)
    mask = (rng.random((5, 7)) < 0.7).astype(np.float32)
    for q in (0.0, 0.2, 0.5, 0.93, 1.0):
        got = np.asarray(high_entropy_mask(mx.array(ent), mx.array(mask), q))
        np.testing.assert_array_equal(got, np_high_entropy_mask(ent.astype(np.float64), mask, q))
    # q = 0 keeps only the highest-entropy valid token; q = 1 keeps every valid token.
    assert np.asarray(high_entropy_mask(mx.array(ent), mx.array(mask), 0.0)).sum() == 1
    assert np.asarray(high_entropy_mask(mx.array(ent), mx.array(mask), 1.0)).sum() == mask.sum()


def test_mask_truncated_completions():
    mask = mx.ones((3, 4))
    out = mask_truncated_completions(mask, ["stop", "length", "stop"])
    np.testing.assert_array_equal(np.asarray(out).sum(-1), [4, 0, 4])
    out = mask_truncated_completions(mask, np.array([True, False, False]))
    np.testing.assert_array_equal(np.asarray(out).sum(-1), [0, 4, 4])
    with pytest.raises(MlxRftError, match="one per completion"):
        mask_truncated_completions(mask, [True])


def test_config_and_input_errors():
    with pytest.raises(MlxRftError, match="grpo, bnpo, dr_grpo, dapo, cispo"):
        LossConfig(loss_type="ppo")
    with pytest.raises(MlxRftError, match="importance_sampling_level"):
        LossConfig(importance_sampling_level="sentence")
    with pytest.raises(MlxRftError, match="max_completion_length"):
        LossConfig(loss_type="dr_grpo")
    with pytest.raises(MlxRftError, match="delta=0.9 must be > 1"):
        LossConfig(delta=0.9)
    with pytest.raises(MlxRftError, match="top_entropy_quantile"):
        LossConfig(top_entropy_quantile=1.5)
    cfg = LossConfig(loss_type="grpo")
    cfg.loss_type = "nope"  # mutated after validation: the dispatcher still refuses it
    lp, m = mx.zeros((2, 3)), mx.ones((2, 3))
    with pytest.raises(MlxRftError, match="choose one of grpo"):
        compute_loss(cfg, lp, None, None, mx.zeros(2), m)
    with pytest.raises(MlxRftError, match="ref_logp is None"):
        compute_loss(LossConfig(beta=0.1), lp, None, None, mx.zeros(2), m)
    with pytest.raises(MlxRftError, match="with_entropy=True"):
        compute_loss(LossConfig(top_entropy_quantile=0.2), lp, None, None, mx.zeros(2), m)
    with pytest.raises(MlxRftError, match="advantages must be"):
        compute_loss(LossConfig(), lp, None, None, mx.zeros(3), m)
    with pytest.raises(MlxRftError, match="old_logp has shape"):
        compute_loss(LossConfig(), lp, mx.zeros((2, 4)), None, mx.zeros(2), m)


def test_beta_zero_needs_no_reference_and_stats_as_dict():
    logp, old, _, adv, mask, _ = make_inputs(7)
    loss, stats = compute_loss(LossConfig(), mx.array(logp), mx.array(old), None, mx.array(adv), mx.array(mask))
    d = stats.as_dict()
    assert "kl_mean" not in d and "entropy_mean" not in d
    assert set(d) >= {"clip_low", "clip_high", "clip_region", "ratio_mean", "num_tokens", "num_loss_tokens"}
    assert np.isfinite(loss.item())
