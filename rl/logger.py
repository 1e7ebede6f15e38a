"""Metrics out: metrics.jsonl always (one JSON object per step), wandb too when asked (offline by default).

The only module that imports wandb. A resumed run appends to metrics.jsonl after dropping rows past
the checkpoint it resumed from, and continues the same wandb run id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        resume_step: int | None,
        use_wandb: bool,
        project: str,
        run_id: str | None,
        config: dict,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    continue
                if row["step"] <= resume_step:
                    kept.append(line)
        elif self.path.exists():
            self.path.unlink()
        self.path.write_text("".join(line + "\n" for line in kept))
        self.run = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow", config=config)
        self.run_id = self.run.id if self.run else run_id

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, step: int, key: str, path: Path, caption: str) -> None:
        """An image file (an evaluation's grid) into wandb's media with its caption; metrics.jsonl keeps metrics only,
        the file stays where it is."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
