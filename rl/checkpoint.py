"""Run-directory checkpoints: written atomically, the newest complete one found by resume=auto.

A checkpoint is a folder checkpoints/step-000040/ holding state.json (step, policy version, wandb run
id, data position, seeds), policy.safetensors (the trainable weights) and deepspeed/ (each learner
rank's optimizer, scheduler and value model). It is written under a temporary name and renamed only
when complete, so a run killed mid-write never leaves a checkpoint that resume would load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from policies.adapters import trained_decision_mean

PREFIX = "step-"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder to write the checkpoint of `step` into."""
    path = Path(run_dir) / "checkpoints" / f".tmp-{PREFIX}{step:06d}"
    if path.exists():
        shutil.rmtree(path)  # left by a run killed while writing it
    path.mkdir(parents=True)
    return path


def write_weights(staging: Path, trainable: dict[str, torch.Tensor]) -> None:
    """The trainable weights into a staged checkpoint, as float32 safetensors (learner rank 0 writes them)."""
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, str(staging / "policy.safetensors")
    )


def commit(staging: Path, state: dict, keep: int) -> Path:
    """Finish a staged checkpoint whose weights are written: write state, fsync, rename into place, prune old ones."""
    if not (staging / "policy.safetensors").is_file():
        raise FileNotFoundError(
            f"{staging} has no policy.safetensors: the learners did not write the checkpoint's weights"
        )
    (staging / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = staging.parent / staging.name.removeprefix(".tmp-")
    old = staging.parent / f".old-{final.name}"
    if final.exists():  # re-saving a step: never a moment without a complete checkpoint of it
        os.rename(final, old)
    os.rename(staging, final)
    dir_fd = os.open(staging.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself reaches the disk
    finally:
        os.close(dir_fd)
    if old.exists():
        shutil.rmtree(old)
    for old in complete_checkpoints(staging.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never complete)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to continue from: resume='auto' -> the newest complete one (or None), 'none' -> None,
    anything else -> that path, which must be a complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no state.json)")
    return path


def check_decision_weights(path: Path, decision_mean: str) -> None:
    """Refuse, before any actor starts, a checkpoint whose decision-code mean was trained otherwise than
    policy.trainable.decision_mean says: its weights and optimizer state would not fit the trained parameters.
    Reads the names of the saved tensors only."""
    with safe_open(str(path / "policy.safetensors"), "pt") as f:
        trained = trained_decision_mean(f.keys())
    if trained not in (None, decision_mean):
        raise ValueError(
            f"resume: {path} trained the decision-code mean with policy.trainable.decision_mean={trained}, this "
            f"config says {decision_mean}; set it as the checkpoint was trained"
        )


def load(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """state.json and the trainable weights of a checkpoint."""
    state = json.loads((path / "state.json").read_text())
    weights = {k: v.numpy() for k, v in load_file(str(path / "policy.safetensors")).items()}
    return state, weights
