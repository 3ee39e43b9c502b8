"""The one typed training config: dataclass fields carry their help text; YAML < CLI flags.

Precedence: a CLI flag beats the YAML file (`--config run.yaml`), which beats the field default.
`GRPOConfig.validate()` checks every rule before the model loads and names the rule, the values
and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlxRftError

FINETUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "muon")
SCHEDULES = ("constant", "cosine", "linear")
REPORTERS = ("jsonl", "tensorboard", "wandb")


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GRPOConfig:
    # --- model ---
    model: str | None = _f(None, "HF-format model folder; empty = the embedded SmolLM2-135M-Instruct")
    dtype: str | None = _f(None, "float32 | bfloat16 | float16; empty = float32 on CPU, bfloat16 on GPU")
    finetune_type: str = _f(
        "lora", "lora | dora | full | none (none: the LLM stays frozen; for time-series rows, whose "
        "encoder and projector train)"
    )
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / rank")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_layers: int = _f(-1, "number of final transformer blocks that get adapters (-1 = all, else >= 1)")
    lora_keys: list[str] = _f(
        [], "module paths inside a block to adapt, e.g. self_attn.q_proj (empty = all linear layers)"
    )
    quantize_bits: int = _f(0, "QLoRA: quantize the frozen base to 4 or 8 bits (0 = off)")
    freeze: list[str] = _f([], "full fine-tuning: freeze parameters whose name contains any of these")
    encoder: str | None = _f(
        None, "time-series rows (--task ucr:<Name> or a series JSONL): the series encoder + "
        "projector to start from, the model folder of an `mlx-rft sft` run (empty = a new one); "
        "it trains along with the LLM's adapters"
    )

    # --- data ---
    task: str | None = _f(
        None, "built-in task (a reasoning-gym dataset name); empty with no train_file = the default task"
    )
    task_size: int = _f(2000, "number of generated training examples for a built-in task")
    task_options: list[str] = _f(
        [], "extra task options as key=value (e.g. prompt_format=direct, format_weight=0.2)"
    )
    train_file: str | None = _f(
        None, "prompts file (JSONL, JSON, CSV, Parquet) with prompt or messages, or a save_to_disk "
        "dataset folder (of a DatasetDict: its train split)",
    )
    eval_file: str | None = _f(
        None, "held-out prompts file or save_to_disk folder (default: the test/validation split of "
        "a DatasetDict train_file, else split off the training data)",
    )
    eval_size: int = _f(64, "held-out prompts (split off the training data when eval_file is empty)")
    system_prompt: str | None = _f(None, "system message prepended to every prompt (overrides the task's)")
    max_prompt_length: int = _f(512, "maximum prompt length in tokens")
    on_long_prompt: str = _f("error", "error | skip | truncate: prompts over max_prompt_length")
    on_bad_row: str = _f("error", "error | skip: what to do with a malformed data row")

    # --- episodes (multi-turn) ---
    env: str | None = _f(
        None, "multi-turn episodes with an environment: a built-in (arithmetic, guess) or "
        "module:Class; its rows come from the environment unless --task/--train-file gives them"
    )
    tools: list[str] = _f(
        [], "tools the model may call in multi-turn episodes: built-ins (calculator, python) or "
        "module:function; with --task/--train-file rows, the task's rewards score the last turn"
    )
    max_turns: int = _f(4, "multi-turn episodes: model turns per episode")
    max_episode_tokens: int = _f(
        768, "multi-turn episodes: model + environment tokens per episode after the prompt "
        "(--max-new-tokens bounds each turn)"
    )
    tool_timeout: float = _f(10.0, "seconds one tool call may run before it is answered with an error")

    # --- rewards ---
    reward_funcs: list[str] = _f(
        [], "rewards: built-in names or module:function / file.py:function (empty = the task's own)"
    )
    reward_weights: list[float] = _f([], "one weight per reward function (empty = all 1.0)")
    reward_on_error: str = _f("raise", "raise | none: a reward that raises aborts the run or scores None")
    reward_timeout: float = _f(
        300.0, "seconds one reward function may take on one step's completions; past it the "
        "step stops with an error (reward_on_error none: its rows score None) (0 = no limit)"
    )
    max_unscored_steps: int = _f(
        1, "stop the run when this many steps in a row have no completion any reward could "
        "score (0 = never stop)"
    )

    # --- generation ---
    prompts_per_step: int = _f(4, "prompts per optimizer step (B)")
    group_size: int = _f(8, "completions sampled per prompt (G); the step holds B x G completions")
    max_new_tokens: int = _f(64, "maximum completion length in tokens")
    temperature: float = _f(1.0, "sampling temperature (also used for the training log-probs)")
    top_p: float = _f(1.0, "nucleus sampling threshold (1.0 = off)")
    top_k: int = _f(0, "sample only from the k most likely tokens (0 = off)")
    min_p: float = _f(0.0, "min-p sampling threshold (0 = off)")
    repetition_penalty: float = _f(1.0, "repetition penalty during sampling (1.0 = off)")
    stop: list[str] = _f([], "stop strings that end a completion, e.g. --stop '</answer>'")
    include_stop: bool = _f(
        True, "keep the matched stop string at the end of the completion text (so a reward that "
        "looks for a closed <answer> tag still sees it)"
    )

    # --- algorithm ---
    loss_type: str = _f("dapo", "grpo | bnpo | dr_grpo | dapo | cispo")
    importance_sampling_level: str = _f("token", "token | sequence (sequence = GSPO)")
    epsilon: float = _f(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float | None = _f(None, "upper clip range: ratio <= 1 + epsilon_high (empty = epsilon)")
    delta: float | None = _f(None, "optional two-sided cap on the unclipped ratio (e.g. 4.0)")
    beta: float = _f(0.0, "KL coefficient to the reference model (0 = no reference is kept)")
    scale_rewards: str = _f("group", "group | batch | none: divide advantages by this std")
    drop_zero_std_groups: bool = _f(False, "mask groups whose rewards are all equal out of the loss")
    mask_truncated_completions: bool = _f(False, "mask completions that hit max_new_tokens")
    skip_zero_advantage: bool = _f(
        True, "leave groups whose advantages are all 0 out of the gradient pass when that is exact "
        "(beta = 0, entropy_coef = 0 and top_entropy_quantile = 1): the same update for less compute"
    )
    top_entropy_quantile: float = _f(1.0, "train only on tokens above this entropy quantile (1.0 = all)")
    entropy_coef: float = _f(
        0.0, "entropy bonus: subtract this times the token entropy from the loss, against "
        "entropy collapse (0 = off; costs a second pass over the vocabulary)"
    )
    num_iterations: int = _f(1, "optimisation passes over each batch of rollouts (mu)")
    off_policy_correction: str = _f(
        "none", "none | tis | mis: weight each token by pi_now / pi_behaviour, truncated at "
        "off_policy_cap (tis) or dropped above it (mis), for rollouts made with older weights"
    )
    off_policy_cap: float = _f(2.0, "the cap C of off_policy_correction (> 1)")
    dynamic_sampling: bool = _f(
        False, "DAPO dynamic sampling: draw more prompts within a step until it holds "
        "prompts_per_step groups whose rewards differ, and train on those"
    )
    max_sampling_rounds: int = _f(
        3, "dynamic sampling: at most this many generation rounds per step (each draws "
        "prompts_per_step prompts)"
    )
    max_uninformative_steps: int = _f(
        8, "end the run (checkpoint, eval, report; exit code 3) after this many steps in a row "
        "in which every group's completions got equal rewards, so nothing was learned (0 = never; "
        "the collapse guard acts first where it can)"
    )
    collapse_guard: bool | None = _f(
        None, "after guard_patience steps in a row in which every group's completions got equal "
        "rewards while prompts scored differently (the policy answers each prompt one fixed way), "
        "restore the weights and optimizer state of the last healthy step (one in which at least "
        "half the groups, and no fewer than in the run's average step, carried signal), multiply "
        "the learning rate by guard_lr_factor and continue "
        "(empty = on with LoRA/DoRA adapters, whose snapshot takes a few MB; off for full "
        "fine-tuning, where it would hold a second copy of the weights and optimizer state)"
    )
    guard_patience: int = _f(
        3, "collapse guard: steps in a row with equal rewards in every group before it rolls back "
        "(at most max_uninformative_steps)"
    )
    guard_max_rollbacks: int = _f(
        3, "collapse guard: rollbacks allowed; at the next collapse the run ends (exit code 3) "
        "with the last healthy weights"
    )
    guard_lr_factor: float = _f(0.5, "collapse guard: multiply the learning rate by this at each rollback")

    # --- optimisation ---
    num_steps: int = _f(60, "optimizer steps to run")
    optimizer: str = _f("adamw", "adamw | adam | sgd | lion | muon")
    learning_rate: float = _f(5e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "weight decay (adamw, lion, sgd)")
    lr_schedule: str = _f("constant", "constant | cosine | linear (decay after warmup)")
    warmup_steps: int = _f(0, "linear warmup steps")
    max_grad_norm: float = _f(1.0, "clip gradients to this global norm (0 = off)")
    gradient_accumulation_steps: int = _f(
        1, "micro-batches per optimizer step (must divide B x G); the same update with less activation memory"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute each transformer block in the backward pass instead of keeping its "
        "activations: far less memory for one more forward pass (on the CPU also slower exps)"
    )
    seed: int = _f(0, "random seed for data order, sampling and initialisation")

    # --- separate rollout workers (mlx.launch -n 1+N) ---
    rollout_workers: int = _f(
        0, "ranks 1..N generate and score rollouts while rank 0 trains (launch 1 + N processes); "
        "0 = every process generates and trains its share (data parallel)"
    )
    max_staleness: int = _f(
        1, "rollout workers: the newest weights are at most this many updates ahead of the weights "
        "that made a step's rollouts (0 = the synchronous run exactly)"
    )
    weight_sync_steps: int = _f(1, "rollout workers: send the trainer's weights to them every N steps")

    # --- evaluation ---
    eval_every: int = _f(0, "evaluate every N steps (0 = only before and after training)")
    eval_k: int = _f(1, "samples per eval prompt for pass@k (1 = greedy pass@1 only)")
    eval_temperature: float = _f(0.0, "eval sampling temperature (0 = greedy)")

    # --- output ---
    output_dir: str = _f("runs/default", "run folder: checkpoints, metrics, config, report")
    save_every: int = _f(20, "checkpoint every N steps (and always at the end)")
    keep_last: int = _f(2, "keep only the newest K checkpoints")
    resume: str | None = _f(
        None, "continue a run: 'latest' (its newest checkpoint), 'auto' (the newest checkpoint if "
        "there is one, else start fresh), or a checkpoint folder"
    )
    overwrite: bool = _f(False, "replace the run already in output_dir (its checkpoints and logs)")
    log_every: int = _f(1, "print a metrics line every N steps")
    sample_every: int = _f(5, "write sample completions to rollouts.jsonl every N steps")
    report_to: list[str] = _f(["jsonl"], "jsonl | tensorboard | wandb (jsonl is always written)")
    wandb_project: str = _f("mlx-rft", "Weights & Biases project when report_to includes wandb")
    progress: bool = _f(True, "live progress bars with ETA on a terminal (off, or not a terminal: plain lines)")

    # ------------------------------------------------------------------
    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def guard_enabled(self) -> bool:
        """collapse_guard resolved: empty means on for adapters, off for full fine-tuning."""
        return self.finetune_type != "full" if self.collapse_guard is None else self.collapse_guard

    def validate(self) -> GRPOConfig:
        """Check every rule; raise one MlxRftError naming the rule, the values and the fix."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise MlxRftError(msg)

        def choice(name: str, options: tuple) -> None:
            value = getattr(self, name)
            need(value in options, f"{name}={value!r} is not valid; choose one of {', '.join(options)}")

        # The option values live with the code that acts on them.
        from .algo.advantages import SCALES
        from .data import ON_BAD_ROW, ON_LONG_PROMPT
        from .dtypes import DTYPES
        from .rewards.reward_set import ON_ERROR

        choice("finetune_type", (*FINETUNE_TYPES, "none"))
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", SCHEDULES)
        choice("scale_rewards", SCALES)
        choice("on_bad_row", ON_BAD_ROW)
        choice("on_long_prompt", ON_LONG_PROMPT)
        choice("reward_on_error", ON_ERROR)
        for opt in self.task_options:
            need("=" in opt, f"task option {opt!r} must look like key=value")
        for r in self.report_to:
            need(r in REPORTERS, f"report_to has {r!r}; choose from {', '.join(REPORTERS)}")
        if self.dtype is not None:
            choice("dtype", DTYPES)
        for name in (
            "learning_rate", "lora_alpha", "lora_dropout", "weight_decay", "max_grad_norm",
            "reward_timeout", "eval_temperature", "epsilon", "temperature", "beta", "entropy_coef",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float)) and math.isfinite(value),
                f"{name}={value!r} must be a finite number",
            )
        need(
            self.group_size >= 2,
            f"group_size={self.group_size}: group-relative advantages need at least 2 completions "
            "per prompt; set --group-size 2 or more",
        )
        need(self.prompts_per_step >= 1, f"prompts_per_step={self.prompts_per_step} must be >= 1")
        rows = self.rows_per_step
        need(
            self.gradient_accumulation_steps >= 1 and rows % self.gradient_accumulation_steps == 0,
            f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide the "
            f"{rows} completions of a step (prompts_per_step {self.prompts_per_step} x group_size "
            f"{self.group_size}); pick a divisor of {rows}",
        )
        need(
            not (self.gradient_checkpointing and self.lora_dropout > 0),
            f"gradient_checkpointing with lora_dropout={self.lora_dropout}: the backward pass "
            "recomputes each block and would draw different dropout masks; set lora_dropout 0 or "
            "turn gradient_checkpointing off",
        )
        need(self.temperature > 0, f"temperature={self.temperature}: training needs sampling; use > 0")
        self.sampling_config()  # the sampling rules (shared with eval and generate)
        self.loss_config()  # the loss rules (epsilon, delta, beta, levels, entropy quantile)
        need(
            not (self.beta > 0 and self.finetune_type == "dora"),
            "beta > 0 with finetune_type=dora is not supported (DoRA has no adapter-free "
            "reference without a second model copy); use lora or full, or beta=0",
        )
        need(
            self.top_entropy_quantile > 0,
            f"top_entropy_quantile={self.top_entropy_quantile} must be in (0, 1]: 0 trains on no token",
        )
        need(self.eval_temperature >= 0, f"eval_temperature={self.eval_temperature} must be >= 0")
        need(self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1")
        need(
            self.max_sampling_rounds >= 1,
            f"max_sampling_rounds={self.max_sampling_rounds} must be >= 1 (1 = no refill rounds)",
        )
        need(
            self.max_uninformative_steps >= 0,
            f"max_uninformative_steps={self.max_uninformative_steps} must be >= 0 (0 = never stop)",
        )
        self._validate_guard(need)
        self._validate_workers(need)
        need(self.num_steps >= 1, f"num_steps={self.num_steps} must be >= 1")
        need(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = off)")
        need(self.lora_rank >= 1, f"lora_rank={self.lora_rank} must be >= 1")
        need(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0")
        need(
            0 <= self.lora_dropout < 1,
            f"lora_dropout={self.lora_dropout} must be in [0, 1): 1 would drop every input",
        )
        need(
            self.lora_layers == -1 or self.lora_layers >= 1,
            f"lora_layers={self.lora_layers}: give the number of final blocks to adapt (>= 1), "
            "or -1 for all of them",
        )
        need(self.quantize_bits in (0, 4, 8), f"quantize_bits={self.quantize_bits}: use 0, 4 or 8")
        need(
            not (self.quantize_bits and self.finetune_type == "full"),
            "quantize_bits needs finetune_type lora or dora (QLoRA); a quantized base cannot be "
            "fully fine-tuned",
        )
        need(
            not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs),
            f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs; "
            "give one weight per function or none",
        )
        need(
            all(math.isfinite(w) for w in self.reward_weights),
            f"reward_weights={self.reward_weights} must be finite numbers",
        )
        need(self.reward_timeout >= 0, f"reward_timeout={self.reward_timeout} must be >= 0 (0 = no limit)")
        need(self.max_unscored_steps >= 0, f"max_unscored_steps={self.max_unscored_steps} must be >= 0")
        need(self.task_size >= 1, f"task_size={self.task_size} must be >= 1")
        need(self.max_turns >= 1, f"max_turns={self.max_turns} must be >= 1")
        need(self.max_episode_tokens >= 2, f"max_episode_tokens={self.max_episode_tokens} must be >= 2")
        need(self.tool_timeout > 0, f"tool_timeout={self.tool_timeout} must be > 0 seconds")
        need(self.eval_size >= 1, f"eval_size={self.eval_size} must be >= 1")
        need(self.max_prompt_length >= 1, f"max_prompt_length={self.max_prompt_length} must be >= 1")
        need(self.eval_k >= 1, f"eval_k={self.eval_k} must be >= 1")
        need(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0 = off)")
        need(self.save_every >= 1, f"save_every={self.save_every} must be >= 1")
        need(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        need(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        need(self.sample_every >= 0, f"sample_every={self.sample_every} must be >= 0 (0 = off)")
        need(
            self.task is None or self.train_file is None,
            "give either --task or --train-file, not both",
        )
        need(
            not (self.resume and self.overwrite),
            f"resume={self.resume!r} with overwrite: pick one (continue the run, or replace it)",
        )
        need(
            self.resume is None or self.resume.strip() != "",
            "resume is empty; use 'latest', 'auto' or a checkpoint folder",
        )
        need(bool(str(self.output_dir).strip()), "output_dir is empty; name a run folder")
        return self

    def _validate_workers(self, need) -> None:
        need(self.rollout_workers >= 0, f"rollout_workers={self.rollout_workers} must be >= 0 (0 = off)")
        need(self.max_staleness >= 0, f"max_staleness={self.max_staleness} must be >= 0")
        need(self.weight_sync_steps >= 1, f"weight_sync_steps={self.weight_sync_steps} must be >= 1")
        need(
            self.max_staleness >= self.weight_sync_steps - 1,
            f"max_staleness={self.max_staleness} with weight_sync_steps={self.weight_sync_steps}: "
            "weights sent every N steps are up to N - 1 updates old when used; set max_staleness "
            f"to {self.weight_sync_steps - 1} or more, or send weights more often",
        )
        need(
            not (self.rollout_workers and self.dynamic_sampling),
            "dynamic_sampling with rollout_workers is not supported (a step's refills depend on "
            "its own rewards); turn one of them off",
        )

    def _validate_guard(self, need) -> None:
        need(self.guard_patience >= 1, f"guard_patience={self.guard_patience} must be >= 1")
        need(
            self.guard_max_rollbacks >= 0,
            f"guard_max_rollbacks={self.guard_max_rollbacks} must be >= 0 (0 = end the run at the "
            "first collapse, with the last healthy weights)",
        )
        need(
            isinstance(self.guard_lr_factor, (int, float)) and 0 < self.guard_lr_factor <= 1,
            f"guard_lr_factor={self.guard_lr_factor} must be in (0, 1] (1 = roll back without "
            "lowering the learning rate)",
        )
        need(
            not self.guard_enabled or not self.max_uninformative_steps
            or self.guard_patience <= self.max_uninformative_steps,
            f"guard_patience={self.guard_patience} is above max_uninformative_steps="
            f"{self.max_uninformative_steps}: the run would stop before the collapse guard could "
            "act; lower --guard-patience, raise --max-uninformative-steps, or turn the guard off "
            "with --collapse-guard false",
        )

    def sampling_config(self):
        """The rollout sampling settings (validated: the rules shared with eval and generate)."""
        from .types import SamplingConfig

        return SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            stop=list(self.stop), include_stop=self.include_stop,
        ).validate()

    def loss_config(self):
        """The loss settings; `LossConfig` owns the rules of its fields."""
        from .algo.losses import LossConfig

        return LossConfig(
            loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
            delta=self.delta, beta=self.beta, importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_new_tokens, top_entropy_quantile=self.top_entropy_quantile,
            entropy_coef=self.entropy_coef, off_policy_correction=self.off_policy_correction,
            off_policy_cap=self.off_policy_cap,
        )

    def task_kwargs(self) -> dict[str, Any]:
        """task_options parsed as key=value, values read as YAML scalars (numbers, booleans)."""
        import yaml

        out = {}
        for opt in self.task_options:
            key, _, value = opt.partition("=")
            out[key.strip()] = yaml.safe_load(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------
# YAML + CLI


def _base_type(tp: Any) -> tuple[type, bool]:
    """(element type, is_list) for a field annotation like `int`, `float | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _fields(cls: type = None) -> list[tuple[dataclasses.Field, type, bool]]:
    cls = cls or GRPOConfig
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def _optional_fields(cls: type = None) -> set[str]:
    cls = cls or GRPOConfig
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if _optional(hints[f.name])}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Once(argparse.Action):
    """Store a flag's value, refusing a second occurrence (argparse would keep only the last, so
    e.g. `--reward-funcs a --reward-funcs b` would silently drop `a`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            hint = " (list every value after one flag)" if self.nargs == "*" else ""
            parser.error(f"{option_string} given twice{hint}")
        setattr(namespace, self.dest, values)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = None) -> None:
    """One flag per field of the config dataclass `cls` (default GRPOConfig), as --field-name;
    every default is None so 'not given' is visible."""
    parser.add_argument("--config", "-c", default=None, action=_Once, help="YAML file with config fields")
    for f, base, is_list in _fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default!r})"
        if base is bool:
            parser.add_argument(
                flag, type=_parse_bool, default=None, metavar="BOOL", action=_Once, help=help_text
            )
        elif is_list:
            parser.add_argument(flag, type=base, nargs="*", default=None, action=_Once, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=None, action=_Once, help=help_text)


def _coerce(name: str, value: Any, base: type, is_list: bool) -> Any:
    if value is None:
        return None
    if is_list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(name, v, base, False) for v in value]
    try:
        if base is bool and not isinstance(value, bool):
            return _parse_bool(str(value))
        if base is float and isinstance(value, (int, float, str)):
            return float(value)
        if base is int and isinstance(value, bool):
            raise ValueError
        if base is int and isinstance(value, (int, str)):
            return int(value)
        if base is str:
            return str(value)
    except (ValueError, argparse.ArgumentTypeError):
        pass
    else:
        if isinstance(value, base):
            return value
    raise MlxRftError(f"config field {name!r} expects {base.__name__}, got {value!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MlxRftError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MlxRftError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise MlxRftError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def build_config(
    overrides: dict[str, Any] | None = None, yaml_path: str | None = None, cls: type = None,
    command: str = "train",
):
    """Defaults < YAML < overrides (e.g. parsed CLI flags with None meaning 'not given').

    `cls` is the config dataclass (default GRPOConfig), `command` the one whose --help lists it."""
    cls = cls or GRPOConfig
    known = {f.name: (base, is_list) for f, base, is_list in _fields(cls)}
    optional = _optional_fields(cls)
    values: dict[str, Any] = {}
    sources = [(load_yaml(yaml_path), str(yaml_path))] if yaml_path else []
    sources.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "flags"))
    for source, where in sources:
        for key, value in source.items():
            key = str(key).replace("-", "_")
            if key not in known:
                close = [k for k in known if k.startswith(key[:4])]
                hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
                raise MlxRftError(f"unknown config field {key!r}{hint}; see `mlx-rft {command} --help`")
            if value is None and key not in optional:
                raise MlxRftError(
                    f"config field {key!r} is empty (null) in {where}; give it a value or delete the line"
                )
            values[key] = _coerce(key, value, *known[key])
    return cls(**values)


def config_from_args(args: argparse.Namespace, cls: type = None, command: str = "train"):
    cls = cls or GRPOConfig
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    return build_config(flags, getattr(args, "config", None), cls, command).validate()


def config_yaml(cfg) -> str:
    """The resolved config as YAML, loadable with `--config`."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
