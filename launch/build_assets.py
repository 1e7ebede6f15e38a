"""Build the starting checkpoints the project ships, from their documented recipes.

    python launch/build_assets.py                       # the shipped policy: about half an hour on 2 CPU cores
    python launch/build_assets.py --asset backbone      # the shipped reward backbone: about 16 minutes
    python launch/build_assets.py --smoke --out /tmp/a  # a recipe in miniature (what the tests build)
    python launch/build_assets.py --check               # verify every shipped asset against its manifest

- The ShapeEdit policy (`assets/shapeedit_policy/`) is pretrained by launch/pretrain_policy.py with the recipe
  launch/recipes/shapeedit_policy.yaml, longer than `make demo` could afford, so that the demo's RL starts from a
  policy whose samples of one prompt make different decisions. The folder holds what
  `ShapeEditPolicy.from_pretrained` reads (safetensors weights, configs, tokenizer, policy.json) and the
  pretraining's `results.json` (val and held-out gold, the spread of its samples).
- The reward backbone (`assets/reward_backbone/`) is pretrained by reward/pretrain_backbone.py on the label-free
  grounding tasks with the recipe launch/recipes/reward_backbone.yaml. The folder is a Qwen2-VL checkpoint that
  `model.backbone=assets/reward_backbone` (or a copy) loads, with its `pretrain.json` (final loss, the
  localisation probe). The demo's JRM and its lambda = 0 ablation both start from it.

Each folder also holds `manifest.json`: the command, recipe, seed, the data it was trained or evaluated on, the
measured figures, the library versions, and the size and sha256 of every file. `load_asset` refuses a folder
whose files do not match their manifest. Assets are replaced rarely; the whole of `assets/` stays under 30 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/build_assets.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]
POLICY_ASSET = ROOT / "assets" / "shapeedit_policy"
POLICY_RECIPE = ROOT / "launch" / "recipes" / "shapeedit_policy.yaml"
BACKBONE_ASSET = ROOT / "assets" / "reward_backbone"
BACKBONE_RECIPE = ROOT / "launch" / "recipes" / "reward_backbone.yaml"
ASSETS = {"policy": POLICY_ASSET, "backbone": BACKBONE_ASSET}
"""Each shipped asset's folder, by its --asset name."""
MAX_ASSET_BYTES = 30 * 2**20
"""All shipped assets together stay under this (the repository carries them)."""
MAX_FILE_BYTES = 4 * 10**6
"""No shipped file is larger: the policy's weights are written in safetensors shards (with their index) below it,
and the backbone's one weights file is checked against it before anything shipped is replaced."""
SHIPPED = ("policy.json", "results.json", "config.yaml", "transformer", "text_encoder", "tokenizer")
"""What of a pretraining folder is shipped (its metrics.jsonl is not)."""
SMOKE = [
    "max_steps=20",
    "max_minutes=0",
    "eval_every=1000",
    "num_eval=4",
    "eval_samples=2",
    "spread_prompts=2",
    "group_size=2",
    "vocab_instructions=500",
]
"""The policy's recipe in miniature: same model, demonstrator and files, a few steps."""
BACKBONE_SMOKE = ["trainer.max_steps=2", "trainer.logging_steps=1"]
"""The backbone's recipe in miniature: same model and files, two steps."""
BACKBONE_LEFT_OUT = ("metrics.jsonl", "training_args.bin")
"""What of a backbone pretraining folder is not shipped."""
DATA_PAIRS = 10000
"""The evaluation data: `python -m reward.shapeedit generate` with these pairs and seed 0 (make demo's)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_files(folder: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in `folder` but the manifest."""
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def load_asset(folder: Path) -> dict:
    """The manifest of a built asset folder, after checking every file it lists (and no other) against its size
    and sha256; a clear error otherwise."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: build the asset with python launch/build_assets.py")
    manifest = json.loads(manifest_path.read_text())
    found = asset_files(folder)
    if found != manifest["files"]:
        changed = sorted(
            set(found) ^ set(manifest["files"]) | {k for k in found if manifest["files"].get(k) != found[k]}
        )
        raise ValueError(
            f"{folder}: files differ from manifest.json ({', '.join(changed)}); restore them with git or rebuild "
            "with python launch/build_assets.py"
        )
    return manifest


def ensure_data(data_dir: Path) -> dict:
    """The evaluation data (generated once, seed 0), and its identity for the manifest."""
    from reward.shapeedit import GenerateConfig, generate

    meta = data_dir / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text())["config"]["pairs"] != DATA_PAIRS:
        generate(GenerateConfig(out=str(data_dir), pairs=DATA_PAIRS, seed=0, overwrite=True), progress=False)
    config = json.loads(meta.read_text())["config"]
    return {
        "command": f"python -m reward.shapeedit generate --out DIR --pairs {DATA_PAIRS} --seed 0",
        "generator": config,
        "sha256": {name: sha256(data_dir / name) for name in ("val_prompts.json", "test_heldout_prompts.json")},
    }


def finished_run(run: Path, cfg, data: dict) -> dict:
    """The results of a finished pretraining run in `run` after checking that it is the recipe's: the same settings
    (where it was written and read aside) and the evaluation data (the sha256 of its prompt files)."""
    from dataclasses import asdict

    from launch.pretrain_policy import PolicyPretrainConfig
    from reward.config import load_config

    if not (run / "results.json").is_file() or not (run / "config.yaml").is_file():
        raise SystemExit(
            f"--from-run {run}: no results.json and config.yaml there (a finished pretraining run has both)"
        )
    ran = load_config(PolicyPretrainConfig, run / "config.yaml")
    theirs = asdict(ran)
    differ = [k for k, v in asdict(cfg).items() if k not in ("output_dir", "data_dir", "progress") and theirs[k] != v]
    if differ:
        raise SystemExit(f"--from-run {run}: not trained by the recipe ({', '.join(differ)} differ); build it instead")
    hashes = {name: sha256(Path(ran.data_dir) / name) for name in data["sha256"]}
    if hashes != data["sha256"]:
        raise SystemExit(f"--from-run {run}: evaluated on other data than {data['command']} ({ran.data_dir})")
    return json.loads((run / "results.json").read_text())


def build_policy(out: Path, work: Path, smoke: bool, overrides: list[str], from_run: Path | None = None) -> dict:
    """Pretrain the policy by the recipe into `work` (or take the finished run `from_run` of the same recipe), copy
    what ships into `out`, write its manifest."""
    from launch.pretrain_policy import PolicyPretrainConfig, pretrain
    from policies.shapeedit import ShapeEditPolicy
    from reward.config import load_config

    data = ensure_data(work / "data")
    extra = [*(SMOKE if smoke else []), *overrides]
    cfg = load_config(
        PolicyPretrainConfig,
        POLICY_RECIPE,
        [f"output_dir={work / 'policy'}", f"data_dir={work / 'data'}", *extra],
    )
    start = time.perf_counter()
    run = from_run or work / "policy"
    results = finished_run(from_run, cfg, data) if from_run else pretrain(cfg)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SHIPPED:
        source = run / name
        if name == "transformer":  # the denoiser in safetensors shards, each under the repository's file limit
            ShapeEditPolicy.from_pretrained(run).transformer.save_pretrained(out / name, max_shard_size=MAX_FILE_BYTES)
        else:
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, out / name)
    measured = {k: v for k, v in results.items() if k.startswith(("eval/", "spread/")) or k in ("steps", "trained_s")}
    return write_manifest(
        out, "policy", POLICY_RECIPE, smoke, overrides, extra, cfg.seed, data, measured, start, from_run
    )


def build_backbone(out: Path, work: Path, smoke: bool, overrides: list[str]) -> dict:
    """Pretrain the reward backbone by the recipe into `work`, copy what ships into `out`, write its manifest."""
    from reward.config import load_config
    from reward.pretrain_backbone import PretrainConfig, pretrain, settings

    extra = [*(BACKBONE_SMOKE if smoke else []), *overrides]
    trained = work / "backbone"
    cfg = load_config(PretrainConfig, BACKBONE_RECIPE, [f"output_dir={trained}", *extra])
    earlier = trained / "pretrain_config.yaml"
    if earlier.is_file() and settings(load_config(PretrainConfig, earlier)) != settings(cfg):
        shutil.rmtree(trained)  # a run of other settings (the smoke version, say); one of these resumes or is reused
    start = time.perf_counter()
    results = pretrain(cfg)
    too_large = [p.name for p in trained.iterdir() if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    if too_large:  # checked before anything shipped is replaced
        raise SystemExit(f"{trained}: {too_large} over the {MAX_FILE_BYTES}-byte file limit; shard them")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns(*BACKBONE_LEFT_OUT))
    data = {"command": "drawn as it trains (reward/shapeedit/grounding.py)", "tasks": cfg.tasks, "seed": cfg.seed}
    measured = {k: v for k, v in results.items() if k != "settings"}
    return write_manifest(out, "backbone", BACKBONE_RECIPE, smoke, overrides, extra, cfg.seed, data, measured, start)


def write_manifest(
    out: Path,
    asset: str,
    recipe: Path,
    smoke: bool,
    overrides: list[str],
    extra: list[str],
    seed: int,
    data: dict,
    measured: dict,
    start: float,
    from_run: Path | None = None,
) -> dict:
    """manifest.json of a built asset folder: how to rebuild it, what it was measured on, and every file's hash;
    `from_run`, the finished run it was packaged from (then the build's seconds are the packaging's, the training's
    are measured.trained_s)."""
    import torch
    import transformers

    manifest = {
        "asset": ASSETS[asset].name,
        "command": " ".join(
            [
                "python launch/build_assets.py",
                *(["--asset", asset] if asset != "policy" else []),
                *["--smoke"] * smoke,
                *(f"--set {o}" for o in overrides),
            ]
        ),
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": extra,
        "seed": seed,
        "data": data,
        "measured": measured,
        "built": {
            "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **({"from_run": str(from_run)} if from_run else {}),
        },
        "files": asset_files(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from reward.config import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--asset", choices=sorted(ASSETS), default="policy", help="which asset to build")
    parser.add_argument(
        "--out", default=None, help="where the asset goes (default: its folder under assets/, what make demo loads)"
    )
    parser.add_argument("--work", default="runs/assets", help="scratch folder: the data and the full pretraining run")
    parser.add_argument("--smoke", action="store_true", help="the recipe in miniature (seconds)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only verify assets against their manifests (--out, else every shipped one)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the recipe (repeatable)"
    )
    parser.add_argument(
        "--from-run",
        default=None,
        help="the policy: ship this finished launch/pretrain_policy.py run of the recipe instead of training again "
        "(its settings and evaluation data are checked against the recipe's)",
    )
    args = parser.parse_args(argv)
    if args.check:
        for folder in [Path(args.out)] if args.out else ASSETS.values():
            manifest = load_asset(folder)
            print(f"{folder}: {len(manifest['files'])} files match manifest.json")
        return 0
    if any("=" not in o for o in args.set):
        parser.error("--set takes KEY=VALUE")
    out = Path(args.out) if args.out else ASSETS[args.asset]
    if args.smoke and out.resolve().is_relative_to(ROOT / "assets"):
        parser.error("--smoke builds a miniature: give it an --out outside assets/ (it would replace a shipped asset)")
    if args.from_run and args.asset != "policy":
        parser.error("--from-run packages a policy run; the backbone's build resumes its own run in --work instead")
    if args.asset == "policy":
        manifest = build_policy(
            out, Path(args.work), args.smoke, args.set, Path(args.from_run) if args.from_run else None
        )
    else:
        manifest = build_backbone(out, Path(args.work), args.smoke, args.set)
    total = sum(f["bytes"] for f in manifest["files"].values())
    if not args.smoke and out.resolve().is_relative_to(ROOT / "assets"):
        shipped = sum(p.stat().st_size for p in (ROOT / "assets").rglob("*") if p.is_file())
        if shipped > MAX_ASSET_BYTES:
            raise SystemExit(f"assets/ holds {shipped / 2**20:.1f} MB, over the {MAX_ASSET_BYTES / 2**20:.0f} MB limit")
    print(json.dumps(manifest["measured"], indent=1))
    print(f"{out}: {len(manifest['files'])} files, {total / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
