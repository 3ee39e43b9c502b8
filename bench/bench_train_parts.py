"""Figures behind three trainer/engine choices, on the default model (SmolLM2-135M-Instruct):

1. clip + AdamW over all 134.5M weights: mlx_rft.train.optim.CompiledApply (on one stream and on
   two CPU streams, as shipped on the CPU) against the plain `clip_grad_norm` + `optimizer.update`
   (best of 3 after a warm-up each);
2. a 16-row LoRA decode step (rank 16, every linear layer): adapters as LoRALinear layers against
   merged for sampling (`adapters_fused`), ms per decode step, best of 3;
3. behaviour log-probs recorded by the rollout engine against a teacher-forced pass, on the
   default task's prompts (4 x 4, 48 tokens), with the sampler's normalisers summed in float64
   (as shipped) and in MLX's float32.

    python bench/bench_train_parts.py
"""

from __future__ import annotations

import sys

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_rft import cpu
from mlx_rft.cpu import kernels
from mlx_rft.config import GRPOConfig
from mlx_rft.data import PromptDataset
from mlx_rft.models import load_model
from mlx_rft.policy.adapters import adapters_fused
from mlx_rft.policy.logprobs import sequence_logprobs
from mlx_rft.rollout import RolloutStats, generate_rollouts
from mlx_rft.data.tasks import load_task
from mlx_rft.train.optim import CompiledApply, build_optimizer
from mlx_rft.train.policy import setup_trainable
from mlx_rft.types import SamplingConfig
from timing import best_of


def optimizer_update() -> None:
    model, _ = load_model(None)
    cfg = GRPOConfig(finetune_type="full")
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, model.trainable_parameters())
    mx.eval(grads)
    plain_opt = build_optimizer(cfg)

    def plain():
        clipped, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        plain_opt.update(model, clipped)
        mx.eval(model.parameters(), plain_opt.state, norm)

    def compiled_on(streams: int):
        compiled = CompiledApply(model, build_optimizer(cfg), cfg.max_grad_norm, streams=streams)

        def run():
            norm, change = compiled(grads)
            mx.eval(change, model.parameters(), compiled.optimizer.state, norm)

        return run

    print(f"clip + AdamW, 134.5M weights: plain {best_of(plain):.2f} s, compiled on one stream "
          f"{best_of(compiled_on(1)):.2f} s, on two CPU streams {best_of(compiled_on(2)):.2f} s")


def lora_decode_step(prompts, tok) -> None:
    model, _ = load_model(None)
    mx.random.seed(0)
    setup_trainable(model, GRPOConfig())
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=64)

    def step_ms():
        st = RolloutStats()
        generate_rollouts(model, tok, prompts, 4, sampling, seed=0, ignore_eos=True, stats=st)
        return st.decode_seconds / st.decode_steps * 1e3

    plain = min(step_ms() for _ in range(3))
    with adapters_fused(model):
        fused = min(step_ms() for _ in range(3))
    print(f"16-row LoRA decode step: adapters as layers {plain:.1f} ms, merged {fused:.1f} ms")


def behaviour_vs_teacher_forced(prompts, model, tok) -> None:
    shipped = kernels.row_sum

    def float32_sum(x):
        return mx.sum(x, axis=-1, keepdims=True)

    for name, fn in (("float64 sums", shipped), ("float32 sums", float32_sum)):
        kernels.row_sum = fn
        from mlx_rft.rollout import sampling as sampling_module

        sampling_module.row_sum = fn
        for temp in (1.0, 0.7):
            ro = generate_rollouts(
                model, tok, prompts, 4, SamplingConfig(temperature=temp, max_new_tokens=48), seed=1
            )
            lp, _ = sequence_logprobs(model, prompts, ro.completion_ids, ro.completion_mask, 4, temp)
            m = np.array(ro.completion_mask) > 0
            diff = np.abs(np.array(lp)[m] - np.array(ro.logprobs)[m]).max()
            print(f"behaviour vs teacher-forced log-probs, {name}, T = {temp}: max |diff| {diff:.2e}")
    kernels.row_sum = sampling_module.row_sum = shipped


def main() -> int:
    model, tok = load_model(None)
    task = load_task("default", size=64)
    data = list(PromptDataset.from_rows(task.rows, tok, system_prompt=task.system_prompt))[:4]
    prompts = [e.prompt_ids for e in data]
    with cpu.speedups(model):  # as in training (the other models here are of the same kind)
        optimizer_update()
        lora_decode_step(prompts, tok)
        behaviour_vs_teacher_forced(prompts, model, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
