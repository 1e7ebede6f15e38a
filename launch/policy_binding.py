"""Does a ShapeEdit policy edit the object it is asked to, and only that one? A probe by edit family.

    python launch/policy_binding.py --policy shipped=assets/shapeedit_policy --policy mine=runs/policy \
        --data runs/assets/data --out docs/results/policy_binding.json

For each single-edit prompt of the split, the policy predicts the clean edit once from the noisy *target* at
noise level sigma (the denoiser's own question, teacher-forced) and once by sampling (8 ODE steps from noise).
Its most probable category at every pixel is compared with the target on three kinds of pixel:

- `changed`: the pixels the edit changes (drawn right?),
- `kept_objects`: the pixels of the other objects, which the edit leaves alone (kept?),
- `kept_background`: the rest (kept?).

At sigma near 1 the noisy target says nothing, so the policy must find the meant object from the source and the
instruction alone; at sigma 0.5 it can read it off the noisy target. A policy that paints every object of the
named kind or colour ("the blue triangle": all triangles) loses `kept_objects`; one that reads the decision off
the noise wins at 0.5 and loses at 0.999. Decision-code policies are probed at one code (`--code`, default -2: the
correct share of the demonstrator's codes; sampled codes are drawn around it).

Placement: at each sigma the probe also averages the probability the policy gives to changing a pixel (1 - P(keep
the source pixel)) over the pixels the edit changes and over the background it keeps (`placement_markdown`). At
sigma 0.999, a policy that knows where an added or moved shape goes gives the first far more than the second; one
that knows only what appears gives both the same. docs/policies.md reads the results.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/policy_binding.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from launch.benchmarking import named_folders, write_json
from launch.pretrain_policy import load_eval_prompts
from policies.images import images_to_tensor
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy, background_pixels
from reward.config import HelpFormatter
from reward.shapeedit import judge_image
from reward.shapeedit.edits import apply_edits
from reward.shapeedit.world import render

SIGMAS = (0.999, 0.5)
KINDS = ("changed", "kept_objects", "kept_background")


def pixel_hits(image: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(right, all) pixels of each kind (KINDS), summed over the batch."""
    right = ((image - target).abs().amax(1, keepdim=True) < 1e-3)[:, 0]
    changed = (target != source).any(1)
    background = background_pixels(source)[:, 0]
    masks = {"changed": changed, "kept_objects": ~changed & ~background, "kept_background": ~changed & background}
    return {k: (int((right & m).sum()), int(m.sum())) for k, m in masks.items()}


@torch.no_grad()
def probe_batch(policy: ShapeEditPolicy, chunk: list[dict], code: float, generator, counts: dict, gold: dict) -> None:
    """One batch of the probe: add its pixel counts (by family and 'all') to `counts` and its gold to `gold`."""
    size = policy.cfg.image_size
    families = [p["edits"][0].family for p in chunk]
    source = images_to_tensor([p["source"] for p in chunk]).float() / 127.5 - 1
    target = torch.from_numpy(np.stack([render(apply_edits(p["scene"], p["edits"]), size) for p in chunk]))
    target = target.permute(0, 3, 1, 2).float() / 127.5 - 1
    text, pooled = policy.encode_instructions([p["instruction"] for p in chunk])
    codes = torch.full((len(chunk),), code) if policy.cfg.decision_code else None
    noise = torch.randn(target.shape, generator=generator)
    images, p_change = {}, {}
    changed = (target != source).any(1)
    background = ~changed & background_pixels(source)[:, 0]
    for sigma in SIGMAS:
        _, logits = policy.predict((1 - sigma) * target + sigma * noise, sigma, source, text, pooled, codes)
        images[f"sigma_{sigma}"] = policy.category_image(logits.argmax(1), source)
        p_change[f"sigma_{sigma}"] = 1 - logits.softmax(1)[:, 0]  # (B, H, W): P(not the source pixel)
    rollout = policy.sample(
        [p["source"] for p in chunk],
        [p["instruction"] for p in chunk],
        SamplerConfig(num_steps=8, noise_level=0.0),
        generator,
    )
    images["sampled"] = rollout.edited_images.float() / 127.5 - 1
    for i, (p, family) in enumerate(zip(chunk, families)):
        for name, image in images.items():
            for kind, (right, total) in pixel_hits(image[i : i + 1], source[i : i + 1], target[i : i + 1]).items():
                for key in (family, "all"):
                    counts[key][f"{name}/{kind}"][0] += right
                    counts[key][f"{name}/{kind}"][1] += total
        for name, prob in p_change.items():  # summed probabilities over pixel counts: the report's means
            for kind, mask in (("changed", changed[i]), ("kept_background", background[i])):
                for key in (family, "all"):
                    counts[key][f"{name}/p_change_{kind}"][0] += float(prob[i][mask].sum())
                    counts[key][f"{name}/p_change_{kind}"][1] += int(mask.sum())
        edited = ((images["sampled"][i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        score = judge_image(p["scene"], p["edits"], edited).overall
        gold[family].append(score)
        gold["all"].append(score)


@torch.no_grad()
def probe(policy: ShapeEditPolicy, prompts: list[dict], code: float, seed: int = 0, batch_size: int = 32) -> dict:
    """By family (and 'all'): the share of each kind of pixel the policy gets right at each sigma of SIGMAS and
    when sampled, the mean probability it gives to changing a pixel (1 - P(keep the source pixel)) over the pixels
    the edit changes and over the background it keeps (`sigma_S/p_change_changed`, `.../p_change_kept_background`),
    the oracle's gold of the sampled edits, and the number of prompts."""
    if policy.cfg.parameterisation != "palette":
        raise ValueError(
            f"the probe reads the palette head's categories; this policy is {policy.cfg.parameterisation!r}"
        )
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    gold: dict[str, list[float]] = defaultdict(list)
    generator = torch.Generator().manual_seed(seed)
    # sampled codes are drawn from N(code, 1): the mean set to `code`, within its bound
    with policy.code_mean_fixed(code) if policy.cfg.decision_code else contextlib.nullcontext():
        for start in range(0, len(prompts), batch_size):
            probe_batch(policy, prompts[start : start + batch_size], code, generator, counts, gold)
    report = {}
    for key in sorted(gold, key=lambda k: (k == "all", k)):
        row = {"prompts": len(gold[key]) if key != "all" else len(prompts), "gold": round(float(np.mean(gold[key])), 4)}
        row.update({name: round(r / t, 4) if t else None for name, (r, t) in counts[key].items()})
        report[key] = row
    return report


def markdown(report: dict, family: str = "all") -> str:
    """One row per policy: gold and the pixel shares of one family (`all` = every single-edit prompt)."""
    cols = [f"{n}/{k}" for n in (*(f"sigma_{s}" for s in SIGMAS), "sampled") for k in KINDS]
    lines = [
        "| policy | prompts | gold | " + " | ".join(c.replace("/", " ").replace("_", " ") for c in cols) + " |",
        "| --- " * (3 + len(cols)) + "|",
    ]
    for name, entry in report["policies"].items():
        row = entry["families"][family]
        cells = ["–" if row[c] is None else f"{row[c]:.2f}" for c in cols]
        lines.append(f"| {name} | {row['prompts']} | {row['gold']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def placement_markdown(report: dict, families: tuple[str, ...] = ("add", "move", "resize", "swap", "recolour")) -> str:
    """Does the policy know where an edit goes before the noise shows it? One row per policy and family: the mean
    P(change) at sigma 0.999 over the pixels the edit changes and over the background it keeps."""
    sigma = SIGMAS[0]
    lines = [
        f"| policy | family | prompts | P(change) where the edit changes, sigma {sigma} "
        "| P(change) on the kept background |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in report["policies"].items():
        for family in families:
            row = entry["families"].get(family)
            if row is None:
                continue
            inside, outside = row[f"sigma_{sigma}/p_change_changed"], row[f"sigma_{sigma}/p_change_kept_background"]
            cells = ["–" if v is None else f"{v:.2f}" for v in (inside, outside)]
            lines.append(f"| {name} | {family} | {row['prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--policy", action="append", required=True, help="NAME=DIR of a saved ShapeEdit policy (repeat for several)"
    )
    parser.add_argument("--data", default="runs/assets/data", help="a ShapeEdit dataset (its SPLIT_prompts.json)")
    parser.add_argument("--split", default="val", help="which prompts: val or test_heldout")
    parser.add_argument("--prompts", type=int, default=512, help="prompts read from the split (single edits kept)")
    parser.add_argument("--code", type=float, default=-2.0, help="the decision code of a decision-code policy")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise, the same for every policy")
    parser.add_argument("--out", default="", help="write the report here as JSON ('' = print only)")
    args = parser.parse_args(argv)
    policies = named_folders(parser, "--policy", args.policy, "policy.json", "a saved ShapeEdit policy")
    torch.manual_seed(args.seed)
    report = {"data": args.data, "split": args.split, "code": args.code, "seed": args.seed, "policies": {}}
    for name, path in policies.items():
        policy = ShapeEditPolicy.from_pretrained(path)
        policy.transformer.eval()
        prompts = load_eval_prompts(Path(args.data), args.split, args.prompts, policy.cfg.image_size)
        single = [p for p in prompts if len(p["edits"]) == 1]
        report["policies"][name] = {"path": path, "families": probe(policy, single, args.code, args.seed)}
    print(markdown(report))
    print(placement_markdown(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
