"""Sample a ShapeEdit policy and label its samples with the oracle: reward data on the policy's own edits.

    python launch/policy_pairs.py --policy assets/shapeedit_policy --data runs/demo/data [--split train]
        [--prompts 1000] [--samples 4] [--seed 0] [--overwrite]

writes every pair of distinct samples (RL's sampler), judged and critiqued (reward/shapeedit/samples.py), to
DATA/policy_{split}.json for reward/train.py's data.mix; `on_policy` measures reward models on fresh samples of
evaluation prompts (launch/demo.py). docs/reward.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/policy_pairs.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from launch.pretrain_policy import load_eval_prompts
from policies.images import tensor_to_images
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy
from reward.compare import on_policy_ranking
from reward.config import HelpFormatter, load_config
from reward.evaluate import load_reward, parse_reward_spec
from reward.shapeedit import SPLITS
from reward.shapeedit.samples import label_samples
from rl.config import RLConfig

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "launch" / "configs" / "shapeedit.yaml"


def preset_sampler() -> SamplerConfig:
    """The sampler of RL's ShapeEdit preset: the distribution of edits the reward model scores in GRPO."""
    return load_config(RLConfig, PRESET, []).policy.sampler


@torch.no_grad()
def sample_groups(
    policy: ShapeEditPolicy, prompts: list[dict], samples: int, sampler: SamplerConfig, seed: int, batch_size: int = 64
) -> list[list]:
    """`samples` edits (PIL images) of each prompt ({"source", "instruction"}), from seed `seed`."""
    generator = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(samples)]
    images = []
    for start in range(0, len(repeated), batch_size):
        chunk = repeated[start : start + batch_size]
        rollout = policy.sample([p["source"] for p in chunk], [p["instruction"] for p in chunk], sampler, generator)
        images += tensor_to_images(rollout.edited_images)
    return [images[i : i + samples] for i in range(0, len(images), samples)]


def check_request(policy_dir: Path, data_dir: Path, split: str, prompts: int, samples: int) -> None:
    """Refuse what cannot be sampled and judged, before any model loads: the split, the counts, the folders, and a
    policy that edits at another size than the data's renders (the oracle judges against them)."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if prompts < 1 or samples < 2:
        raise ValueError(f"need --prompts >= 1 and --samples >= 2, got {prompts} and {samples}")
    if not (data_dir / f"{split}_prompts.json").is_file():
        raise FileNotFoundError(f"{data_dir / f'{split}_prompts.json'} not found: pass a ShapeEdit data folder")
    if not (policy_dir / "policy.json").is_file():
        raise FileNotFoundError(f"{policy_dir / 'policy.json'} not found: pass a ShapeEdit policy folder")
    size = json.loads((policy_dir / "policy.json").read_text())["config"]["image_size"]
    data_size = json.loads((data_dir / "meta.json").read_text())["config"]["size"]
    if size != data_size:
        raise ValueError(f"the policy edits {size} px images, the data's renders are {data_size} px")


def write_policy_pairs(
    policy_dir: Path,
    data_dir: Path,
    split: str,
    prompts: int,
    samples: int,
    seed: int,
    sampler: SamplerConfig | None = None,
    overwrite: bool = False,
    min_gap: float = 0.0,
) -> dict:
    """Write DATA/policy_{split}.json (see the module docstring) from samples drawn with `sampler` (default: RL's
    preset's); returns its counts, also printed."""
    check_request(policy_dir, data_dir, split, prompts, samples)
    path, images = data_dir / f"policy_{split}.json", data_dir / "images" / f"policy_{split}"
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: pass --overwrite to replace it (and its images)")
    shutil.rmtree(images, ignore_errors=True)  # no image of an earlier run stays behind
    rows = json.loads((data_dir / f"{split}_prompts.json").read_text())[:prompts]
    policy = ShapeEditPolicy.from_pretrained(policy_dir)
    loaded = load_eval_prompts(data_dir, split, prompts, policy.height)
    start = time.perf_counter()
    groups = sample_groups(policy, loaded, samples, sampler or preset_sampler(), seed)
    pairs, gold = [], []
    for k, (row, images) in enumerate(zip(rows, groups)):
        stem = f"images/policy_{split}/{k:06d}"
        labelled, judgements = label_samples(row, images, data_dir, stem, split, min_gap=min_gap)
        pairs += labelled
        gold.append([j.overall for j in judgements])
    path.write_text(json.dumps(pairs, indent=1, sort_keys=True) + "\n")
    gold = np.array(gold)
    counts = {
        "file": str(path),
        "prompts": len(rows),
        "samples": samples,
        "pairs": len(pairs),
        "ties": sum(r["tie_case"] for r in pairs),
        "gold": round(float(gold.mean()), 4),
        "group_gold_std": round(float(gold.std(axis=1).mean()), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(counts), flush=True)
    return counts


def on_policy(
    policy_dir: Path,
    data_dir: Path,
    rewards: dict[str, str],
    splits: tuple[str, ...],
    prompts: int,
    group_size: int,
    seed: int,
    sampler: SamplerConfig | None = None,
) -> dict[str, dict]:
    """Each reward model (label -> `reward.evaluate.load_reward` spec) on fresh samples of the policy, per split of
    `splits`: `group_size` edits of each of its first `prompts` prompts, with `sampler` (default: RL's preset's),
    scored and compared with the oracle within each group (`reward.compare.on_policy_ranking`). Also the groups' gold
    spread, the share of groups whose edits are one image, and the oracle's own best-of-group gain. The policy and
    each reward model load once for every split."""
    from reward.shapeedit import judge_image

    for split in splits:
        check_request(policy_dir, data_dir, split, prompts, group_size)
    policy = ShapeEditPolicy.from_pretrained(policy_dir)
    drawn, results = {}, {}
    for split in splits:
        loaded = load_eval_prompts(data_dir, split, prompts, policy.height)
        groups = sample_groups(policy, loaded, group_size, sampler or preset_sampler(), seed)
        gold = np.array([[judge_image(p["scene"], p["edits"], im).overall for im in g] for p, g in zip(loaded, groups)])
        identical = np.mean([all(np.array_equal(np.asarray(a), np.asarray(g[0])) for a in g) for g in groups])
        drawn[split] = (loaded, groups, gold)
        results[split] = {
            "split": split,
            "prompts": len(loaded),
            "group_size": group_size,
            "identical_groups": round(float(identical), 4),
            "gold_spread": round(float(gold.std(axis=1).mean()), 4),
            "oracle_top1_gain": round(float((gold.max(axis=1) - gold.mean(axis=1)).mean()), 4),
            "models": {},
        }
    for label, spec in rewards.items():
        model = load_reward(spec)
        for split, (loaded, groups, gold) in drawn.items():
            sources = [p["source"] for p in loaded for _ in range(group_size)]
            instructions = [p["instruction"] for p in loaded for _ in range(group_size)]
            edits = [im for g in groups for im in g]
            scores = torch.cat(
                [
                    model.score(sources[i : i + 64], instructions[i : i + 64], edits[i : i + 64])
                    for i in range(0, len(edits), 64)
                ]
            )
            results[split]["models"][label] = on_policy_ranking(gold, scores.float().numpy().reshape(gold.shape))
    return results


def measure_markdown(result: dict) -> str:
    """The table docs/results.md shows for a `--measure` JSON: each reward model on each split."""
    lines = [
        "| reward model | split | Spearman | groups | pair accuracy (gold gap >= 0.1) | pairs | top-1 gain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for split in ("val", "test_heldout"):
        for name, m in result[split]["models"].items():
            rho = "–" if m["spearman"] is None else f"{m['spearman']:+.3f}"
            acc = "–" if m["pair_accuracy"] is None else f"{m['pair_accuracy']:.1%}"
            lines.append(f"| {name} | {split} | {rho} | {m['groups']} | {acc} | {m['pairs']} | {m['top1_gain']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--policy", required=True, help="a ShapeEdit policy folder (save_pretrained)")
    parser.add_argument("--data", required=True, help="a ShapeEdit data folder (python -m reward.shapeedit generate)")
    parser.add_argument("--split", default="train", help="whose prompts to sample (train: reward data)")
    parser.add_argument("--prompts", type=int, default=1000, help="the first N prompts of the split")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (every pair of them is written)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing policy_{split}.json")
    parser.add_argument(
        "--min-gap",
        type=float,
        default=0.0,
        help="leave out pairs whose oracle scores differ by less (0: every pair, near-ties marked by the tie rule)",
    )
    parser.add_argument(
        "--measure",
        default=None,
        metavar="JSON",
        help="instead of writing pairs: measure each --reward on fresh samples (--samples per prompt, at least 2) "
        "of --prompts val and test_heldout prompts, and write the figures to JSON (default: no measurement)",
    )
    parser.add_argument(
        "--reward", action="append", default=[], metavar="NAME=SPEC", help="with --measure: a reward model (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        if args.measure is None:
            write_policy_pairs(
                Path(args.policy),
                Path(args.data),
                args.split,
                args.prompts,
                args.samples,
                args.seed,
                overwrite=args.overwrite,
                min_gap=args.min_gap,
            )
            return 0
        rewards = dict(r.split("=", 1) for r in args.reward if "=" in r)
        if not rewards or len(rewards) != len(args.reward):
            raise ValueError(f"--measure needs --reward NAME=SPEC (at least one), got {args.reward}")
        for name, spec in rewards.items():
            parse_reward_spec(spec, f"--reward {name}")
        result = {
            "command": "python launch/policy_pairs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **on_policy(
                Path(args.policy),
                Path(args.data),
                rewards,
                ("val", "test_heldout"),
                args.prompts,
                args.samples,
                args.seed,
            ),
        }
        Path(args.measure).parent.mkdir(parents=True, exist_ok=True)
        Path(args.measure).write_text(json.dumps(result, indent=1) + "\n")
        for split in ("val", "test_heldout"):
            for name, m in result[split]["models"].items():
                print(f"{split} {name}: {json.dumps(m)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
