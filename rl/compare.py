"""Compare RL runs: curves across seeds, seed-to-seed spread, and a reward-hacking signal per run.

Reads the run folders `launch/grpo_edit.py` writes (config.yaml, metrics.jsonl, eval/scores-step-N.json,
checkpoints/), finished or still running, of any lengths; a folder missing the per-prompt scores of a logged
evaluation is refused. Pure numbers: the figures and the report are drawn by launch/compare_runs.py.

Reward hacking, as measured here (on the evaluation rows: fixed held-out prompts, ODE sampling). Let b be
the evaluation with the best gold score and k a later one; k *hacks* when, since b, both
    the gold score fell:   G_b - G_k > tol_G      and      the proxy rose:   P_k - P_b > tol_P.
Every evaluation scores the same prompts with the same noise, so the runs write each prompt's scores
(eval/scores-step-N.json) and the tolerances are paired: tol = 3 * sd_i(x_k,i - x_b,i) / sqrt(n) over the
n prompts i, the standard error of the per-prompt change. Three standard errors, not two, because b is the
best of many noisy evaluations; the false-positive and detection rates of the rule are measured by
simulation (`hacking_rates`, written to docs/results/hacking_rates.json by launch/hacking_rates.py).
Verdicts, in this order:
  no gold    the run logged no eval/gold_score (reward.gold unset);
  too few prompts   one prompt per evaluation: the per-prompt change has no measurable noise;
  too short  fewer than 3 evaluations;
  hacking    the last evaluation hacks (onset: first evaluation of the unbroken hacking stretch to the end);
  collapsed  gold and proxy both fell since b beyond tolerance (the policy broke; the reward was not fooled);
  improved / degraded   the last gold score is above / below the first beyond tolerance;
  flat       none of these.
`agreement` is the Spearman correlation of proxy and gold across all evaluations (1: the proxy tracks gold).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from reward.compare import differing_settings, setting_value, spearman
from reward.config import flatten
from rl import checkpoint

# Curves shown for every comparison; a run folder without the per-step ones is not an RL run of ours.
STEP_KEYS = ("rollout/reward_mean", "rollout/reward_std", "rollout/zero_std_ratio", "train/approx_kl", "train/clipfrac")
EVAL_KEYS = ("eval/reward_mean", "eval/gold_score")  # must be finite (their standard errors may be nan: one prompt)
# Settings that define what the evaluation numbers mean: runs compared side by side must share them.
EVAL_SETTINGS = (
    "reward.gold",
    "data.eval_prompts",
    "data.num_eval",
    "policy.eval_denoising_steps",
    "policy.eval_samples",
    "policy.height",
    "policy.width",
)
# Settings that may differ between seeds of one group (everything else must match within a group).
SEED_SETTINGS = (
    "seed",
    "output_dir",
    "resume",
    "num_rl_steps",
    "save_every",
    "keep_checkpoints",
    "wandb",
    "wandb_project",
    "max_bad_steps",
)
TOLERANCE_SEMS = 3.0  # see the module docstring


class CompareError(ValueError):
    """Runs that can't be read or can't be compared; the message names the file, run or setting."""


@dataclass
class Run:
    path: Path
    label: str  # the group this run belongs to (one reward model, several seeds)
    config: dict  # flattened resolved config: {"reward.gold": ..., "algo.lr": ...}
    rows: dict[int, dict]  # step -> every metric logged at that step
    last_checkpoint: int | None  # step of the newest complete checkpoint

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def planned_steps(self) -> int:
        return self.config["num_rl_steps"]

    @property
    def last_step(self) -> int:
        return max(self.rows)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric, in step order, at the steps that logged it."""
        steps = [s for s in sorted(self.rows) if key in self.rows[s]]
        return np.array(steps, dtype=np.int64), np.array([self.rows[s][key] for s in steps], dtype=np.float64)


def default_label(config: dict) -> str:
    """The reward the run optimised: `kind:folder` per term (a trained model's folder, not its final/)."""
    names = []
    for term in config["reward.terms"]:
        kind, _, path = term["spec"].partition(":")
        where = Path(path)
        if where.name == "final" or where.name.startswith("checkpoint-"):
            where = where.parent
        weight = "" if term["weight"] == 1.0 else f"*{term['weight']:g}"
        names.append(f"{kind}:{where.name}{weight}" if path else kind)
    return "+".join(names)


def read_metrics(path: Path) -> dict[int, dict]:
    """metrics.jsonl -> {step: every metric of that step}. A torn last line (a run writing or killed) is ignored.

    A step's training row and evaluation row are merged; a metric logged twice for one step means the file
    mixes two runs (the logger truncates on resume), and is refused, as is a non-finite evaluation value.
    """
    if not path.is_file():
        raise CompareError(f"{path} is missing: not a run folder of launch/grpo_edit.py")
    lines = path.read_text().splitlines()
    rows: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise CompareError(f"{path}:{number} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise CompareError(f"{path}:{number} has no integer 'step'")
        merged = rows.setdefault(row["step"], {})
        for key, value in row.items():
            if key == "step":
                continue
            if key in merged:
                raise CompareError(
                    f"{path}:{number} logs {key} for step {row['step']} a second time: the file mixes two runs"
                )
            if key in EVAL_KEYS and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise CompareError(
                    f"{path}:{number} has {key}={value!r} at step {row['step']}: evaluations must be finite"
                )
            merged[key] = value
    if not rows:
        raise CompareError(f"{path} has no metrics yet")
    return rows


def load_run(path: str | Path, label: str | None = None) -> Run:
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CompareError(f"{config_file} is missing: not a run folder of launch/grpo_edit.py")
    config = flatten(yaml.safe_load(config_file.read_text()))
    for key in ("seed", "num_rl_steps", "reward.terms", *EVAL_SETTINGS):
        if key not in config:
            raise CompareError(f"{config_file} has no {key!r}: not a config written by launch/grpo_edit.py")
    rows = read_metrics(path / "metrics.jsonl")
    evaluations = sorted(step for step, row in rows.items() if "eval/reward_mean" in row)
    if not evaluations:
        raise CompareError(
            f"{path / 'metrics.jsonl'} never logged eval/reward_mean: not metrics of launch/grpo_edit.py"
        )
    for step in evaluations:  # the run writes an evaluation's per-prompt scores before its metrics row
        if not scores_file(path, step).is_file():
            raise CompareError(
                f"{scores_file(path, step)} is missing (metrics.jsonl logged an evaluation at step {step}): not a "
                f"run folder written by launch/grpo_edit.py"
            )
    found = checkpoint.complete_checkpoints(path)
    last = int(found[-1].name.removeprefix(checkpoint.PREFIX)) if found else None
    return Run(path, label or default_label(config), config, rows, last)


def check_comparable(runs: list[Run]) -> None:
    """Refuse comparisons whose numbers mean different things, naming the runs and settings."""
    if not runs:
        raise CompareError("no runs to compare")
    for key in EVAL_SETTINGS:
        values = {setting_value(r.config[key]) for r in runs}
        if len(values) > 1:
            detail = "; ".join(f"{r.path}: {r.config[key]!r}" for r in runs)
            raise CompareError(
                f"runs evaluate differently ({key} differs: {detail}): their eval metrics can't be compared"
            )
    with_gold = [r for r in runs if any("eval/gold_score" in row for row in r.rows.values())]
    if with_gold and len(with_gold) != len(runs):
        without = [str(r.path) for r in runs if r not in with_gold]
        raise CompareError(
            f"runs {without} logged no eval/gold_score while the others did (same reward.gold, different metrics): "
            f"compare them in separate reports"
        )
    # A run that only evaluated step 0 has no training rows yet. Runs of one algorithm log the same keys (NFT has no
    # ratio, so no approx_kl or clipfrac): a key missing from some of them means another jrm-edit version.
    trained = [r for r in runs if r.last_step > 0]
    for algorithm in sorted({str(r.config.get("algo.name", "grpo")) for r in trained}):
        same = [r for r in trained if str(r.config.get("algo.name", "grpo")) == algorithm]
        for key in STEP_KEYS:
            has = [any(key in row for row in r.rows.values()) for r in same]
            if any(has) and not all(has):
                without = [str(r.path) for r, h in zip(same, has) if not h]
                raise CompareError(
                    f"runs {without} never logged {key} while the other {algorithm} runs did: compare runs of one "
                    "jrm-edit version, or in separate reports"
                )
    for label in sorted({r.label for r in runs}):
        group = [r for r in runs if r.label == label]
        first = group[0]
        for other in group[1:]:
            differ = differing_settings(
                first.config, other.config, lambda k: k in SEED_SETTINGS or k.startswith("cluster.")
            )
            if differ:
                raise CompareError(
                    f"runs labelled {label!r} differ in {differ} ({first.path} vs {other.path}), so their spread "
                    f"would not be seed-to-seed: give them different labels (LABEL=RUN_DIR)"
                )


@dataclass
class Signal:
    """The hacking signal of one run (see the module docstring)."""

    verdict: str  # no gold | too few prompts | too short | hacking | collapsed | improved | degraded | flat
    tolerance: str = ""  # how the tolerances were computed: "3 paired standard errors (per prompt)"
    best_step: int | None = None  # evaluation with the best gold score
    gold_drop: float = math.nan  # G_best - G_last
    proxy_rise: float = math.nan  # P_last - P_best
    onset: int | None = None  # first step of the hacking stretch that reaches the last evaluation
    agreement: float = math.nan  # Spearman(proxy, gold) across evaluations


def hacking_signal(
    steps: np.ndarray,
    proxy: np.ndarray,
    gold: np.ndarray,
    proxy_rows: np.ndarray,
    gold_rows: np.ndarray,
) -> Signal:
    """Classify one run from its evaluations.

    Args:
        steps, proxy, gold: (E,) evaluation steps, mean proxy reward and mean gold score, all finite.
        proxy_rows, gold_rows: (E, N) every evaluation's per-prompt scores (the same N prompts each time):
            the tolerances are standard errors of the paired per-prompt differences.
    """
    if len(gold) == 0:
        return Signal("no gold")
    if gold_rows.shape[1] < 2:
        return Signal("too few prompts")
    source = f"{TOLERANCE_SEMS:g} paired standard errors (per prompt)"
    if len(gold) < 3:
        return Signal("too short", source)

    def tol_gold(i: int, j: int) -> float:
        return TOLERANCE_SEMS * paired_sem(gold_rows[i], gold_rows[j])

    def tol_proxy(i: int, j: int) -> float:
        return TOLERANCE_SEMS * paired_sem(proxy_rows[i], proxy_rows[j])

    b, last = int(np.argmax(gold)), len(gold) - 1

    def hacks(k: int) -> bool:
        return gold[b] - gold[k] > tol_gold(b, k) and proxy[k] - proxy[b] > tol_proxy(b, k)

    signal = Signal(
        "flat",
        source,
        int(steps[b]),
        float(gold[b] - gold[last]),
        float(proxy[last] - proxy[b]),
        agreement=spearman(proxy, gold),
    )
    if hacks(last):
        first = last
        while first - 1 > b and hacks(first - 1):
            first -= 1
        signal.verdict, signal.onset = "hacking", int(steps[first])
    elif gold[b] - gold[last] > tol_gold(b, last) and proxy[b] - proxy[last] > tol_proxy(b, last):
        signal.verdict = "collapsed"
    elif gold[last] - gold[0] > tol_gold(0, last):
        signal.verdict = "improved"
    elif gold[0] - gold[last] > tol_gold(0, last):
        signal.verdict = "degraded"
    return signal


def paired_sem(before: np.ndarray, after: np.ndarray) -> float:
    """Standard error of the mean per-prompt change after - before ((N,) each, N >= 2)."""
    return float(np.std(after - before, ddof=1) / math.sqrt(len(after)))


def paired_difference(
    before: np.ndarray, after: np.ndarray, *, resamples: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean per-prompt change after - before ((N,) each, the same prompts, N >= 2) and its 95% bootstrap interval
    over prompts: (mean, low, high)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1 or len(before) < 2:
        raise ValueError(
            f"paired_difference needs two (N,) arrays of the same prompts, N >= 2; got {before.shape}, {after.shape}"
        )
    if not (np.isfinite(before).all() and np.isfinite(after).all()):
        raise ValueError("paired_difference: the scores must be finite")
    diff = after - before
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


@dataclass
class PromptScores:
    """One evaluation's scores per prompt (eval/scores-step-N.json of launch/grpo_edit.py)."""

    instructions: list[str]
    proxy: np.ndarray  # (N,) total reward of each prompt's edit
    gold: np.ndarray | None  # (N,) gold score, when reward.gold is set


def scores_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"scores-step-{step:06d}.json"


def read_prompt_scores(path: Path) -> PromptScores:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: not readable JSON ({e})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("instructions"), list)
        or not isinstance(data.get("proxy"), list)
    ):
        raise CompareError(f"{path}: expected an object with 'instructions' and 'proxy' lists")
    proxy = np.asarray(data["proxy"], dtype=np.float64)
    gold = None if data.get("gold") is None else np.asarray(data["gold"], dtype=np.float64)
    n = len(data["instructions"])
    if len(proxy) != n or (gold is not None and len(gold) != n):
        raise CompareError(
            f"{path}: {n} instructions but {len(proxy)} proxy and {None if gold is None else len(gold)} gold scores"
        )
    if not np.isfinite(proxy).all() or (gold is not None and not np.isfinite(gold).all()):
        raise CompareError(f"{path}: per-prompt scores must be finite")
    return PromptScores(data["instructions"], proxy, gold)


def prompt_matrix(run: Run, steps: list[int], key: str) -> np.ndarray:
    """(len(steps), N) per-prompt `key` ("proxy" or "gold") of a run's evaluations (steps: at least one).
    Evaluations of one run must score the same prompts in one order."""
    rows, instructions = [], None
    for step in steps:
        path = scores_file(run.path, step)
        scores = read_prompt_scores(path)
        if instructions is None:
            instructions = scores.instructions
        elif scores.instructions != instructions:
            raise CompareError(
                f"{path} scores other prompts than the run's first evaluation: per-prompt pairing is impossible"
            )
        values = getattr(scores, key)
        if values is None:
            raise CompareError(
                f"{path} has no {key} scores while {run.path / 'metrics.jsonl'} logged eval/gold_score at step {step}"
            )
        rows.append(values)
    return np.stack(rows)


def run_signal(run: Run) -> Signal:
    steps, gold = run.series("eval/gold_score")
    if len(steps) == 0:
        return Signal("no gold")
    proxy = np.array([run.rows[s]["eval/reward_mean"] for s in steps])
    listed = steps.tolist()
    return hacking_signal(steps, proxy, gold, prompt_matrix(run, listed, "proxy"), prompt_matrix(run, listed, "gold"))


@dataclass
class Difference:
    """Final gold of reward model A minus B, with a bootstrap interval over seeds and prompts."""

    labels: tuple[str, str]
    step: int  # the common evaluation step compared
    mean: float
    ci_low: float  # 95% percentile interval
    ci_high: float
    seeds: tuple[int, int]
    prompts: int  # held-out prompts every run scored at that step
    seeds_to_resolve: int | None  # seeds per model at which the interval would exclude 0 at the measured variance;
    #   0: resolved now; None: more seeds alone would not (the prompt noise is larger than the difference)
    hacking_rate: tuple[float, float]  # share of each model's runs whose verdict is hacking
    hacking_diff_ci: tuple[float, float]  # 95% interval of rate A - rate B (bootstrap over seeds)

    @property
    def resolved(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def sentence(self) -> str:
        a, b = self.labels
        interval = f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}]"
        if self.resolved:
            better, worse = (a, b) if self.mean > 0 else (b, a)
            return (
                f"{better} > {worse} by {abs(self.mean):.3f} gold at step {self.step} ({a} - {b}: {self.mean:+.3f} "
                f"{interval}, 95%, {self.seeds[0]}+{self.seeds[1]} seeds)."
            )
        more = (
            f"about {self.seeds_to_resolve} seeds per reward model would resolve it at the measured variance"
            if self.seeds_to_resolve
            else "more seeds alone would not resolve it (the prompt-to-prompt noise is larger than the difference)"
        )
        return (
            f"No difference resolved between {a} and {b} at step {self.step}: {self.mean:+.3f} {interval} (95%, "
            f"{self.seeds[0]}+{self.seeds[1]} seeds); {more}."
        )


def gold_difference(
    runs_a: list[Run],
    runs_b: list[Run],
    signals: dict[Path, Signal] | None = None,
    resamples: int = 4000,
    seed: int = 0,
) -> Difference:
    """Gold of group A minus group B at their last common evaluation step.

    From each run's per-prompt gold scores at that step (every run must have scored the same prompts), a
    bootstrap resamples the seeds of each group and, paired across both, the prompts. The seeds needed to
    resolve the difference come from splitting the variance into a seed part (shrinks with more seeds) and a
    prompt part (does not).
    """
    runs = runs_a + runs_b
    if len(runs_a) < 2 or len(runs_b) < 2:
        raise CompareError(
            f"a difference with an interval needs >= 2 seeds per reward model; got {len(runs_a)} and {len(runs_b)}"
        )
    step = common_eval_step(runs)
    rng = np.random.default_rng(seed)
    files = [scores_file(r.path, step) for r in runs]
    scores = [read_prompt_scores(f) for f in files]
    for f, s in zip(files, scores):
        if s.gold is None:
            raise CompareError(f"{f} has no gold scores: reward models are compared on gold")
        if s.instructions != scores[0].instructions:
            raise CompareError(f"{f} scores other prompts than {files[0]}: reward models compared on different prompts")
    a = np.stack([s.gold for s in scores[: len(runs_a)]])  # (Sa, N)
    b = np.stack([s.gold for s in scores[len(runs_a) :]])
    prompts = a.shape[1]
    mean = float(a.mean() - b.mean())

    def resample(seeds: bool, prompt: bool) -> np.ndarray:
        out = np.empty(resamples)
        for i in range(resamples):
            ia = rng.integers(len(a), size=len(a)) if seeds else np.arange(len(a))
            ib = rng.integers(len(b), size=len(b)) if seeds else np.arange(len(b))
            p = rng.integers(a.shape[1], size=a.shape[1]) if prompt else np.arange(a.shape[1])
            out[i] = a[np.ix_(ia, p)].mean() - b[np.ix_(ib, p)].mean()
        return out

    both = resample(seeds=True, prompt=prompts > 1)
    low, high = (float(x) for x in np.percentile(both, [2.5, 97.5]))
    seed_var = float(np.var(a.mean(1), ddof=1) + np.var(b.mean(1), ddof=1))
    prompt_var = float(np.var(resample(seeds=False, prompt=True))) if prompts > 1 else 0.0
    if low > 0 or high < 0:
        needed = 0
    elif abs(mean) <= 1.96 * math.sqrt(prompt_var) or mean == 0:
        needed = None
    else:  # 1.96 sqrt(seed_var / n + prompt_var) < |mean|
        needed = math.ceil(seed_var / ((mean / 1.96) ** 2 - prompt_var))
    signals = signals or {r.path: run_signal(r) for r in runs}
    flags_a = np.array([signals[r.path].verdict == "hacking" for r in runs_a], dtype=float)
    flags_b = np.array([signals[r.path].verdict == "hacking" for r in runs_b], dtype=float)
    rate_diffs = [
        flags_a[rng.integers(len(flags_a), size=len(flags_a))].mean()
        - flags_b[rng.integers(len(flags_b), size=len(flags_b))].mean()
        for _ in range(resamples)
    ]
    h_low, h_high = (float(x) for x in np.percentile(rate_diffs, [2.5, 97.5]))
    return Difference(
        (runs_a[0].label, runs_b[0].label),
        step,
        mean,
        low,
        high,
        (len(runs_a), len(runs_b)),
        prompts,
        needed,
        (float(flags_a.mean()), float(flags_b.mean())),
        (h_low, h_high),
    )


def hacking_rates(
    evaluations: int,
    prompts: int,
    gold_drop: float,
    runs: int = 400,
    jitter: float = 0.05,
    prompt_spread: float = 0.2,
    seed: int = 0,
) -> float:
    """Share of simulated runs the hacking rule flags (the false-positive rate at gold_drop = 0).

    Each simulated run: `prompts` prompts with base gold scores spread by `prompt_spread`, fixed for the
    run; each evaluation adds to every prompt an independent change of sd `jitter` (the policy's weights
    moved) to gold and proxy alike; the proxy's mean rises steadily by 0.1 over the run; gold is flat, or
    falls linearly by `gold_drop` over the second half.
    """
    rng = np.random.default_rng(seed)
    steps = np.arange(evaluations)
    half = evaluations // 2
    trend = np.where(steps > half, (steps - half) / max(evaluations - 1 - half, 1), 0.0) * -gold_drop
    flagged = 0
    for _ in range(runs):
        base_gold = rng.uniform(0.5 - prompt_spread, 0.5 + prompt_spread, prompts)
        base_proxy = base_gold + rng.normal(0, prompt_spread / 2, prompts)
        gold_rows = base_gold[None] + trend[:, None] + rng.normal(0, jitter, (evaluations, prompts))
        proxy_rows = (
            base_proxy[None]
            + (0.1 * steps / (evaluations - 1))[:, None]
            + rng.normal(0, jitter, (evaluations, prompts))
        )
        signal = hacking_signal(steps, proxy_rows.mean(1), gold_rows.mean(1), proxy_rows, gold_rows)
        flagged += signal.verdict == "hacking"
    return flagged / runs


@dataclass
class Band:
    """One metric of one group across its seeds, at every step some seed logged it."""

    steps: np.ndarray  # (S,)
    mean: np.ndarray  # (S,)
    low: np.ndarray  # (S,) minimum across seeds
    high: np.ndarray  # (S,) maximum across seeds
    count: np.ndarray  # (S,) seeds that logged this step


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` logged points (the first points average what exists)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def band(runs: list[Run], key: str, window: int = 1, relative: bool = False) -> Band:
    """relative: each run's values minus its first one (reward models have their own offsets; curves then
    start together, though their units still differ)."""
    per_run = {}
    for run in runs:
        steps, values = run.series(key)
        if relative and len(values):
            values = values - values[0]
        per_run[run.path] = dict(zip(steps.tolist(), smooth(values, window).tolist()))
    steps = sorted(set().union(*per_run.values()))
    table = [[v[s] for v in per_run.values() if s in v] for s in steps]
    return Band(
        np.array(steps, dtype=np.int64),
        np.array([np.mean(t) for t in table]),
        np.array([np.min(t) for t in table]),
        np.array([np.max(t) for t in table]),
        np.array([len(t) for t in table]),
    )


def seed_std(values: list[float]) -> float:
    """Seed-to-seed standard deviation (n-1); nan for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def common_eval_step(runs: list[Run]) -> int:
    """The last evaluation step every run reached: where runs of different lengths are compared."""
    shared = set.intersection(*(set(r.series("eval/reward_mean")[0].tolist()) for r in runs))
    if not shared:
        raise CompareError(
            "the runs share no evaluation step: compare runs whose eval_every divide a common step, or in separate "
            "reports"
        )
    return max(shared)


@dataclass
class GroupSummary:
    label: str
    runs: int
    steps: str  # "done/planned" range over seeds
    at_step: int  # the common evaluation step the *_at numbers are taken at
    gold_start: float
    gold_at: float
    gold_at_std: float  # seed-to-seed spread at the common step
    gold_best: float  # mean over seeds of the best gold up to the common step
    proxy_start: float
    proxy_at: float
    proxy_at_std: float
    gold_curve_std: float  # mean over the group's shared evaluations <= at_step of the seed-to-seed std of gold
    verdicts: dict[str, int] = field(default_factory=dict)  # whole runs
    onsets: list[int] = field(default_factory=list)  # whole runs
    agreement: float = math.nan  # whole runs, mean over seeds
    kl: float = math.nan  # mean train/approx_kl over steps <= at_step and seeds (so are the next three)
    clipfrac: float = math.nan
    reward_std: float = math.nan
    zero_std_ratio: float = math.nan


def _at(run: Run, key: str, step: int) -> float:
    return float(run.rows[step][key]) if key in run.rows.get(step, {}) else math.nan


def _mean_of(runs: list[Run], key: str, up_to: int) -> float:
    """Mean of a per-step metric over every step <= up_to of every run."""
    values = np.concatenate([v[s <= up_to] for s, v in (r.series(key) for r in runs)])
    return float(values.mean()) if len(values) else math.nan


def summarise(runs: list[Run]) -> tuple[list[GroupSummary], dict[Path, Signal]]:
    """One summary per label (in first-seen order) and the signal of every run."""
    check_comparable(runs)
    at = common_eval_step(runs)
    signals = {r.path: run_signal(r) for r in runs}
    summaries = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        first_eval = [int(r.series("eval/reward_mean")[0][0]) for r in group]
        shared = sorted(
            s for s in set.intersection(*(set(r.series("eval/gold_score")[0].tolist()) for r in group)) if s <= at
        )
        curve_std = [seed_std([_at(r, "eval/gold_score", s) for r in group]) for s in shared]
        best = []
        for r in group:
            steps, gold = r.series("eval/gold_score")
            best.append(float(gold[steps <= at].max()) if len(steps) else math.nan)
        verdicts: dict[str, int] = {}
        for r in group:
            verdicts[signals[r.path].verdict] = verdicts.get(signals[r.path].verdict, 0) + 1
        done = sorted({f"{r.last_step}/{r.planned_steps}" for r in group})
        summaries.append(
            GroupSummary(
                label=label,
                runs=len(group),
                steps=", ".join(done),
                at_step=at,
                gold_start=float(np.mean([_at(r, "eval/gold_score", s) for r, s in zip(group, first_eval)])),
                gold_at=float(np.mean([_at(r, "eval/gold_score", at) for r in group])),
                gold_at_std=seed_std([_at(r, "eval/gold_score", at) for r in group]),
                gold_best=float(np.mean(best)),
                proxy_start=float(np.mean([_at(r, "eval/reward_mean", s) for r, s in zip(group, first_eval)])),
                proxy_at=float(np.mean([_at(r, "eval/reward_mean", at) for r in group])),
                proxy_at_std=seed_std([_at(r, "eval/reward_mean", at) for r in group]),
                gold_curve_std=float(np.mean(curve_std)) if curve_std and len(group) > 1 else math.nan,
                verdicts=verdicts,
                onsets=sorted(signals[r.path].onset for r in group if signals[r.path].onset is not None),
                agreement=float(np.nanmean([signals[r.path].agreement for r in group]))
                if any(not math.isnan(signals[r.path].agreement) for r in group)
                else math.nan,
                kl=_mean_of(group, "train/approx_kl", at),
                clipfrac=_mean_of(group, "train/clipfrac", at),
                reward_std=_mean_of(group, "rollout/reward_std", at),
                zero_std_ratio=_mean_of(group, "rollout/zero_std_ratio", at),
            )
        )
    return summaries, signals
