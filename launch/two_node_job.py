"""The ShapeEdit RL preset on simulated Ray nodes of this machine, submitted with `ray job submit`.

    python launch/two_node_job.py --data runs/demo/data --policy runs/demo/policy --jrm runs/demo/jrm/final
                                  [--nodes 2] [--steps 4] [--out docs/bench/two_node_job.json] [key=value ...]

Starts a loopback-only Ray cluster of a head (no CPUs: it hosts the job's driver and the job server) and
`--nodes` nodes with this machine's cores each (`ray.cluster_utils.Cluster`, as Ray's own tests simulate
nodes), submits launch/grpo_edit.py with `launch/configs/shapeedit.yaml`, `cluster.num_nodes=N`, one rollout
worker and one learner per node, through the job server (`ray job submit`, as on a real cluster), waits for it,
stops the cluster, and writes what the run's metrics say about the topology: each node's reward batching
(`reward/node_<n>/batch_mean`), the bytes the driver received and the bytes the learners fetched per step, the
step time. `make demo` (or its stages) makes the data, policy and JRM it needs. Extra `key=value` go to the job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/two_node_job.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

from ray.cluster_utils import Cluster  # noqa: E402

from launch.benchmarking import command_line, write_report  # noqa: E402
from reward.config import HelpFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8266  # the job server of this script's cluster (8265 is Ray's default, perhaps taken)


def summarize(run_dir: Path, nodes: int) -> dict:
    """Medians over the steps after the first (the first pays for start-up) of what the topology shows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_s" in r]
    later = steps[1:] or steps
    out = {"steps": len(steps), "final_eval": [r for r in rows if "eval/reward_mean" in r][-1]}
    for key in (
        "perf/step_s",
        "perf/driver_bytes",
        "perf/rollout_bytes",
        *(f"reward/node_{n}/batch_mean" for n in range(nodes)),
    ):
        values = [r[key] for r in later if key in r]
        out[key] = statistics.median(values) if values else None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="ShapeEdit data folder (python -m reward.shapeedit generate)")
    parser.add_argument("--policy", required=True, help="a pretrained ShapeEdit policy (launch/pretrain_policy.py)")
    parser.add_argument("--jrm", required=True, help="a JRM checkpoint (reward/train.py)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes")
    parser.add_argument("--steps", type=int, default=4, help="RL steps")
    parser.add_argument("--out", default="runs/bench/two_node_job.json", help="where the JSON report goes")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or args.nodes < 1 or args.steps < 2:
        parser.error(f"unknown arguments {bad}" if bad else "--nodes must be >= 1 and --steps >= 2")
    data, policy, jrm = (Path(p).resolve() for p in (args.data, args.policy, args.jrm))
    for path in (data / "train_prompts.json", policy, jrm):
        if not path.exists():
            parser.error(f"{path} not found: make demo (or its stages) makes the data, the policy and the JRM")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "run"
        overrides = [
            f"output_dir={out_dir}",
            f"policy.path={policy}",
            f"reward.terms=[{{name: jrm, spec: 'jrm:{jrm}', micro_batch_size: 64}}]",
            f"reward.gold=oracle:{data}",
            f"data.train_prompts={data / 'train_prompts.json'}",
            f"data.eval_prompts={data / 'test_heldout_prompts.json'}",
            f"num_rl_steps={args.steps}",
            f"eval_every={args.steps}",
            f"save_every={args.steps}",
            "wandb=false",
            f"cluster.num_nodes={args.nodes}",
            "cluster.num_rollout_workers=1",
            "cluster.num_learners=1",
            *extra,
        ]
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": DASHBOARD_PORT,
            },
        )
        try:
            for _ in range(args.nodes):
                cluster.add_node(num_cpus=os.cpu_count(), node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            ray = str(Path(sys.executable).parent / "ray")
            command = [
                ray,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{DASHBOARD_PORT}",
                "--working-dir",
                ".",
                "--",
                sys.executable,
                "launch/grpo_edit.py",
                "--config",
                "launch/configs/shapeedit.yaml",
                *overrides,
            ]
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, cwd=ROOT, env=env, check=True)
        finally:
            cluster.shutdown()
        result = {"nodes": args.nodes, **summarize(out_dir, args.nodes)}
    print(json.dumps(result, indent=1))
    path = write_report(
        args.out, "two_node_job", command_line(__file__, argv), {**vars(args), "overrides": extra}, result
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
