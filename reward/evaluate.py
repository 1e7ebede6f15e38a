"""Judge a reward on editing reward benchmarks; writes results.json and results.md.

    python reward/evaluate.py --reward jrm:runs/jrm/final \
        --benchmark shapeedit:runs/jrm/data/test_iid.json --benchmark shapeedit:runs/jrm/data/test_heldout.json \
        --benchmark tiger:/data/EditReward-Bench --benchmark editscore:/data/editscore_bench.jsonl \
        --benchmark mmrb2:/data/mmrb2_editing.json --benchmark genai:/data/genai_bench_edit --out runs/eval [--erank]

Rewards: `jrm:PATH` (JRM.from_pretrained), `generative:PATH` (decode a critique with the same checkpoint,
parse its verdict), `oracle:SHAPEEDIT_DIR` (the exact ShapeEdit judge; ShapeEdit benchmarks only).
Benchmark formats and metrics: reward/benchmarks.py. Every row of every benchmark is checked (fields, labels,
every image decoded, its geometry, the instruction against the reward model's limits) before any scoring; the
first bad row stops the run naming its file, row and key (exit 2, nothing written), unless --skip-bad (then
bad rows are skipped and counted by kind in results.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python reward/evaluate.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from reward.benchmarks import BENCHMARKS, Comparison, image_key, load_benchmark, open_image, open_source, summarise
from reward.config import HelpFormatter
from reward.data import DataError, load_image
from reward.generative import GenerativeJudge
from reward.model import JRM
from reward.shapeedit import Edit, Scene, judge_image


def effective_rank(features: torch.Tensor, power: int = 1) -> float:
    """exp(entropy of p) of the centred (N, H) features, p_i = s_i^power / sum_j s_j^power over their singular
    values s. power=1 is Roy & Vetterli (2007); power=2 weighs directions by the variance they carry, the
    convention arXiv 2602.07533 reports. Both run from 1 (one direction) to min(N, H) (a flat spectrum);
    power=2 is never the larger."""
    x = features.double() - features.double().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x) ** power
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class OracleReward:
    """The ShapeEdit oracle behind the common score() signature; finds each source's scene by its pixels."""

    def __init__(self, data_dir: str | Path):
        data_dir = Path(data_dir)
        self.rows: dict[tuple[str, str], dict] = {}
        files = sorted(data_dir.glob("*_prompts.json"))
        if not files:
            raise DataError(f"{data_dir} has no *_prompts.json: the oracle needs ShapeEdit scenes")
        for file in files:
            for row in json.loads(file.read_text()):
                source = (data_dir / row["path_src"]).resolve()
                self.rows[(row["instruction"], _pixels(load_image(source)))] = {**row, "path_src": str(source)}

    def prompt_row(self, source, instruction: str) -> dict:
        """The `*_prompts.json` row of this (source image, instruction), its path_src made absolute."""
        if not isinstance(source, Image.Image):
            raise DataError(
                "the oracle judges ShapeEdit edits of one source image; it cannot score a prompt with several"
            )
        found = self.rows.get((instruction, _pixels(source)))
        if found is None:
            raise DataError(
                f"the oracle knows no ShapeEdit scene for {instruction!r} with this source image: "
                f"give oracle: the folder this benchmark was generated into"
            )
        return found

    def score(self, source_images, instructions, edited_images, batch_size: int = 0) -> torch.Tensor:
        out = []
        for source, instruction, edited in zip(source_images, instructions, edited_images):
            row = self.prompt_row(source, instruction)
            edits = tuple(Edit.from_dict(e) for e in row["edits"])
            out.append(judge_image(Scene.from_dict(row["scene"]), edits, np.asarray(edited)).overall)
        return torch.tensor(out, dtype=torch.float32)


def _pixels(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


class SourcePreservation:
    """1 - mean |edit - source| over pixels (0-1 scale): rewards leaving the image alone. Use it as a small
    weighted term next to an instruction-following reward, never alone (doing nothing maximises it)."""

    def score(self, source_images, instructions, edited_images, batch_size: int = 0) -> torch.Tensor:
        out = []
        for source, edited in zip(source_images, edited_images):
            edited = edited.convert("RGB")
            if edited.size != source.size:
                edited = edited.resize(source.size, Image.BILINEAR)
            diff = np.abs(np.asarray(source.convert("RGB"), dtype=np.float32) - np.asarray(edited, dtype=np.float32))
            out.append(1.0 - float(diff.mean()) / 255.0)
        return torch.tensor(out, dtype=torch.float32)


REWARD_KINDS = ("jrm", "generative", "oracle")


def parse_reward_spec(spec: str, where: str = "reward") -> tuple[str, str]:
    """The one parser of reward specs (RL terms, the gold judge, this evaluation, the GPU plan): `preservation`
    -> ("preservation", ""), `kind:path` -> (kind, path). Refuses what cannot be built before anything loads: an
    unknown kind, no path, a missing ShapeEdit folder (a model path may be a hub id, which only loading can check).
    `where` names the setting in the message."""
    if spec == "preservation":
        return "preservation", ""
    kind, _, path = spec.partition(":")
    if kind not in REWARD_KINDS or not path:
        raise ValueError(
            f"{where}: {spec!r} is not a reward spec; use preservation, " + ", ".join(f"{k}:PATH" for k in REWARD_KINDS)
        )
    if kind == "oracle" and not Path(path).is_dir():
        raise FileNotFoundError(f"{where}: {spec!r}: no ShapeEdit data folder at {path}")
    return kind, path


def load_reward(spec: str, device: str = "cpu"):
    """A reward spec (parse_reward_spec) -> an object with score(source_images, instructions, edited_images,
    batch_size)."""
    kind, path = parse_reward_spec(spec)
    if kind == "preservation":
        return SourcePreservation()
    if kind == "jrm":
        return JRM.from_pretrained(path).to(device)
    if kind == "generative":
        return GenerativeJudge(JRM.from_pretrained(path).to(device))
    return OracleReward(path)


def instruction_check(reward):
    """The reward's own instruction check (JRM.check_instruction: empty, or over its token limit), or None for
    rewards that take any text (the oracle)."""
    if isinstance(reward, JRM):
        return reward.check_instruction
    if isinstance(reward, GenerativeJudge):
        return reward.model.check_instruction
    return None


def score_comparisons(reward, comparisons: list[Comparison], batch_size: int, features: bool = False):
    """Score every distinct (source, instruction, candidate) once. The comparisons were checked while loading
    (load_benchmark), so nothing here is expected to fail.

    Returns:
        diffs: (N,) score(a) - score(b), one per comparison; seconds spent scoring; the score-token features
        (K, H) when asked, else None.
    """
    keys: dict[tuple, int] = {}
    jobs: list[tuple[Comparison, object]] = []
    slots = []
    for c in comparisons:
        pair = []
        for cand in (c.a, c.b):
            key = (image_key(c.source), c.instruction, image_key(cand), str(c.base))
            if key not in keys:
                keys[key] = len(jobs)
                jobs.append((c, cand))
            pair.append(keys[key])
        slots.append(pair)
    scores = np.full(len(jobs), np.nan)
    seconds = 0.0
    feats = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="scoring", unit="batch", leave=False):
        chunk = jobs[start : start + batch_size]
        sources = [open_source(c.source, c.base, f"{c.where}: {c.keys[1]}") for c, _ in chunk]
        edited = [open_image(cand, c.base, c.where) for c, cand in chunk]
        instructions = [c.instruction for c, _ in chunk]
        t = time.perf_counter()
        if features:  # one pass gives both
            chunk_scores, chunk_features = reward.score_with_features(
                sources, instructions, edited, batch_size=batch_size
            )
            feats.append(chunk_features)
        else:
            chunk_scores = reward.score(sources, instructions, edited, batch_size=batch_size)
        scores[start : start + len(chunk)] = chunk_scores.numpy()
        seconds += time.perf_counter() - t
    diffs = np.array([scores[a] - scores[b] for a, b in slots], dtype=float)
    return diffs, seconds, (torch.cat(feats) if feats else None)


def evaluate(
    reward_spec: str,
    benchmarks: list[str],
    out: str | Path,
    batch_size: int = 16,
    skip_bad: bool = False,
    erank: bool = False,
    limit: int = 0,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> list[dict]:
    """Check every benchmark completely, then score them all; writes {out}/results.json and results.md only at
    the end, so a bad row never leaves a half-written or overwritten result behind."""
    specs = []
    for spec in benchmarks:
        kind, _, path = spec.partition(":")
        if kind not in BENCHMARKS or not path:
            raise ValueError(f"benchmark {spec!r} must look like KIND:PATH with KIND one of {BENCHMARKS}")
        specs.append((kind, path))
    if erank and not reward_spec.startswith("jrm:"):
        raise ValueError("--erank reads JRM's score-token features; it needs a jrm:PATH reward")
    reward = load_reward(reward_spec, device)
    loaded = []
    for kind, path in specs:  # every row of every benchmark checked before any scoring
        comparisons, skipped = load_benchmark(kind, path, skip_bad, instruction_check(reward), limit)
        if skipped:
            print(f"skipped {sum(skipped.values())} bad rows of {path}: {dict(skipped)}", file=sys.stderr)
        loaded.append((kind, path, comparisons, skipped))
    results = []
    for kind, path, comparisons, skipped in loaded:
        before = (reward.parse_failures, reward.generated_tokens) if isinstance(reward, GenerativeJudge) else (0, 0)
        diffs, seconds, feats = score_comparisons(reward, comparisons, batch_size, features=erank)
        result = summarise(kind, comparisons, diffs)
        result.update(
            reward=reward_spec,
            path=path,
            skipped_rows=sum(skipped.values()),
            skipped_rows_by_kind=dict(skipped),
            scoring_seconds=round(seconds, 3),
            pairs_per_second=round(len(comparisons) / seconds, 2) if seconds > 0 else None,
        )
        if feats is not None:
            result["effective_rank"] = effective_rank(feats)
            result["effective_rank_s2"] = effective_rank(feats, power=2)
        if isinstance(reward, GenerativeJudge):
            result["parse_failures"] = reward.parse_failures - before[0]
            result["generated_tokens"] = reward.generated_tokens - before[1]
        results.append(no_nan(result))
        print(json.dumps(results[-1]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "results.md").write_text(markdown(results))
    return results


def no_nan(result: dict) -> dict:
    """NaN (a figure with no usable comparison) as None: null in results.json, never a made-up number."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in result.items()}


def markdown(results: list[dict]) -> str:
    lines = ["| reward | benchmark | file | metric | value |", "| --- | --- | --- | --- | --- |"]
    skip = {"reward", "benchmark", "path"}
    for r in results:
        for key, value in r.items():
            if key in skip:
                continue
            shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {r['reward']} | {r['benchmark']} | {Path(r['path']).name} | {key} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--reward", required=True, help="jrm:PATH, generative:PATH or oracle:SHAPEEDIT_DIR")
    parser.add_argument(
        "--benchmark", action="append", required=True, help=f"KIND:PATH, KIND in {BENCHMARKS}; repeatable"
    )
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="candidates per forward pass (scores do not depend on it)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad rows (any fault: fields, labels, images, instruction) and count them by kind",
    )
    parser.add_argument("--erank", action="store_true", help="effective rank of the score-token features (JRM only)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N good rows of each benchmark")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the reward model runs"
    )
    args = parser.parse_args(argv)
    try:
        evaluate(
            args.reward, args.benchmark, args.out, args.batch_size, args.skip_bad, args.erank, args.limit, args.device
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
