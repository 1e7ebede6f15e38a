"""Judge an editing policy the way papers do: a benchmark in its authors' format, any checkpoint, several scorers.

    python launch/evaluate_policy.py --config launch/configs/shapeedit.yaml --benchmark shapeedit:runs/demo/data \
        --checkpoint base --checkpoint runs/demo/grpo/JRM-seed0/checkpoints/step-000020 \
        --scorer oracle:runs/demo/data --scorer jrm:runs/demo/jrm/final --out runs/eval

Benchmarks gedit:DIR (hub parquet), imgedit:FILE (basic_edit.json), shapeedit:DIR[@split]; scorers any reward spec
or viescore:JUDGE (reward/viescore.py). Writes per-prompt scores, summaries by task type and language, grids, and
for two checkpoints a paired comparison with a bootstrap interval. Every option and output: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/evaluate_policy.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image

from reward.config import ConfigError, HelpFormatter, load_config
from reward.data import DataError, load_image
from reward.evaluate import load_reward, parse_reward_spec
from reward.viescore import JudgeError, load_judge, pq_prompt, sc_prompt, viescore
from rl.checkpoint import load as load_checkpoint
from rl.compare import paired_difference
from rl.config import RLConfig
from rl.workers import build_policy

GRID_PROMPTS = 8  # prompts shown in each checkpoint's grid


@dataclass
class EditPrompt:
    """One benchmark row, in the benchmark's own words."""

    key: str
    source: Image.Image  # RGB, at the benchmark's size
    instruction: str
    task_type: str
    language: str
    intersection: bool | None  # GEdit-Bench's intersection subset; None elsewhere


# ---- benchmarks ---------------------------------------------------------------------------------------------------

GEDIT_COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")


def load_gedit(path: Path, limit: int) -> list[EditPrompt]:
    """GEdit-Bench as its authors publish it (the hub dataset stepfun-ai/GEdit-Bench, split train): a folder of
    parquet files, read with `datasets`."""
    from datasets import load_dataset

    files = sorted(str(f) for f in path.rglob("*.parquet"))
    if not files:
        raise DataError(f"gedit:{path}: no parquet files (download the dataset stepfun-ai/GEdit-Bench there)")
    rows = load_dataset("parquet", data_files=files, split="train")
    missing = [c for c in GEDIT_COLUMNS if c not in rows.column_names]
    if missing:
        raise DataError(f"gedit:{path}: columns {missing} missing (has {rows.column_names})")
    out = []
    for i, row in enumerate(rows):
        if limit and len(out) == limit:
            break
        image = row["input_image"]
        if not isinstance(image, Image.Image):
            raise DataError(f"gedit:{path} row {i}: input_image is not an image")
        out.append(
            EditPrompt(
                str(row["key"]),
                image.convert("RGB"),
                row["instruction"],
                row["task_type"],
                row["instruction_language"],
                bool(row["Intersection_exist"]),
            )
        )
    return out


def load_imgedit(path: Path, image_root: Path | None, limit: int) -> list[EditPrompt]:
    """ImgEdit-Bench's basic set: basic_edit.json, {key: {"id": image path, "prompt": ..., "edit_type": ...}}."""
    if not path.is_file():
        raise DataError(f"imgedit:{path} does not exist (ImgEdit-Bench's Benchmark/Basic/basic_edit.json)")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"imgedit:{path}: not valid json ({e})") from e
    if not isinstance(rows, dict):
        raise DataError(f"imgedit:{path}: expected an object of key -> {{id, prompt, edit_type}}")
    root = image_root or path.parent
    out = []
    for key, row in rows.items():
        if limit and len(out) == limit:
            break
        where = f"imgedit:{path} key {key}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "prompt", "edit_type")):
            raise DataError(f"{where}: needs string fields id, prompt and edit_type")
        out.append(EditPrompt(key, load_image(root / row["id"], where), row["prompt"], row["edit_type"], "en", None))
    return out


def load_shapeedit(path: Path, split: str, limit: int) -> list[EditPrompt]:
    """ShapeEdit prompts of one split; the task type is the instruction's edit families."""
    file = path / f"{split}_prompts.json"
    if not file.is_file():
        raise DataError(f"shapeedit:{path}@{split}: {file} not found (python -m reward.shapeedit generate)")
    out = []
    for row in json.loads(file.read_text())[: limit or None]:
        families = "+".join(e["family"] for e in row["edits"])
        out.append(
            EditPrompt(
                row["prompt_id"],
                load_image(path / row["path_src"], str(file)),
                row["instruction"],
                families,
                "en",
                None,
            )
        )
    return out


def load_benchmark(spec: str, image_root: str | None, limit: int) -> list[EditPrompt]:
    """`gedit:DIR`, `imgedit:FILE` or `shapeedit:DIR[@split]`."""
    kind, _, rest = spec.partition(":")
    if kind == "gedit" and rest:
        return load_gedit(Path(rest), limit)
    if kind == "imgedit" and rest:
        return load_imgedit(Path(rest), Path(image_root) if image_root else None, limit)
    if kind == "shapeedit" and rest:
        folder, _, split = rest.partition("@")
        return load_shapeedit(Path(folder), split or "test_heldout", limit)
    raise ValueError(f"--benchmark must be gedit:DIR, imgedit:FILE or shapeedit:DIR[@split], got {spec!r}")


# ---- scorers ------------------------------------------------------------------------------------------------------


def parse_scorer(text: str) -> tuple[str, str]:
    """`[NAME=]SPEC` -> (name, spec), the spec checked without loading anything."""
    name, sep, spec = text.partition("=")
    if not sep or ":" in name or "/" in name:
        name, spec = "", text
    if spec.startswith("viescore:"):
        judge = spec[len("viescore:") :]
        if not judge.startswith(("vlm:", "http://", "https://")):
            raise ValueError(f"--scorer {text!r}: viescore:JUDGE with JUDGE vlm:PATH or http(s)://HOST:PORT/v1[#MODEL]")
        return name or "viescore", spec
    kind, _ = parse_reward_spec(spec, f"--scorer {text!r}")
    return name or kind, spec


class Scorer:
    """One scorer of edits: a reward spec (one number per edit) or a VIEScore judge (SC, PQ, O and its answers)."""

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        self.judge = load_judge(spec[len("viescore:") :]) if spec.startswith("viescore:") else None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reward = None if self.judge is not None else load_reward(spec, device)

    def describe(self) -> dict:
        """What a result must record to be compared with another: the spec and, for a judge, the model it resolved
        to and a hash of the prompts it was asked."""
        if self.judge is None:
            return {"spec": self.spec}
        prompts = hashlib.sha256((sc_prompt("{instruction}") + pq_prompt()).encode()).hexdigest()[:16]
        return {"spec": self.spec, "judge": self.judge.name, "prompts_sha256": prompts}

    @property
    def metrics(self) -> list[str]:
        return [f"{self.name}/{k}" for k in ("SC", "PQ", "O")] if self.judge is not None else [self.name]

    def score(self, sources: list[Image.Image], instructions: list[str], edits: list[Image.Image]) -> list[dict]:
        """One dict per edit: {metric: value} (and the judge's answers for VIEScore)."""
        if self.judge is None:
            values = self.reward.score(sources, instructions, edits, batch_size=16)
            return [{self.name: float(v)} for v in values]
        out = []
        for s, t, e in zip(sources, instructions, edits):
            v = viescore(self.judge, s, t, e)
            out.append(
                {f"{self.name}/SC": v.SC, f"{self.name}/PQ": v.PQ, f"{self.name}/O": v.O}
                | {f"{self.name}/sc_text": v.sc_text, f"{self.name}/pq_text": v.pq_text}
            )
        return out


# ---- policies -----------------------------------------------------------------------------------------------------


def load_policy_checkpoint(cfg: RLConfig, checkpoint: str):
    """The config's policy with `checkpoint`'s weights: `base`, an RL checkpoint (state.json and
    policy.safetensors) or a save_pretrained folder (policy.json)."""
    policy = build_policy(cfg.policy, cfg.seed)
    if checkpoint == "base":
        return policy
    path = Path(checkpoint)
    if (path / "state.json").is_file() and (path / "policy.safetensors").is_file():
        state, weights = load_checkpoint(path)
        policy.load_trainable_state({k: torch.tensor(v) for k, v in weights.items()}, state["policy_version"])
    elif (path / "policy.json").is_file():
        policy.load_pretrained(path)
    else:
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: neither an RL checkpoint (state.json, policy.safetensors) nor a "
            f"save_pretrained folder (policy.json)"
        )
    return policy


@torch.no_grad()
def edit_prompts(
    policy, cfg: RLConfig, prompts: list[EditPrompt], samples: int, seed: int, noise: str = "prompt"
) -> list[list[Image.Image]]:
    """`samples` ODE edits of each prompt, each at its source's size (GEdit-Bench resizes the edit to the source
    before judging). `noise`: 'prompt' draws prompt i's edits from a generator seeded with seed + i (the same
    whatever the batch or the prompt list's length); 'rl' draws them as an RL evaluation does (the prompts split over
    cluster.rollout_workers, each share's samples from one generator seeded with `seed`, in algo.micro_batch_size
    batches), so an RL checkpoint's scores repeat its run's evaluation at that step."""
    sampler = cfg.policy.eval_sampler()  # what RL's evaluation samples with
    size = (cfg.policy.width, cfg.policy.height)
    sources = [p.source if p.source.size == size else p.source.resize(size, Image.LANCZOS) for p in prompts]
    device = policy.device
    if noise == "prompt":
        batches = [([i] * samples, torch.Generator(device).manual_seed(seed + i)) for i in range(len(prompts))]
    else:
        batches = []
        for share in np.array_split(np.arange(len(prompts)), cfg.cluster.rollout_workers):
            generator = torch.Generator(device).manual_seed(seed)
            repeated = [int(i) for i in share for _ in range(samples)]
            step = cfg.algo.micro_batch_size
            batches += [(repeated[k : k + step], generator) for k in range(0, len(repeated), step)]
    out: list[list[Image.Image]] = [[] for _ in prompts]
    for rows, generator in batches:
        rollout = policy.sample([sources[i] for i in rows], [prompts[i].instruction for i in rows], sampler, generator)
        for i, e in zip(rows, rollout.edited_images):
            edit = Image.fromarray(e.permute(1, 2, 0).cpu().numpy())  # (3, H, W) uint8
            out[i].append(
                edit if edit.size == prompts[i].source.size else edit.resize(prompts[i].source.size, Image.BICUBIC)
            )
    return out


# ---- results ------------------------------------------------------------------------------------------------------


def mean_or_none(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarise(records: list[dict], metrics: list[str]) -> dict:
    """Per metric: the mean over prompts (`mean`), each task type's mean (`by_task`) and their mean (`macro`, how
    GEdit-Bench averages), the same per language, and per language over GEdit's intersection subset. A prompt's
    value is the mean over its samples; samples a judge's answer did not give a score for are left out (`unparsed`
    counts them)."""

    def block(rows: list[dict], metric: str) -> dict:
        values = [r["scores"][metric] for r in rows if r["scores"][metric] is not None]
        tasks = sorted({r["task_type"] for r in rows})
        by_task = {t: mean_or_none([r["scores"][metric] for r in rows if r["task_type"] == t]) for t in tasks}
        task_means = [v for v in by_task.values() if v is not None]
        return {
            "mean": float(np.mean(values)) if values else None,
            "macro": float(np.mean(task_means)) if task_means else None,
            "prompts": len(values),
            "by_task": by_task,
        }

    out = {}
    for metric in metrics:
        languages = sorted({r["language"] for r in records})
        entry = block(records, metric)
        entry["by_language"] = {
            lang: block([r for r in records if r["language"] == lang], metric) for lang in languages
        }
        if any(r["intersection"] is not None for r in records):
            entry["intersection"] = {
                lang: block([r for r in records if r["language"] == lang and r["intersection"]], metric)
                for lang in languages
            }
        entry["unparsed"] = sum(s[metric] is None for r in records for s in r["samples"])
        out[metric] = entry
    return out


def save_grid(path: Path, prompts: list[EditPrompt], edits: list[list[Image.Image]], side: int = 128) -> None:
    """source | edit 1 | edit 2 ... for the first GRID_PROMPTS prompts, `side` pixels a cell."""
    rows = list(zip(prompts, edits))[:GRID_PROMPTS]
    columns = 1 + max(len(e) for _, e in rows)
    grid = Image.new("RGB", (columns * side, len(rows) * side), "white")
    for y, (p, images) in enumerate(rows):
        for x, image in enumerate([p.source, *images]):
            resample = Image.NEAREST if image.width <= side else Image.BILINEAR
            grid.paste(image.convert("RGB").resize((side, side), resample), (x * side, y * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def evaluate_checkpoint(
    cfg: RLConfig,
    checkpoint: str,
    prompts: list[EditPrompt],
    scorers: list[Scorer],
    samples: int,
    seed: int,
    out: Path,
    noise: str = "prompt",
) -> list[dict]:
    """Edit, score and write OUT/results.json, summary.json and grid.png for one checkpoint; returns the records."""
    policy = load_policy_checkpoint(cfg, checkpoint)
    edits = edit_prompts(policy, cfg, prompts, samples, seed, noise)
    del policy
    sources = [p.source for p, group in zip(prompts, edits) for _ in group]
    instructions = [p.instruction for p, group in zip(prompts, edits) for _ in group]
    flat = [e for group in edits for e in group]
    per_sample = [{} for _ in flat]
    for scorer in scorers:
        for row, scores in zip(per_sample, scorer.score(sources, instructions, flat)):
            row.update(scores)
    metrics = [m for s in scorers for m in s.metrics]
    records, k = [], 0
    for i, (p, group) in enumerate(zip(prompts, edits)):
        rows = per_sample[k : k + len(group)]
        k += len(group)
        records.append(
            {
                "key": p.key,
                "task_type": p.task_type,
                "language": p.language,
                "intersection": p.intersection,
                "instruction": p.instruction,
                "seed": seed + i if noise == "prompt" else seed,
                "samples": rows,
                "scores": {m: mean_or_none([r[m] for r in rows]) for m in metrics},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoint": checkpoint, "prompts": records}, indent=1) + "\n")
    summary = {
        "checkpoint": checkpoint,
        "prompts": len(prompts),
        "samples": samples,
        "seed": seed,
        "noise": noise,
        "scorers": {s.name: s.describe() for s in scorers},
        "metrics": summarise(records, metrics),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    save_grid(out / "grid.png", prompts, edits)
    return records


def compare(a: list[dict], b: list[dict], labels: tuple[str, str], metrics: list[str]) -> dict:
    """The second checkpoint minus the first, per metric, over the prompts both scored: the mean difference and
    a 95% bootstrap interval over prompts (paired: same prompts, same seeds), and a verdict."""
    out = {}
    for metric in metrics:
        pairs = [
            (x["scores"][metric], y["scores"][metric])
            for x, y in zip(a, b)
            if x["scores"][metric] is not None and y["scores"][metric] is not None
        ]
        if len(pairs) < 2:
            out[metric] = {"prompts": len(pairs), "sentence": f"{metric}: fewer than 2 prompts scored by both"}
            continue
        first, second = (np.array(v) for v in zip(*pairs))
        mean, low, high = paired_difference(first, second)
        if low > 0 or high < 0:
            verdict = f"{labels[1]} is {'better' if mean > 0 else 'worse'} than {labels[0]}"
        else:
            verdict = "no difference resolved"
        out[metric] = {
            "prompts": len(pairs),
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "sentence": f"{metric}: {labels[1]} - {labels[0]} = {mean:+.4f} [{low:+.4f}, {high:+.4f}] (95%, "
            f"{len(pairs)} prompts): {verdict}.",
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="the RL config whose policy is evaluated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--benchmark", required=True, help="gedit:DIR, imgedit:FILE or shapeedit:DIR[@split]")
    parser.add_argument(
        "--image-root",
        default=None,
        help="imgedit: the folder its image ids are relative to (default: the json file's folder)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="base, an RL checkpoint or a save_pretrained folder; twice for a paired comparison (default: base)",
    )
    parser.add_argument("--scorer", action="append", default=[], help="[NAME=]SPEC, repeatable (see above)")
    parser.add_argument(
        "--samples", type=int, default=None, help="edits per prompt (default: the config's policy.eval_samples)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="prompt i's edits use seed + i (default: the config's seed)"
    )
    parser.add_argument(
        "--noise",
        choices=("prompt", "rl"),
        default="prompt",
        help="prompt: each prompt's own seed; rl: the noise of an RL evaluation with this config (--seed the run's "
        "seed, the benchmark its eval prompts), so an RL checkpoint scores as its run's evaluation did",
    )
    parser.add_argument("--limit", type=int, default=0, help="the first N prompts (0: all)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--wandb", action="store_true", help="log each grid and summary to an offline wandb run in --out"
    )
    args = parser.parse_args(argv)
    checkpoints = args.checkpoint or ["base"]
    try:  # everything checked, and every scorer loaded, before any edit
        if len(checkpoints) > 2:
            raise ValueError(f"--checkpoint: one, or two for a comparison, got {len(checkpoints)}")
        if (args.samples is not None and args.samples < 1) or args.limit < 0:
            raise ValueError("--samples must be >= 1 and --limit >= 0")
        if not args.scorer:
            raise ValueError("give at least one --scorer")
        named = [parse_scorer(s) for s in args.scorer]
        if len({n for n, _ in named}) < len(named):
            raise ValueError(f"two scorers share a name ({[n for n, _ in named]}): name them NAME=SPEC")
        if any(spec.startswith("oracle:") for _, spec in named) and not args.benchmark.startswith("shapeedit:"):
            raise ValueError("the oracle judges ShapeEdit edits only: use it with --benchmark shapeedit:DIR")
        for c in checkpoints:
            if c != "base" and not Path(c).is_dir():
                raise FileNotFoundError(f"--checkpoint {c}: no such folder")
        cfg = load_config(RLConfig, args.config, args.set)
        seed = cfg.seed if args.seed is None else args.seed
        samples = args.samples or cfg.policy.eval_samples
        if args.noise == "rl" and (seed, samples) != (cfg.seed, cfg.policy.eval_samples):
            raise ValueError(
                f"--noise rl repeats the run's evaluation: it needs the run's seed ({cfg.seed}) and "
                f"policy.eval_samples ({cfg.policy.eval_samples}), got --seed {seed} --samples {samples}"
            )
        prompts = load_benchmark(args.benchmark, args.image_root, args.limit)
        if args.noise == "rl" and len(prompts) != cfg.data.num_eval:
            print(
                f"note: {len(prompts)} prompts where the run evaluated data.num_eval={cfg.data.num_eval}: the "
                f"prompts split over the workers differently, so the noise is not the run's",
                flush=True,
            )
        scorers = [Scorer(n, s) for n, s in named]  # every model and judge loads (and answers) before any edit
    except (ValueError, FileNotFoundError, ConfigError, DataError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = [m for s in scorers for m in s.metrics]
    out = Path(args.out)
    labels = [c if c == "base" else Path(c).name for c in checkpoints]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]}-a", f"{labels[1]}-b"]
    logger = None
    if args.wandb:
        from rl.logger import MetricsLogger

        logger = MetricsLogger(out, None, True, "jrm-edit-eval", None, {"args": vars(args)})
    results = []
    for step, (label, checkpoint) in enumerate(zip(labels, checkpoints)):
        records = evaluate_checkpoint(cfg, checkpoint, prompts, scorers, samples, seed, out / label, args.noise)
        results.append(records)
        summary = json.loads((out / label / "summary.json").read_text())["metrics"]
        line = ", ".join(f"{m} {summary[m]['mean']:.4f}" for m in metrics if summary[m]["mean"] is not None)
        print(f"{label}: {line}", flush=True)
        if logger is not None:
            logger.log(step, {f"eval/{m}": summary[m]["mean"] for m in metrics if summary[m]["mean"] is not None})
            caption = "\n".join(
                f"{i + 1}. {r['instruction']}: "
                + ", ".join(f"{m} {r['scores'][m]:.3f}" for m in metrics if r["scores"][m] is not None)
                for i, r in enumerate(records[:GRID_PROMPTS])
            )
            logger.log_image(step, f"grid/{label}", out / label / "grid.png", caption)
    if len(results) == 2:
        comparison = {"labels": labels, "metrics": compare(results[0], results[1], tuple(labels), metrics)}
        (out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
        for entry in comparison["metrics"].values():
            print(entry["sentence"])
    if logger is not None:
        logger.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
