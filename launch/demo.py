"""The project's main job on its embedded default: ShapeEdit on CPU, end to end.

    make demo            # or: python launch/demo.py [--quick] [--out runs/demo]

1. generate a ShapeEdit dataset, print its summary, draw a contact sheet;
2. train a tiny JRM on it (reward/train.py);
3. pretrain the ShapeEdit policy by flow matching (launch/pretrain_policy.py);
4. start a local Ray cluster on 127.0.0.1, submit GRPO with `ray job submit` (launch/grpo_edit.py, preset
   launch/configs/shapeedit.yaml, reward = the JRM, gold = the oracle), stop the cluster;
5. print the held-out oracle score of the policy before and after RL.
`--quick` shortens every stage (a smoke run of the whole path, a few minutes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/demo.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from reward.shapeedit import SPLITS, GenerateConfig, generate
from reward.shapeedit.sheet import contact_sheet


def summarise(data_dir: Path) -> str:
    """A few lines on the generated data: sizes per split and mean oracle score per candidate mode."""
    meta = json.loads((data_dir / "meta.json").read_text())
    lines = ["split          prompts   pairs   ties"]
    for split in SPLITS:
        n = meta["prompts"][split]
        lines.append(f"{split:<14} {n:>7} {meta['pairs'][split]:>7} {meta['ties'][split]:>6}")
    scores: dict[str, list[float]] = collections.defaultdict(list)
    for row in json.loads((data_dir / "train.json").read_text()):
        for slot in ("1", "2"):
            scores[row[f"model{slot}"]].append(row[f"oracle{slot}"]["overall"])
    lines.append("candidate mode    mean oracle overall (train)")
    for mode, values in sorted(scores.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        lines.append(f"{mode:<17} {sum(values) / len(values):.3f}  (n={len(values)})")
    return "\n".join(lines)


ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> None:
    """Run one stage as its own process (its own threads and memory), failing loudly."""
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, **kwargs)


def grpo_job(overrides: list[str]) -> None:
    """Start a loopback-only Ray cluster, submit the GRPO job to it, and stop it whatever happens."""
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # Ray 2.60 clusters require a token (written to ~/.ray/auth_token by `ray start`); the job client only
    # sends it when RAY_AUTH_MODE=token is set in its environment.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    run([ray, "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--port=6389"], env=env)
    try:
        cmd = [ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--", sys.executable, "launch/grpo_edit.py", "--config", "launch/configs/shapeedit.yaml", *overrides]
        run(cmd, env=env)
    finally:
        subprocess.run([ray, "stop"], cwd=ROOT, check=False, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (its data/ is regenerated)")
    parser.add_argument("--quick", action="store_true", help="every stage shortened: a smoke run of the whole path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data_dir = out / "data"
    timings = {}
    py = sys.executable
    # ---- 1. ShapeEdit data -------------------------------------------------------------------------
    if data_dir.exists():
        shutil.rmtree(data_dir)
    start = time.perf_counter()
    generate(GenerateConfig(out=str(data_dir), pairs=2000 if args.quick else 10000, seed=args.seed))
    timings["data"] = time.perf_counter() - start
    print(f"\nShapeEdit data generated in {timings['data']:.1f} s\n")
    print(summarise(data_dir))
    sheet = contact_sheet(data_dir, "train", rows=8, out=out / "contact_sheet.png")

    # ---- 2. the reward model: a tiny JRM ---------------------------------------------------------------
    start = time.perf_counter()
    jrm = out / "jrm"
    run([py, "reward/train.py", f"output_dir={jrm}", "resume=none", f"seed={args.seed}", f"data.train={data_dir / 'train.json'}", f"data.eval={data_dir / 'val.json'}",
         f"trainer.max_steps={100 if args.quick else 1600}", f"trainer.eval_steps={50 if args.quick else 400}", f"trainer.save_steps={50 if args.quick else 400}"])
    timings["jrm"] = time.perf_counter() - start

    # ---- 3. the policy: supervised flow matching ---------------------------------------------------------
    start = time.perf_counter()
    policy = out / "policy"
    minutes = 1.5 if args.quick else 10
    run([py, "launch/pretrain_policy.py", f"output_dir={policy}", f"data_dir={data_dir}", f"seed={args.seed}", f"max_minutes={minutes}", f"max_steps={300 if args.quick else 2400}", "num_eval=64"])
    timings["policy"] = time.perf_counter() - start

    # ---- 4. GRPO as a Ray job -------------------------------------------------------------------------
    start = time.perf_counter()
    grpo = out / "grpo"
    if grpo.exists():
        shutil.rmtree(grpo)
    overrides = [f"output_dir={grpo}", f"seed={args.seed}", f"policy.path={policy}", f"reward.terms=[{{name: jrm, spec: 'jrm:{jrm / 'final'}'}}]",
                 f"reward.gold=oracle:{data_dir}", f"data.train_prompts={data_dir / 'train_prompts.json'}", f"data.eval_prompts={data_dir / 'test_heldout_prompts.json'}"]
    if args.quick:
        overrides += ["num_steps=4", "eval_every=2", "save_every=2", "data.num_eval=16"]
    grpo_job(overrides)
    timings["grpo"] = time.perf_counter() - start

    # ---- 5. summary --------------------------------------------------------------------------------
    evals = [r for r in map(json.loads, (grpo / "metrics.jsonl").read_text().splitlines()) if "eval/gold_score" in r]
    print("\nHeld-out prompts (test_heldout, ODE sampling) during GRPO: oracle (gold) score and JRM (proxy) reward")
    print("  RL step   oracle   JRM reward")
    for r in evals:
        print(f"  {r['step']:>7}   {r['eval/gold_score']:.4f}   {r['eval/reward_mean']:+.4f}")
    best = max(evals, key=lambda r: r["eval/gold_score"])
    print(f"  pretrained {evals[0]['eval/gold_score']:.4f} -> best {best['eval/gold_score']:.4f} (step {best['step']}) -> last {evals[-1]['eval/gold_score']:.4f}")
    print("  (a proxy that keeps rising while the oracle falls is reward hacking: see README, RL results)")
    print("\nStage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    print("\nOutputs:")
    print(f"  data          {data_dir}/  (train/val/test_iid/test_heldout .json, *_triples.json, *_prompts.json)")
    print(f"  contact sheet {sheet}")
    print(f"  JRM           {jrm / 'final'}  (metrics: {jrm / 'metrics.jsonl'})")
    print(f"  policy        {policy}  (results.json)")
    print(f"  GRPO run      {grpo}  (metrics.jsonl, eval/*.png, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
