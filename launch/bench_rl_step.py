"""One RL step, phase by phase, through the Ray pipeline and in one process: the same driver (rl/loop.py
`train(cfg, actor_set)`) on the Ray topology and on the in-process actor set (rl/actors.py); the gain from
overlapping reward with sampling (`cluster.async_reward`); step time vs the number of rollout actors, learner
ranks and simulated nodes; the bytes the driver receives; peak memory of each role.

    python launch/bench_rl_step.py [--size demo] [--steps 4]
                                   [--configs sync-1x1,async-1x1,async-2x1,async-1x2,async-2x2,sync-1x1@2]
                                   [--max-wait-s S] [--out runs/bench/rl_step.json]

Sizes (`--size demo`, the default): the demo's (launch/configs/shapeedit.yaml: 8 prompts x 8 edits per step,
micro-batches of 16, 8 SDE steps, 2 updates per step, LoRA rank 16; the ShapeEdit policy at its default 64x64 size; a
`small` JRM), with random weights, which cost what trained ones cost. Each actor uses one torch thread, as in the
demo. A config `MODE-RxL[@N]` runs R rollout actors and L learner ranks on each of N simulated nodes (Ray
nodes on this machine, `ray.cluster_utils.Cluster`; default 1), each node with its own reward actor; `sync`
waits for each micro-batch's scores before sampling the next. The in-process baseline is the `sync-1x1` work
in one process: rollout worker, reward worker and learner as plain objects, no Ray. `overhead` = the part of
the step outside the actors' own work (slowest worker's sampling and reward wait, slowest learner's update):
dispatch, transfers, weight sync and the driver; comparable across node counts. The first step of every run is a warm-up
and is left out of the medians. `--size tiny` is a smoke test of this script (tests/launch). Figures and their analysis:
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/bench_rl_step.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from launch.bench_reward import build_model  # noqa: E402
from launch.benchmarking import PeakMemory, command_line, median, table, write_report  # noqa: E402
from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig  # noqa: E402
from reward.config import HelpFormatter, load_config  # noqa: E402
from reward.shapeedit import GenerateConfig, generate  # noqa: E402
from rl.actors import local_actors  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rl.loop import train  # noqa: E402
from rl.ray_actors import ray_actors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "launch" / "configs" / "shapeedit.yaml"
ROLES = ("RolloutWorker", "RewardWorker", "Learner")
PHASES = ("step_s", "rollout_s", "sample_s", "reward_wait_s", "waiting_s", "update_s", "sync_s")
# policy size, JRM size (launch/bench_reward.py) and overrides of the preset, per --size
SIZES = {
    "demo": (ShapeEditPolicyConfig(), "small", []),
    "tiny": (
        ShapeEditPolicyConfig(
            image_size=32, hidden_size=64, num_layers=2, text_hidden_size=32, text_layers=1, max_instruction_tokens=24
        ),
        "tiny",
        [
            "policy.height=32",
            "policy.width=32",
            "policy.sampler.num_steps=3",
            "policy.trainable.lora_rank=4",
            "policy.eval_denoising_steps=3",
            "algo.prompts_per_step=2",
            "algo.group_size=4",
            "algo.micro_batch_size=4",
            "algo.updates_per_step=1",
        ],
    ),
}


def prepare(root: Path, size: str) -> dict[str, Path]:
    """ShapeEdit prompts, a random-init policy and a random JRM of `size`, under root."""
    policy, jrm, _ = SIZES[size]
    generate(GenerateConfig(out=str(root / "data"), pairs=300, size=policy.image_size, seed=0), progress=False)
    rows = json.loads((root / "data" / "train_prompts.json").read_text())
    ShapeEditPolicy.build(policy, [r["instruction"] for r in rows]).save_pretrained(root / "policy")
    build_model(jrm).save_pretrained(root / "jrm")
    return {"data": root / "data", "policy": root / "policy", "jrm": root / "jrm"}


def rl_config(
    paths: dict[str, Path],
    size: str,
    out: Path,
    steps: int,
    mode: str,
    workers: int,
    learners: int,
    max_wait_s: float | None,
    nodes: int = 1,
) -> RLConfig:
    """The demo preset (launch/configs/shapeedit.yaml) on the prepared files, resized by `size`, for one run."""
    data = paths["data"]
    return load_config(
        RLConfig,
        PRESET,
        [
            f"output_dir={out}",
            f"policy.path={paths['policy']}",
            f"reward.terms=[{{name: jrm, spec: 'jrm:{paths['jrm']}', micro_batch_size: 64}}]",
            "reward.gold=''",
            f"data.train_prompts={data / 'train_prompts.json'}",
            f"data.eval_prompts={data / 'test_heldout_prompts.json'}",
            "data.num_eval=8",
            f"num_rl_steps={steps}",
            f"eval_every={steps}",
            f"save_every={steps}",
            "wandb=false",
            f"cluster.num_rollout_workers={workers}",
            f"cluster.num_learners={learners}",
            f"cluster.async_reward={mode == 'async'}",
            f"cluster.num_nodes={nodes}",
            "policy.sampler.sample_last_step=false",
            "policy.sampler.gaussian_steps=true",  # the Gaussian steps a GPU policy trains, all of them
            "policy.sampler.sde_window_size=0",
            "policy.eval_samples=1",
            *SIZES[size][2],
            *([] if max_wait_s is None else [f"reward.max_wait_s={max_wait_s}"]),
        ],
    )


class RolePeaks:
    """Peak resident memory of each Ray actor role (the largest process of that role), polled every interval_s.
    Only this process's descendants count: the local Ray cluster it started, not another one on the machine."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peaks_gib = dict.fromkeys(ROLES, 0.0)

    def __enter__(self) -> RolePeaks:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.Process().children(recursive=True):
                try:
                    title, rss = " ".join(proc.cmdline()), proc.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    continue
                for role in ROLES:
                    if title.startswith(f"ray::{role}"):
                        self.peaks_gib[role] = max(self.peaks_gib[role], rss / 2**30)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def step_medians(cfg: RLConfig, name: str) -> dict:
    """Median per-phase seconds of a finished run (steps after the first), throughput, overhead and bytes."""
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_s" in r][1:]
    for r in steps:
        r["perf/waiting_s"] = r["perf/rollout_s"] - r["perf/sample_s"] - r["perf/reward_wait_s"]
        r["perf/overhead"] = 1 - (r["perf/sample_s"] + r["perf/reward_wait_s"] + r["perf/learn_s"]) / r["perf/step_s"]
    result = {
        "config": name,
        **{
            p: median([r[f"perf/{p}"] for r in steps])
            for p in (*PHASES, "learn_s", "overhead", "driver_bytes", "rollout_bytes")
        },
    }
    result["edits_s"] = cfg.algo.prompts_per_step * cfg.algo.group_size / result["step_s"]
    batches = [k for k in steps[0] if k.startswith("reward/node_")]
    result["reward_batch_mean"] = {k.split("/")[1]: median([r[k] for r in steps]) for k in batches}
    return result


def ray_run(cfg: RLConfig, name: str) -> dict:
    """step_medians of a Ray run, with peak memory per role."""
    with RolePeaks() as peaks, PeakMemory() as driver:
        train(cfg, ray_actors)
    result = step_medians(cfg, name)
    result.update({f"{role}_gib": peak for role, peak in peaks.peaks_gib.items()})
    result["driver_gib"] = driver.peak_gib
    return result


@contextlib.contextmanager
def simulated_nodes(n: int):
    """A Ray cluster of `n` nodes on this machine, on loopback: a head that holds no actor (0 CPUs: the driver's)
    and n nodes with this machine's cores each (ray.cluster_utils.Cluster, as Ray's own tests)."""
    env = {"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    try:
        for _ in range(n):
            cluster.add_node(num_cpus=os.cpu_count(), node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, runtime_env=env, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def in_process_run(cfg: RLConfig) -> dict:
    """The sync-1x1 work with no Ray: the same driver on the in-process actor set."""
    with PeakMemory() as memory:
        train(cfg, local_actors)
    result = step_medians(cfg, "in-process-1x1")
    result["driver_gib"] = memory.peak_gib
    return result


def markdown(report: dict) -> str:
    """The tables docs/performance.md holds: phases, overhead and bytes per config; peak memory per role."""
    rows = report["rows"]

    def num(value, digits=3) -> str:
        return "-" if value is None else f"{value:.{digits}g}"

    def percent(value) -> str:
        return "-" if value is None else f"{100 * value:+.1f}%"

    lines = [
        "| config | step s | sampling s | reward wait s | waiting s | update s | weight sync s | overhead | vs "
        "in-process | edits/s | driver bytes/step | rollout bytes/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {num(r['step_s'])} | {num(r['sample_s'])} | {num(r['reward_wait_s'], 2)} | "
            f"{num(r['waiting_s'], 2)} | {num(r['update_s'])} | {num(r['sync_s'], 2)} | {100 * r['overhead']:.1f}% | "
            f"{percent(r.get('vs_in_process'))} | {num(r['edits_s'])} | {int(r['driver_bytes']):,} | "
            f"{int(r['rollout_bytes']):,} |"
        )
    lines += [
        "",
        "| config | rollout worker GiB | reward actor GiB | learner GiB | driver GiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {num(r.get('RolloutWorker_gib'), 2)} | {num(r.get('RewardWorker_gib'), 2)} | "
            f"{num(r.get('Learner_gib'), 2)} | {num(r['driver_gib'], 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(SIZES), help="policy and reward model sizes")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per run (the first is a warm-up)")
    parser.add_argument(
        "--configs",
        default="sync-1x1,async-1x1,async-2x1,async-1x2,async-2x2,sync-1x1@2",
        help="MODE-RxL[@N], MODE sync or async, N simulated nodes",
    )
    parser.add_argument(
        "--max-wait-s", type=float, default=None, help="the reward actor's batching wait (default: the preset's)"
    )
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    parser.add_argument(
        "--out", default="runs/bench/rl_step.json", help="where the JSON report goes (settings, machine, results)"
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.max_wait_s is not None and args.max_wait_s < 0:
        parser.error("--max-wait-s must be >= 0")
    runs = []
    for name in args.configs.split(","):
        mode, _, shape = name.partition("-")
        shape, _, nodes = shape.partition("@")
        workers, _, learners = shape.partition("x")
        if mode not in ("sync", "async") or not (workers.isdigit() and learners.isdigit() and (nodes or "1").isdigit()):
            parser.error(f"config {name!r} is not MODE-RxL[@N] (e.g. async-2x1, sync-1x1@2)")
        runs.append((name, mode, int(workers), int(learners), int(nodes or 1)))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = prepare(root, args.size)
        if not args.no_in_process:
            results.append(
                in_process_run(
                    rl_config(paths, args.size, root / "in-process", args.steps, "sync", 1, 1, args.max_wait_s)
                )
            )
            print(table(results[-1:], list(results[-1])), flush=True)
        with simulated_nodes(max(r[4] for r in runs)):
            for name, mode, workers, learners, nodes in runs:
                results.append(
                    ray_run(
                        rl_config(
                            paths, args.size, root / name, args.steps, mode, workers, learners, args.max_wait_s, nodes
                        ),
                        name,
                    )
                )
                print(table(results[-1:], list(results[-1])), flush=True)
    by_name = {r["config"]: r for r in results}
    base = by_name.get("in-process-1x1")
    for r in results:
        if base is not None:
            r["vs_in_process"] = r["step_s"] / base["step_s"] - 1
        if "sync-1x1" in by_name:
            r["speedup_vs_sync_1x1"] = by_name["sync-1x1"]["step_s"] / r["step_s"]
    columns = [
        "config",
        *PHASES,
        "learn_s",
        "edits_s",
        "overhead",
        "vs_in_process",
        "speedup_vs_sync_1x1",
        "driver_bytes",
        "rollout_bytes",
    ]
    print(
        "\n"
        + table(
            results,
            columns,
            f"RL step phases (median seconds over steps 2..{args.steps}), {os.cpu_count()} cores, 1 thread per actor",
        )
    )
    memory = ["config", *(f"{role}_gib" for role in ROLES), "driver_gib"]
    print("\n" + table(results, memory, "Peak resident memory per role (GiB; in-process: the one process)"))
    path = write_report(args.out, "rl_step", command_line(__file__, argv), vars(args), {"rows": results})
    print("\n" + markdown({"rows": results}))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
