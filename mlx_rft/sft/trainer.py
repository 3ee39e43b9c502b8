"""`mlx-rft sft`: supervised fine-tuning on answer tokens, for series and text rows.

    rows ──> Encoded (prompt pieces + answer ids) ──> batches (seeded epochs, exact on resume)
         ──> answer-token cross-entropy through the frozen (or adapted) LLM ──> AdamW, per-module
             learning rates, clipped ──> checkpoints ──> held-out scores and controls

With series rows the LLM is frozen by default and only the encoder and projector train; the
rows' shared opening text then runs through the LLM once (prefix.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import cpu
from ..errors import MlxRftError
from ..models import load_model, resolve_model_path
from ..timeseries.encoder import EncoderConfig
from ..timeseries.model import TimeSeriesLM
from ..timeseries.prompt_data import held_out_subset
from ..train.checkpoint import find_checkpoint, load_checkpoint, read_config, save_checkpoint
from ..train.run_folder import check_writable, trim_jsonl, write_summary
from ..train.signals import GracefulStop
from . import evaluate as ev
from .config import SFTConfig
from .data import SFTData, load_sft_data
from .loss import sft_loss
from .prefix import SharedPrefix, common_prefix

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "model")
# Fields a resumed run may change: they do not alter the steps already taken or to come.
RESUMABLE = {"resume", "overwrite", "log_every", "save_every", "keep_last", "eval_size",
             "max_new_tokens", "controls", "output_dir", "max_batch_tokens"}


@dataclass
class SFTResult:
    run_dir: Path
    step: int
    eval: dict[str, Any]
    interrupted: bool = False
    exit_code: int = 0


def batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Rows of step `step` (1-based): epochs are seeded permutations read in order, so the
    batch of any step follows from (n, batch, seed, step) alone, which makes resume exact."""
    start = (step - 1) * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[pos : pos + batch - len(out)])
    return np.asarray(out)


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows split so that each part's padded size (rows x longest) stays within
    max_tokens (at least one row per part)."""
    parts, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > max_tokens:
            parts.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return parts + [cur] if cur else parts


def lr_schedule(cfg: SFTConfig, peak: float):
    decay = max(cfg.num_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(peak, decay, end=peak * 0.01)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(peak, 0.0, decay)
    else:
        main = optim.linear_schedule(peak, peak, 1)
    if not cfg.warmup_steps:
        return main
    warm = optim.linear_schedule(peak / cfg.warmup_steps, peak, max(cfg.warmup_steps - 1, 1))
    return optim.join_schedules([warm, main], [cfg.warmup_steps])


def build_optimizer(cfg: SFTConfig) -> optim.Optimizer:
    """AdamW with the LLM's own learning rate for its weights, another for encoder/projector."""
    def adamw(lr):
        return optim.AdamW(learning_rate=lr_schedule(cfg, lr), weight_decay=cfg.weight_decay)

    return optim.MultiOptimizer(
        [adamw(cfg.llm_learning_rate), adamw(cfg.learning_rate)],
        [lambda path, _: path.startswith("llm.")],
    )


def module_grad_norms(grads) -> dict[str, mx.array]:
    """Gradient norm per top-level module (encoder, projector, llm): unevaluated arrays."""
    sq: dict[str, list] = {}
    for k, g in tree_flatten(grads):
        sq.setdefault(k.split(".", 1)[0], []).append(mx.sum(mx.square(g.astype(mx.float32))))
    return {f"grad_norm/{m}": mx.sqrt(sum(v)) for m, v in sq.items()}


def finetune_type(cfg: SFTConfig, data: SFTData) -> str:
    if cfg.finetune_type:
        return cfg.finetune_type
    # Series as soft tokens: the encoder learns to speak to a frozen LLM. Text rows (and the
    # text-only baseline) have nothing else to train, so they get LoRA.
    return "none" if data.has_series and cfg.prompt_format == "soft" else "lora"


def setup_llm(llm: nn.Module, cfg: SFTConfig, ft: str) -> dict | None:
    """Freeze the LLM, then attach adapters or unfreeze it; the adapter config, if any."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    llm.freeze()
    if ft == "full":
        llm.unfreeze()
        return None
    if ft in ("lora", "dora"):
        layers = len(llm.layers) if cfg.lora_layers < 0 else min(cfg.lora_layers, len(llm.layers))
        params = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank, "dropout": 0.0}
        linear_to_lora_layers(llm, layers, params, use_dora=ft == "dora")
        return {"fine_tune_type": ft, "num_layers": layers, "lora_parameters": params}
    return None


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, log=print):
        self.cfg = cfg.validate()
        self.log = log
        self.run_dir = Path(cfg.output_dir)

    # ---- setup ----

    def _plan(self) -> Path | None:
        cfg, run_dir = self.cfg, self.run_dir
        check_writable(run_dir)
        present = [n for n in RUN_FILES if (run_dir / n).exists()]
        if cfg.resume:
            if cfg.resume == "auto" and not (run_dir / "checkpoints").is_dir():
                return None
            return find_checkpoint(cfg.resume, run_dir)
        if present and not cfg.overwrite:
            raise MlxRftError(
                f"output_dir {str(run_dir)!r} already holds a run ({', '.join(present)}); continue "
                "it with --resume latest, replace it with --overwrite true, or pick another "
                "--output-dir"
            )
        for name in present:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None

    def setup(self):
        cfg = self.cfg
        resume_from = self._plan()
        self.model_dir = resolve_model_path(cfg.model)
        llm, self.tokenizer = load_model(str(self.model_dir), dtype=cfg.dtype)
        self.data = load_sft_data(cfg, self.tokenizer)
        if not self.data.train:
            raise MlxRftError("there are no training rows; check --task or --train-file")
        self.finetune = finetune_type(cfg, self.data)
        mx.random.seed(cfg.seed)
        self.adapter_cfg = setup_llm(llm, cfg, self.finetune)
        enc = None
        if self.data.has_series and cfg.prompt_format == "soft":
            enc = EncoderConfig(hidden_size=llm.args.hidden_size, patch_size=cfg.patch_size,
                                dim=cfg.encoder_dim, num_layers=cfg.encoder_layers,
                                num_heads=cfg.encoder_heads)
        self.model = TimeSeriesLM(llm, enc)
        mx.eval(self.model.parameters())
        if not tree_flatten(self.model.trainable_parameters()):
            raise MlxRftError(
                "nothing would train: text rows with finetune_type none; use --finetune-type lora"
            )
        # A frozen LLM sees the same opening text in every row: run it once (prefix.py).
        firsts = [e.pieces[0] for e in self.data.train + self.data.test]
        n = common_prefix(firsts) if self.finetune == "none" else 0
        self.prefix = SharedPrefix(llm, firsts[0][:n])
        self.optimizer = build_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.start_step = 0
        if resume_from is not None:
            self._check_same_config(resume_from)
            state = load_checkpoint(resume_from, self.model, self.optimizer)
            self.start_step = state["step"]
            self.log(f"resumed from {resume_from} (step {self.start_step})")
        return self

    def _check_same_config(self, path: Path) -> None:
        saved = read_config(path)
        now = self.cfg.to_dict()
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                   if k not in RESUMABLE and saved.get(k) != v]
        if changed:
            raise MlxRftError(
                f"--resume {path}: the run was started with other settings ({'; '.join(changed)}); "
                "resume with the settings it was saved with, or start a new --output-dir"
            )

    # ---- training ----

    def _step(self, loss_and_grad, step: int) -> dict[str, float]:
        cfg, train = self.cfg, self.data.train
        idx = batch_indices(len(train), min(cfg.batch_size, len(train)), cfg.seed, step)
        pieces = [self.prefix.strip(train[i].pieces) for i in idx]
        answers = [train[i].answer_ids for i in idx]
        tic = time.perf_counter()
        lengths = [self.model.prompt_length(p) + len(a) for p, a in zip(pieces, answers)]
        total_answer = sum(len(a) for a in answers)
        loss = grads = None
        for part in micro_batches(lengths, cfg.max_batch_tokens):
            # Each micro-batch's mean, weighted by its share of the answer tokens: the batch mean.
            (l, n), g = loss_and_grad(self.model, [pieces[i] for i in part],
                                      [answers[i] for i in part], self.prefix)
            w = float(sum(len(answers[i]) for i in part)) / total_answer
            g = tree_map(lambda x: x * w, g)
            loss = l * w if loss is None else loss + l * w
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads)
        ntok = total_answer
        norms = module_grad_norms(grads)
        if cfg.max_grad_norm > 0:
            grads, total = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            total = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, loss, total, norms)
        seconds = time.perf_counter() - tic
        prompt_tokens = sum(self.model.prompt_length(p) for p in pieces) + len(idx) * self.prefix.length
        # The encoder's learning rate when there is one, else the LLM's.
        lr = self.optimizer.optimizers[1 if self.model.config is not None else 0].learning_rate
        return {
            "loss": float(loss), "grad_norm": float(total),
            **{k: float(v) for k, v in norms.items()},
            "learning_rate": float(lr), "answer_tokens": int(ntok),
            "step_seconds": seconds,
            "tokens_per_second": (prompt_tokens + int(ntok)) / max(seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }

    def _save(self, step: int) -> Path:
        state = {"finetune_type": self.finetune}
        return save_checkpoint(
            self.run_dir / "checkpoints", step, self.model, self.optimizer, self.cfg, state,
            adapter_cfg=self.adapter_cfg or {"fine_tune_type": self.finetune},
            base_model_dir=self.model_dir,
        )

    def train(self) -> SFTResult:
        cfg = self.cfg
        if not hasattr(self, "model"):
            self.setup()
        counts = self.model.parameter_counts()
        self.log(f"sft {self.data.name}: {len(self.data.train)} train / {len(self.data.test)} "
                 f"held-out rows; finetune {self.finetune}; trainable {counts['trainable']:,} / "
                 f"frozen {counts['frozen']:,} parameters; shared prefix {self.prefix.length} tokens")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.start_step:
            trim_jsonl(metrics_path, self.start_step)
        loss_and_grad = nn.value_and_grad(self.model, sft_loss)
        step, interrupted = self.start_step, False
        t0 = time.perf_counter()
        with cpu.speedups(self.model.llm), GracefulStop(self.log) as stop, \
                open(metrics_path, "a") as mf:
            while step < cfg.num_steps and not stop.requested:
                step += 1
                m = self._step(loss_and_grad, step)
                if step == 1:
                    m.update({f"params/{k}": v for k, v in counts.items()})
                mf.write(json.dumps({"step": step, **m}) + "\n")
                mf.flush()
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    self.log(f"step {step:>4}/{cfg.num_steps}  loss {m['loss']:.4f}  grad "
                             f"{m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}  "
                             f"{m['step_seconds']:.2f}s  {m['tokens_per_second']:.0f} tok/s")
                if step % cfg.save_every == 0 or step == cfg.num_steps or stop.requested:
                    self._save(step)
            interrupted = stop.requested
            train_seconds = time.perf_counter() - t0
            if interrupted:
                self.log(f"stopped at step {step}; continue with --resume latest")
                return SFTResult(self.run_dir, step, {}, True, stop.exit_code)
            self.save_model()
            scores = self.evaluate()
        summary = {"task": self.data.name, "steps": step, "finetune_type": self.finetune,
                   "train_seconds": round(train_seconds, 1), **counts, "eval": scores}
        write_summary(self.run_dir, summary)
        self.log(ev.describe(scores))
        return SFTResult(self.run_dir, step, scores)

    def save_model(self) -> Path:
        """The trained parts as their own folder (run_dir/model), loadable with
        `timeseries.model.load_timeseries_lm`; adapters in mlx-lm's format beside them."""
        out = self.run_dir / "model"
        tmp = self.run_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        extra = {"finetune_type": self.finetune, "prompt_format": self.cfg.prompt_format,
                 "task": self.data.name}
        self.model.save(tmp, str(self.model_dir), extra)
        if self.adapter_cfg:
            llm_trainable = {k[len("llm."):]: v for k, v in
                             tree_flatten(self.model.trainable_parameters()) if k.startswith("llm.")}
            mx.save_safetensors(str(tmp / "adapters.safetensors"), llm_trainable)
            (tmp / "adapter_config.json").write_text(json.dumps(self.adapter_cfg, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out

    # ---- evaluation ----

    def evaluate(self) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        keep = held_out_subset(len(data.test), cfg.eval_size)
        test = [data.test[i] for i in keep]
        if not test:
            return {}
        as_text = cfg.prompt_format == "text"
        out: dict[str, Any] = {"baselines": data.baselines}
        tic = time.perf_counter()
        prefix = self.prefix
        if not prefix.length:
            # The weights no longer change: the held-out rows' shared opening runs once.
            firsts = [e.pieces[0] for e in test]
            prefix = SharedPrefix(self.model.llm, firsts[0][: common_prefix(firsts)])
        if data.classes:
            out["ranking"] = ev.rank_accuracy(self.model, self.tokenizer, test, data.classes, prefix)
        texts = ev.generate_texts(self.model, self.tokenizer, test, prefix, cfg.max_new_tokens)
        out["generation"] = ev.generation_accuracy(texts, [e.answer for e in test])
        out["samples"] = [{"answer": e.answer, "completion": t} for e, t in zip(test[:5], texts)]
        if cfg.controls and data.has_series and data.classes and data.test_rows:
            rows = [data.test_rows[i] for i in keep]
            out["shuffled_series"] = ev.shuffle_control(self.model, self.tokenizer, rows,
                                                        data.classes, prefix, as_text)
        out["eval_seconds"] = round(time.perf_counter() - tic, 1)
        return out
