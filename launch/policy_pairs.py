"""Sample a ShapeEdit policy, label its samples with the oracle: reward data on the policy's own edits, and how
well reward models rank them.

    python launch/policy_pairs.py --policy assets/shapeedit_policy --data runs/demo/data [--split train]
        [--prompts 1000] [--samples 4] [--seed 0]

draws `--samples` edits of each of the first `--prompts` prompts of DATA/{split}_prompts.json with the sampler of
RL's preset (launch/configs/shapeedit.yaml, the edits GRPO's reward scores) and writes every pair of distinct
samples, judged and critiqued by the oracle (reward/shapeedit/samples.py), to DATA/policy_{split}.json with the
images under DATA/images/policy_{split}/. reward/train.py trains on them beside the candidate pairs with
`data.mix=[DATA/policy_train.json]`. Only the train split belongs in training: the others' prompts are
evaluation prompts (test_heldout's compositions are held out). `on_policy` measures reward models on fresh
samples of evaluation prompts (launch/demo.py).
"""

from __future__ import annotations

import argparse
import json
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


def write_policy_pairs(
    policy_dir: Path,
    data_dir: Path,
    split: str,
    prompts: int,
    samples: int,
    seed: int,
    sampler: SamplerConfig | None = None,
) -> dict:
    """Write DATA/policy_{split}.json (see the module docstring) from samples drawn with `sampler` (default: RL's
    preset's); returns its counts, also printed."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if prompts < 1 or samples < 2:
        raise ValueError(f"need --prompts >= 1 and --samples >= 2, got {prompts} and {samples}")
    if not (data_dir / f"{split}_prompts.json").is_file():
        raise FileNotFoundError(f"{data_dir / f'{split}_prompts.json'} not found: pass a ShapeEdit data folder")
    if not (policy_dir / "policy.json").is_file():
        raise FileNotFoundError(f"{policy_dir / 'policy.json'} not found: pass a ShapeEdit policy folder")
    rows = json.loads((data_dir / f"{split}_prompts.json").read_text())[:prompts]
    policy = ShapeEditPolicy.from_pretrained(policy_dir)
    loaded = load_eval_prompts(data_dir, split, prompts, policy.height)
    start = time.perf_counter()
    groups = sample_groups(policy, loaded, samples, sampler or preset_sampler(), seed)
    pairs, gold = [], []
    for k, (row, images) in enumerate(zip(rows, groups)):
        labelled, judgements = label_samples(row, images, data_dir, f"images/policy_{split}/{k:06d}", split)
        pairs += labelled
        gold.append([j.overall for j in judgements])
    path = data_dir / f"policy_{split}.json"
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
    split: str,
    prompts: int,
    group_size: int,
    seed: int,
    sampler: SamplerConfig | None = None,
) -> dict:
    """Each reward model (label -> `reward.evaluate.load_reward` spec) on fresh samples of the policy: `group_size`
    edits of each of the first `prompts` prompts of `split`, with `sampler` (default: RL's preset's), scored and
    compared with the oracle within each group (`reward.compare.on_policy_ranking`). Also the groups' gold spread,
    the share of groups whose edits are one image, and the oracle's own best-of-group gain."""
    from reward.evaluate import load_reward
    from reward.shapeedit import judge_image

    policy = ShapeEditPolicy.from_pretrained(policy_dir)
    loaded = load_eval_prompts(data_dir, split, prompts, policy.height)
    groups = sample_groups(policy, loaded, group_size, sampler or preset_sampler(), seed)
    gold = np.array([[judge_image(p["scene"], p["edits"], im).overall for im in g] for p, g in zip(loaded, groups)])
    arrays = [[np.asarray(im) for im in g] for g in groups]
    identical = np.mean([all(np.array_equal(a, g[0]) for a in g) for g in arrays])
    sources = [p["source"] for p in loaded for _ in range(group_size)]
    instructions = [p["instruction"] for p in loaded for _ in range(group_size)]
    edits = [im for g in groups for im in g]
    result = {
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
        scores = torch.cat(
            [
                model.score(sources[i : i + 64], instructions[i : i + 64], edits[i : i + 64])
                for i in range(0, len(edits), 64)
            ]
        )
        result["models"][label] = on_policy_ranking(gold, scores.float().numpy().reshape(gold.shape))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--policy", required=True, help="a ShapeEdit policy folder (save_pretrained)")
    parser.add_argument("--data", required=True, help="a ShapeEdit data folder (python -m reward.shapeedit generate)")
    parser.add_argument("--split", default="train", help="whose prompts to sample (train: reward data)")
    parser.add_argument("--prompts", type=int, default=1000, help="the first N prompts of the split")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (every pair of them is written)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    args = parser.parse_args(argv)
    try:
        write_policy_pairs(Path(args.policy), Path(args.data), args.split, args.prompts, args.samples, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
