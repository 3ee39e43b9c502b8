"""Who may write a run folder, and what a resumed run must agree with.

The one place for these rules, checked before the model loads and before anything is written:

- A folder that already holds a run is never overwritten by accident: a new run there is refused
  unless `--resume latest|auto|<checkpoint>` continues it or `--overwrite` replaces it.
- A resume loads only a checkpoint that matches the run: the same model (by content, not path)
  and the same value of every field that changes the trainable state, the data order or the maths.
- On resume, `metrics.jsonl` and `rollouts.jsonl` are cut back to the checkpoint's step, so the
  steps redone after a crash are logged once.
- Files appear only once the run starts (`start_run`), so a run that fails its checks leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import GRPOConfig, config_yaml
from ..errors import MlxRftError
from . import checkpoint as ckpt

# What a run writes into its folder (anything else there belongs to the user and is left alone).
RUN_FILES = (
    "config.yaml", "metrics.jsonl", "rollouts.jsonl", "report.html", "summary.json",
    "checkpoints", "tensorboard", "wandb",
)

# Fields a resumed run may change: where and how often it logs and saves, how long it runs, and
# memory knobs that give the same update. Every other field must equal the checkpoint's.
RESUMABLE_FIELDS = frozenset({
    "model",  # the path may move; the model itself is compared by fingerprint
    "num_steps", "output_dir", "resume", "overwrite", "save_every", "keep_last", "log_every",
    "sample_every", "report_to", "wandb_project", "progress", "eval_every", "eval_k",
    "eval_temperature", "gradient_accumulation_steps", "gradient_checkpointing",
    "reward_on_error", "reward_timeout", "max_unscored_steps", "max_uninformative_steps",
})


@dataclass
class RunPlan:
    """What `start_run` will do: a fresh run (replacing an earlier one's files or not) or a resume."""

    run_dir: Path
    resume_from: Path | None = None  # the checkpoint to load
    replace: bool = False  # remove the run files already in run_dir when the run starts
    fingerprint: str = ""


def data_fingerprint(prompts) -> str:
    """A hash of the training prompts in order (what a checkpoint's sampler position points at);
    `prompts` yields PromptExamples."""
    h = hashlib.sha256()
    for example in prompts:
        h.update(example.prompt.encode())
        h.update(b"\0")
        for piece in example.pieces or ():  # a series prompt's numbers, not only its text
            h.update(piece.tobytes())
    return h.hexdigest()[:16]


def check_same_data(state: dict[str, Any], fingerprint: str, checkpoint: Path) -> None:
    """Refuse to resume on other training prompts than the checkpoint's (older checkpoints,
    without a fingerprint, are trusted)."""
    saved = state.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise MlxRftError(
            f"the training prompts differ from those {checkpoint} was trained on (same config, "
            "different rows: the data file changed, or the task's generator depends on Python's "
            "hash seed, as some reasoning-gym tasks do; the mlx-rft command fixes it, in Python "
            "set PYTHONHASHSEED=0 before starting); resuming would train on other data, so use "
            "the original data or start a fresh run"
        )


def model_fingerprint(model_dir: Path) -> str:
    """A cheap content hash of a model folder: config.json, and each weight file's name, size,
    first and last MiB (two models with equal shapes but other weights differ here)."""
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    chunk = 1 << 20
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(size - chunk, chunk))
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def holds_run(run_dir: Path) -> list[str]:
    """The run files already present in run_dir (empty when it holds no run)."""
    if not run_dir.is_dir():
        return []
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_writable(run_dir: Path) -> None:
    """Refuse an output_dir that is a file or cannot be written, before anything heavy runs."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MlxRftError(f"output_dir {str(run_dir)!r} is a file; pass a folder with --output-dir")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MlxRftError(f"output_dir {str(run_dir)!r}: {str(probe)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise MlxRftError(
            f"output_dir {str(run_dir)!r} cannot be written ({e.strerror} in {str(probe)!r}); "
            "pass a writable --output-dir"
        ) from None


def plan_run(cfg: GRPOConfig, model_dir: Path) -> RunPlan:
    """Decide fresh / resume / replace for cfg.output_dir, or refuse; writes nothing."""
    run_dir = Path(cfg.output_dir)
    check_writable(run_dir)
    plan = RunPlan(run_dir, fingerprint=model_fingerprint(model_dir))
    present = holds_run(run_dir)
    if cfg.overwrite:
        plan.replace = bool(present)
        return plan
    if cfg.resume is None:
        if present:
            if not ckpt.checkpoint_steps(run_dir / "checkpoints"):
                raise MlxRftError(
                    f"{run_dir} holds a run that stopped before its first checkpoint "
                    f"({', '.join(present)}); start it afresh with --resume auto or --overwrite, "
                    "or pick a new --output-dir"
                )
            raise MlxRftError(
                f"{run_dir} already holds a run ({', '.join(present)}); continue it with "
                "--resume latest (or --resume auto), pick a new --output-dir, or pass --overwrite "
                "to replace it"
            )
        return plan
    if cfg.resume == "auto" and not ckpt.checkpoint_steps(run_dir / "checkpoints"):
        plan.replace = bool(present)  # nothing to continue: a crash before the first checkpoint
        return plan
    path = ckpt.find_checkpoint(cfg.resume, run_dir)
    state = ckpt.read_trainer_state(path)
    _check_branch(path, int(state["step"]), run_dir, present)
    check_resume_matches(path, cfg, plan.fingerprint, state)
    plan.resume_from = path
    return plan


def _check_branch(path: Path, step: int, run_dir: Path, present: list[str]) -> None:
    """A resume continues the newest history of run_dir, or starts a branch in an empty folder."""
    root = (run_dir / "checkpoints").resolve()
    if path.resolve().parent == root:
        newer = [s for s, _ in ckpt.checkpoint_steps(root) if s > step]
        if newer:
            raise MlxRftError(
                f"--resume {path.name}: {run_dir} has newer checkpoints (step {max(newer)}), "
                "which this run would overwrite; resume the newest with --resume latest, or "
                "branch from this one into a new --output-dir"
            )
    elif present:
        raise MlxRftError(
            f"--resume {path}: {run_dir} already holds another run ({', '.join(present)}); "
            "pass a new --output-dir for a run continued from this checkpoint"
        )


def check_resume_matches(path: Path, cfg: GRPOConfig, fingerprint: str, state: dict) -> None:
    """Refuse a checkpoint whose model or maths-changing fields differ from cfg, naming them."""
    saved_cfg = ckpt.read_config(path)
    new = cfg.to_dict()
    diffs = []
    for name, old in saved_cfg.items():
        if name not in new or name in RESUMABLE_FIELDS:
            continue
        if old != new[name]:  # YAML reads back what to_dict wrote: lists, numbers, strings
            diffs.append(f"{name} {old!r} -> {new[name]!r}")
    if (
        cfg.lr_schedule != "constant" and "num_steps" in saved_cfg
        and saved_cfg["num_steps"] != cfg.num_steps
    ):
        diffs.append(
            f"num_steps {saved_cfg['num_steps']!r} -> {cfg.num_steps!r} (the {cfg.lr_schedule} "
            "schedule decays over num_steps)"
        )
    saved_fp = state.get("model_fingerprint")
    if saved_fp and saved_fp != fingerprint:
        diffs.insert(0, f"model {saved_cfg.get('model')!r} -> {cfg.model!r} (other weights)")
    elif not saved_fp and saved_cfg.get("model") != cfg.model:
        diffs.insert(0, f"model {saved_cfg.get('model')!r} -> {cfg.model!r}")
    if diffs:
        raise MlxRftError(
            f"cannot resume from {path}: it was trained with other settings ({'; '.join(diffs)}); "
            "resume with the checkpoint's settings (its config.yaml) or start a new run in a new "
            "--output-dir"
        )


def start_run(plan: RunPlan, cfg: GRPOConfig, resumed_step: int) -> None:
    """Make the run folder real: replace an earlier run's files or cut the logs back to the
    checkpoint's step, then write config.yaml. Called once the model and data are ready."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.replace:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    if plan.resume_from is not None:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            trim_jsonl(run_dir / name, resumed_step)
        (run_dir / "summary.json").unlink(missing_ok=True)
    ckpt.atomic_write_text(run_dir / "config.yaml", config_yaml(cfg))


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of a step log up to last_step (a crash may have logged steps after the
    checkpoint, which the resumed run logs again); a torn last line is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
            kept.append(line)
    ckpt.atomic_write_text(path, "".join(x + "\n" for x in kept))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json marks a finished run (a `--resume auto` restart then has nothing to redo)."""
    ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None

