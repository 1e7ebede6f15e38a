"""Compare ShapeEdit policy pretraining recipes at one step budget and thread count; write the table's JSON.

    OMP_NUM_THREADS=1 python launch/policy_variants.py [out_dir=runs/policy_variants] [only=gated] [threads=1]
    python launch/policy_variants.py report=true      # only rebuild the JSON and print the markdown table

Each variant is `launch/pretrain_policy.py` with a few overrides (VARIANTS) on the common ones (COMMON), run
into out_dir/<name>; a variant whose results.json exists is not rerun, so the script resumes and one variant
can be (re)run with only=<name>. The JSON (docs/results/policy_pretraining.json) holds every finished
variant's final evaluation, its overrides, its training time and the thread count it ran under;
`markdown(report)` is the table docs/policies.md holds (tests/policies/test_policy_results_doc.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/policy_variants.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from launch.pretrain_policy import PolicyPretrainConfig, pretrain
from reward.config import config_from_cli, load_config

# Shared by every variant: one step budget, evaluation on 128 prompts per split, no wall-clock cut.
COMMON = ["max_steps=1000", "max_minutes=0", "eval_every=1000", "num_eval=128", "progress=false"]
# Every variant spells out where it differs from today's defaults (palette_source_colours' recipe).
GATED = ["policy.parameterisation=gated", "edit_average=batch"]
# The gated policy with the losses and noise levels it started with, and with the recipe it ended with (high_noise's).
BEFORE = [*GATED, "gate_weight=1", "edit_weight=0", "sigma_location=0"]
GATED_RECIPE = [*GATED, "gate_weight=4", "edit_weight=1", "sigma_location=1"]
# The first gated variants' head: no instruction features, width 16.
PIXELS_ONLY = ["policy.head_hidden=16", "policy.head_text_features=0"]
# The palette classifier without the source colours, its changed-pixel term averaged over the batch.
PALETTE = ["policy.parameterisation=palette", "policy.head_source_colours=false", "edit_average=batch"]
# (name, what it changes, overrides); the first is the first policy.
VARIANTS: list[tuple[str, str, list[str]]] = [
    (
        "change",
        "x0 = source + change from the patch tokens (the first policy)",
        [*BEFORE, "policy.parameterisation=change"],
    ),
    (
        "gated",
        "x0 = m c + (1 - m) source, per-pixel head (width 16), gate cross-entropy (weight 1)",
        [*BEFORE, *PIXELS_ONLY],
    ),
    (
        "gated_edit_weight",
        "gated + squared error over the changed pixels (weight 1)",
        [*BEFORE, *PIXELS_ONLY, "edit_weight=1"],
    ),
    (
        "gated_edit_weight_gate4",
        "gated_edit_weight, gate cross-entropy weight 4",
        [*BEFORE, *PIXELS_ONLY, "edit_weight=1", "gate_weight=4"],
    ),
    (
        "gated_text_head",
        "gated_edit_weight_gate4 + the pooled instruction at every pixel of a width-32 head",
        [*BEFORE, "edit_weight=1", "gate_weight=4"],
    ),
    ("high_noise", "gated_text_head, noise levels sigmoid(N(1, 1)) (more training at high noise)", GATED_RECIPE),
    ("higher_noise", "gated_text_head, noise levels sigmoid(N(2, 1))", [*GATED_RECIPE, "sigma_location=2"]),
    (
        "recipe_8min_shared",
        "high_noise (the gated recipe), 1,800 steps or 8 minutes, 2 threads, while a Ray benchmark shared the cores",
        [*GATED_RECIPE, "max_steps=1800", "max_minutes=8", "eval_every=1800"],
    ),
    (
        "palette_mean_last_step",
        "x0 = p_0 source + sum_k p_k colour_k: a per-pixel classifier over keeping the source and the 13 palette "
        "colours, cross-entropy; the last step lands on the categories' mean (the plain Euler step)",
        [*PALETTE, "edit_weight=0", "policy.last_step=mean"],
    ),
    (
        "palette_edit_weight_0.3",
        "the classifier, its most probable category at the last step, + the cross-entropy averaged over the batch's "
        "changed pixels (weight 0.3)",
        [*PALETTE, "edit_weight=0.3"],
    ),
    (
        "palette_edit_weight_0.3_sd3_noise",
        "palette_edit_weight_0.3, SD3's noise levels sigmoid(N(0, 1))",
        [*PALETTE, "edit_weight=0.3", "sigma_location=0"],
    ),
    (
        "palette_image_average",
        "the classifier + the cross-entropy averaged over each image's changed pixels, then over images (weight 1)",
        [*PALETTE, "edit_weight=1", "edit_average=image"],
    ),
    (
        "palette_image_average_0.3",
        "palette_image_average, weight 0.3",
        [*PALETTE, "edit_weight=0.3", "edit_average=image"],
    ),
    (
        "palette_source_colours",
        "palette_image_average + the source pixel's palette colour (one-hot) and 4 colour queries read at it (today's "
        "defaults)",
        ["policy.head_source_colours=true", "edit_weight=1", "edit_average=image"],
    ),
    (
        "palette_source_colours_0.3",
        "palette_source_colours, weight 0.3",
        ["policy.head_source_colours=true", "edit_weight=0.3", "edit_average=image"],
    ),
]


@dataclass
class VariantsConfig:
    out_dir: str = "runs/policy_variants"
    """Each variant trains into out_dir/<name>."""
    data_dir: str = "runs/jrm_shapeedit/data"
    """The ShapeEdit dataset whose val and test_heldout prompts are evaluated."""
    only: str = ""
    """Run this variant alone ('' = every variant not yet finished)."""
    threads: int = 1
    """torch threads for training (the JSON records it; compare variants at one count)."""
    report: bool = False
    """Only collect the finished variants into the JSON and print the table."""
    results_path: str = "docs/results/policy_pretraining.json"
    """Where the comparison is written."""


def collect(cfg: VariantsConfig) -> dict:
    """The finished variants' final evaluations, in VARIANTS order."""
    rows = []
    for name, what, overrides in VARIANTS:
        path = Path(cfg.out_dir) / name / "results.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        rows.append(
            {
                "name": name,
                "what": what,
                "overrides": overrides,
                "steps": result["steps"],
                "trained_s": result["trained_s"],
                "threads": result["threads"],
                **{k.removeprefix("eval/"): v for k, v in result.items() if k.startswith("eval/")},
            }
        )
    return {"common": COMMON, "data_dir": cfg.data_dir, "variants": rows}


def markdown(report: dict) -> str:
    """The table docs/policies.md holds."""
    lines = [
        "| variant | what changes | steps | trained (s) | threads | val overall | val following | val consistency | "
        "val quality | test_heldout overall | test_heldout following |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if report["variants"]:  # the same for every variant: the sources of the same prompts
        r = report["variants"][0]
        lines.append(
            f"| doing nothing | return the source unchanged | – | – | – | {r['val/identity_overall']:.3f} | – | – | – "
            f"| {r['test_heldout/identity_overall']:.3f} | – |"
        )
    for r in report["variants"]:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['steps']:,} | {r['trained_s']:.0f} | {r['threads']} | "
            f"{r['val/overall']:.3f} | {r['val/following']:.3f} | {r['val/consistency']:.3f} | {r['val/quality']:.3f} "
            f"| {r['test_heldout/overall']:.3f} | {r['test_heldout/following']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_cli(VariantsConfig, sys.argv[1:] if argv is None else argv, __doc__)
    names = [name for name, _, _ in VARIANTS]
    if cfg.only and cfg.only not in names:
        raise SystemExit(f"error: only={cfg.only!r} is not a variant; variants: {names}")
    if not cfg.report:
        torch.set_num_threads(cfg.threads)
        print(f"torch threads: {torch.get_num_threads()}", flush=True)
        for name, _, overrides in VARIANTS:
            out = Path(cfg.out_dir) / name
            if (cfg.only and name != cfg.only) or (not cfg.only and (out / "results.json").is_file()):
                continue
            print(f"== {name}", flush=True)
            pretrain(
                load_config(
                    PolicyPretrainConfig, None, [*COMMON, *overrides, f"output_dir={out}", f"data_dir={cfg.data_dir}"]
                )
            )
    report = collect(cfg)
    Path(cfg.results_path).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
