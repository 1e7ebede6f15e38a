"""Compare reward models trained by reward/train.py: is their training reproducible, and do they agree?

For run folders of reward/train.py (config.yaml, metrics.jsonl, eval.json, checkpoint-N/, final/) and a fixed
probe set (a pairs file in the EditReward-Data format, e.g. ShapeEdit's test_iid.json):
- accuracy spread: evaluation accuracy (eval.json) and probe accuracy per run, mean / std / range per group
  of runs that differ only in their seed;
- agreement: Spearman rank correlation of two models' scores over every probe candidate, and the share of
  probe pairs both order the same way;
- drift: the same two numbers between each checkpoint of one run and its final model (how far the scores
  still move late in training).
Pure numbers; launch/compare_runs.py draws them. Spearman lives here so the RL comparison reuses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from reward.config import flatten
from reward.data import DataError, load_image, load_pairs
from reward.model import JRM

# Settings that may differ between runs of one group; any other difference makes a different group.
SEED_SETTINGS = (
    "seed",
    "output_dir",
    "resume",
    "data.shapeedit_seed",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.eval_steps",
    "trainer.logging_steps",
    "trainer.report_to",
    "trainer.disable_tqdm",
    "trainer.dataloader_num_workers",
)


def spearman(x, y) -> float:
    """Rank correlation (average ranks for ties); nan with fewer than 3 points, a constant or a non-finite input."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def on_policy_ranking(gold, scores, gap: float = 0.1) -> dict:
    """How a reward model ranks samples of one policy within each prompt's group, against the oracle's gold.

    Args:
        gold: (P, G) the oracle's scores of G samples of each of P prompts.
        scores: (P, G) the reward model's scores of the same samples.
        gap: pairs count toward `pair_accuracy` when their gold differs by at least this.
    Returns:
        spearman: the mean within-group Spearman correlation over the `groups` whose gold and scores both vary;
        pair_accuracy: the share of within-group pairs (gold gap >= `gap`, `pairs` of them) the scores order as
        the gold does (a tie in score counts half); top1_gain: the mean over prompts of the gold of the sample
        the model ranks first (the mean over samples tied first) minus the group's mean gold.
    """
    gold, scores = np.asarray(gold, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if gold.shape != scores.shape or gold.ndim != 2 or gold.shape[0] < 1 or gold.shape[1] < 2:
        raise ValueError(
            f"gold and scores must both be (P, G) with P >= 1, G >= 2; got {gold.shape} and {scores.shape}"
        )
    if not (np.isfinite(gold).all() and np.isfinite(scores).all()):
        raise ValueError("on_policy_ranking: gold and scores must be finite")
    rho = [spearman(g, s) for g, s in zip(gold, scores)]
    rho = [r for r in rho if not math.isnan(r)]
    i, j = np.triu_indices(gold.shape[1], k=1)
    dg, ds = gold[:, i] - gold[:, j], scores[:, i] - scores[:, j]
    apart = np.abs(dg) >= gap
    right = np.where(ds == 0, 0.5, (np.sign(ds) == np.sign(dg)).astype(np.float64))
    first = scores == scores.max(axis=1, keepdims=True)  # a tie at the top: the mean gold of the tied samples
    top = (gold * first).sum(axis=1) / first.sum(axis=1) - gold.mean(axis=1)
    return {
        "spearman": round(float(np.mean(rho)), 4) if rho else None,
        "groups": len(rho),
        "pair_accuracy": round(float(right[apart].mean()), 4) if apart.any() else None,
        "pairs": int(apart.sum()),
        "top1_gain": round(float(top.mean()), 4),
    }


def setting_value(value) -> str:
    """A config value as compared across runs: paths (also behind `kind:`) resolved from the current folder."""
    if isinstance(value, str) and "/" in value:
        kind, sep, path = value.partition(":") if ":" in value and not value.startswith("/") else ("", "", value)
        return f"{kind}{sep}{Path(path).resolve()}"
    return json.dumps(value, sort_keys=True)


def differing_settings(a: dict, b: dict, may_differ) -> list[str]:
    """Keys of two flattened configs whose values differ, except those for which may_differ(key) is true.
    Shared by this module's and rl/compare.py's checks that runs of one group differ only in their seed."""
    return [
        k for k in sorted(set(a) | set(b)) if not may_differ(k) and setting_value(a.get(k)) != setting_value(b.get(k))
    ]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    if len(values) < len(x):  # ties share their average rank
        ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    return ranks


@dataclass
class RewardRun:
    path: Path
    label: str  # runs with one label differ only in their seed
    config: dict  # flattened config.yaml
    accuracy: float  # final pairwise accuracy on its evaluation pairs (eval.json), nan when it had none
    checkpoints: list[tuple[int, Path]]  # (training step, folder), oldest first; the last is final/


def load_reward_run(path: str | Path, label: str | None = None) -> RewardRun:
    path = Path(path)
    for name in ("config.yaml", "metrics.jsonl", "final"):
        if not (path / name).exists():
            raise DataError(f"{path / name} is missing: not a finished run folder of reward/train.py")
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()))
    if "loss.alpha" not in config or "seed" not in config:
        raise DataError(f"{path / 'config.yaml'} has no loss.alpha or seed: not a config of reward/train.py")
    steps = []
    for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path / 'metrics.jsonl'}:{number} is not a metrics row with a 'step'") from None
    if not steps:
        raise DataError(f"{path / 'metrics.jsonl'} is empty")
    if not (path / "eval.json").is_file():
        raise DataError(f"{path / 'eval.json'} is missing: not a finished run folder of reward/train.py")
    results = json.loads((path / "eval.json").read_text())
    if results and "eval_pairwise_accuracy" not in results:
        raise DataError(f"{path / 'eval.json'} has no eval_pairwise_accuracy")
    accuracy = float(results["eval_pairwise_accuracy"]) if results else math.nan  # {}: trained without evaluation pairs
    found = sorted(
        (int(p.name.removeprefix("checkpoint-")), p)
        for p in path.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
    )
    final_step = max(steps)
    checkpoints = [(s, p) for s, p in found if s < final_step] + [(final_step, path / "final")]
    return RewardRun(path, label or f"alpha={config['loss.alpha']:.3g}", config, accuracy, checkpoints)


@dataclass
class Probe:
    """Fixed candidates to score: each pair's chosen edit, then its rejected one."""

    sources: list[Image.Image]  # 2M
    instructions: list[str]  # 2M
    edited: list[Image.Image]  # 2M; [:M] chosen, [M:] rejected
    pairs: int  # M

    @classmethod
    def load(cls, path: str | Path, num_pairs: int) -> Probe:
        pairs, _ = load_pairs(path)
        pairs = [p for p in pairs if not p.tie][:num_pairs]
        if len(pairs) < 3:
            raise DataError(f"{path} has {len(pairs)} non-tied pairs: a probe set needs at least 3")
        sources = [load_image(p.source, p.where) for p in pairs]
        chosen = [load_image(p.chosen, p.where) for p in pairs]
        rejected = [load_image(p.rejected, p.where) for p in pairs]
        return cls(sources + sources, [p.instruction for p in pairs] * 2, chosen + rejected, len(pairs))


def score_probe(model: JRM, probe: Probe, batch_size: int = 32) -> np.ndarray:
    """(2M,) scores of the probe candidates."""
    return (
        model.score(probe.sources, probe.instructions, probe.edited, batch_size=batch_size).numpy().astype(np.float64)
    )


def probe_accuracy(scores: np.ndarray, pairs: int) -> float:
    return float(np.mean(scores[:pairs] > scores[pairs:]))


def same_order(a: np.ndarray, b: np.ndarray, pairs: int) -> float:
    """Share of probe pairs that two score vectors order the same way."""
    return float(np.mean(np.sign(a[:pairs] - a[pairs:]) == np.sign(b[:pairs] - b[pairs:])))


@dataclass
class Drift:
    """One checkpoint of a run against that run's final model."""

    step: int
    probe_accuracy: float
    spearman_final: float  # rank correlation of its probe scores with the final model's
    same_order_final: float


@dataclass
class RewardGroup:
    """Runs of one label (one setting, several seeds)."""

    label: str
    runs: int
    accuracy_mean: float  # evaluation accuracy (eval.json) over seeds
    accuracy_std: float  # seed-to-seed standard deviation (n-1); nan for one seed
    accuracy_range: float  # max - min
    probe_accuracy_mean: float
    probe_accuracy_std: float
    agreement_within: float  # mean Spearman between the final scores of the group's runs; nan for one run


@dataclass
class RewardComparison:
    runs: list[RewardRun]
    probe_pairs: int  # M
    probe_accuracy: list[float]  # per run, final model
    agreement: np.ndarray  # (R, R) Spearman of final scores
    same_order: np.ndarray  # (R, R) share of probe pairs ordered alike
    drift: list[list[Drift]]  # per run, per checkpoint (the last is final/)
    groups: list[RewardGroup]  # one per label, in first-seen order


def check_groups(runs: list[RewardRun]) -> None:
    """Runs sharing a label must differ only in their seed, or their spread would not be seed-to-seed."""
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        for other in group[1:]:
            differ = differing_settings(group[0].config, other.config, lambda k: k in SEED_SETTINGS)
            if differ:
                raise DataError(
                    f"reward runs labelled {label!r} differ in {differ} ({group[0].path} vs {other.path}): "
                    f"give them different labels (LABEL=RUN_DIR)"
                )


def compare_reward_runs(
    runs: list[RewardRun], probe: Probe, batch_size: int = 32, device: str = "cpu"
) -> RewardComparison:
    if not runs:
        raise DataError("no reward runs to compare")
    check_groups(runs)
    finals, drift = [], []
    for run in runs:
        scores = [score_probe(JRM.from_pretrained(path).to(device), probe, batch_size) for _, path in run.checkpoints]
        finals.append(scores[-1])
        drift.append(
            [
                Drift(
                    step,
                    probe_accuracy(s, probe.pairs),
                    spearman(s, scores[-1]),
                    same_order(s, scores[-1], probe.pairs),
                )
                for (step, _), s in zip(run.checkpoints, scores)
            ]
        )
    n = len(runs)
    agreement = np.array([[spearman(finals[i], finals[j]) for j in range(n)] for i in range(n)])
    order = np.array([[same_order(finals[i], finals[j], probe.pairs) for j in range(n)] for i in range(n)])
    accuracy = [probe_accuracy(s, probe.pairs) for s in finals]
    groups = []
    for label in dict.fromkeys(r.label for r in runs):
        idx = [i for i, r in enumerate(runs) if r.label == label]
        acc = [runs[i].accuracy for i in idx]
        probe_acc = [accuracy[i] for i in idx]
        groups.append(
            RewardGroup(
                label=label,
                runs=len(idx),
                accuracy_mean=float(np.mean(acc)),
                accuracy_std=float(np.std(acc, ddof=1)) if len(idx) > 1 else math.nan,
                accuracy_range=float(np.max(acc) - np.min(acc)),
                probe_accuracy_mean=float(np.mean(probe_acc)),
                probe_accuracy_std=float(np.std(probe_acc, ddof=1)) if len(idx) > 1 else math.nan,
                agreement_within=float(np.mean([agreement[i, j] for i in idx for j in idx if i < j]))
                if len(idx) > 1
                else math.nan,
            )
        )
    return RewardComparison(runs, probe.pairs, accuracy, agreement, order, drift, groups)
