"""One RL step, phase by phase, through the Ray pipeline (rl/loop.py) and through an in-process loop doing
the same work; the gain from overlapping reward with sampling (`cluster.async_reward`); step time vs the
number of rollout actors and learner ranks; peak memory of each role.

    python launch/bench_rl_step.py [--size demo] [--steps 4] [--configs sync-1x1,async-1x1,async-2x1,async-1x2,async-2x2]
                                   [--max-wait-s S] [--out runs/bench/rl_step.json]

Sizes (`--size demo`, the default): the demo's (launch/configs/shapeedit.yaml: 8 prompts x 8 edits per step, micro-batches of 16,
8 SDE steps, 2 updates per step, LoRA rank 16; the ShapeEdit policy at its default 64x64 size; a `small`
JRM), with random weights, which cost what trained ones cost. Each actor uses one torch thread, as in the
demo. A config `MODE-RxL` runs R rollout actors and L learner ranks; `sync` waits for each micro-batch's
scores before sampling the next. The in-process baseline is the `sync-1x1` work in one process: rollout
worker, reward worker and learner as plain objects, no Ray. The first step of every run is a warm-up and is
left out of the medians. `--size tiny` is a smoke test of this script (tests/launch). Figures and their analysis: docs/performance.md.
"""

from __future__ import annotations

import argparse
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

from launch.bench_reward import build_model  # noqa: E402
from launch.benchmarking import PeakMemory, command_line, median, table, write_report  # noqa: E402
from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig  # noqa: E402
from reward.config import HelpFormatter, load_config  # noqa: E402
from reward.shapeedit import GenerateConfig, generate  # noqa: E402
from rl.algorithms import MicroTargets  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rl.learner import Learner  # noqa: E402
from rl.loop import free_port, train  # noqa: E402
from rl.prompts import load_prompts, prompts_for_step  # noqa: E402
from rl.rewards import RewardWorker, Scores, total_rewards  # noqa: E402
from rl.workers import RolloutWorker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "launch" / "configs" / "shapeedit.yaml"
ROLES = ("RolloutWorker", "RewardWorker", "Learner")
PHASES = ("step_s", "rollout_s", "sample_s", "reward_wait_s", "waiting_s", "update_s", "sync_s")
# policy size, JRM size (launch/bench_reward.py) and overrides of the preset, per --size
SIZES = {
    "demo": (ShapeEditPolicyConfig(), "small", []),
    "tiny": (
        ShapeEditPolicyConfig(image_size=32, hidden_size=64, num_layers=2, text_hidden_size=32, text_layers=1, max_instruction_tokens=24),
        "tiny",
        ["policy.height=32", "policy.width=32", "policy.sampler.num_steps=3", "policy.lora_rank=4", "policy.eval_steps=3",
         "algo.prompts_per_step=2", "algo.group_size=4", "algo.micro_batch_size=4", "algo.updates_per_step=1"],
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


def rl_config(paths: dict[str, Path], size: str, out: Path, steps: int, mode: str, workers: int, learners: int, max_wait_s: float | None) -> RLConfig:
    """The demo preset (launch/configs/shapeedit.yaml) on the prepared files, resized by `size`, for one run."""
    data = paths["data"]
    return load_config(
        RLConfig,
        PRESET,
        [
            f"output_dir={out}", f"policy.path={paths['policy']}", f"reward.terms=[{{name: jrm, spec: 'jrm:{paths['jrm']}', micro_batch_size: 64}}]", "reward.gold=''",
            f"data.train_prompts={data / 'train_prompts.json'}", f"data.eval_prompts={data / 'test_heldout_prompts.json'}", "data.num_eval=8",
            f"num_steps={steps}", f"eval_every={steps}", f"save_every={steps}", "wandb=false",
            f"cluster.num_rollout_workers={workers}", f"cluster.num_learners={learners}", f"cluster.async_reward={mode == 'async'}",
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


def ray_run(cfg: RLConfig, name: str) -> dict:
    """Median per-phase seconds of a Ray run (steps after the first), throughput and peak memory per role."""
    with RolePeaks() as peaks, PeakMemory() as driver:
        train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_s" in r][1:]
    for r in steps:
        r["perf/waiting_s"] = r["perf/rollout_s"] - r["perf/sample_s"] - r["perf/reward_wait_s"]
    result = {"config": name, **{p: median([r[f"perf/{p}"] for r in steps]) for p in PHASES}}
    result["edits_s"] = cfg.algo.prompts_per_step * cfg.algo.group_size / result["step_s"]
    result.update({f"{role}_gib": peak for role, peak in peaks.peaks_gib.items()})
    result["driver_gib"] = driver.peak_gib
    return result


class LocalRewardClient:
    """The rollout worker's reward client without Ray: scores at submit, in this process."""

    def __init__(self, worker: RewardWorker):
        self.worker = worker

    def submit(self, sources, instructions, edited):
        return self.worker.score(sources, instructions, edited)

    def result(self, scores):
        return scores


def in_process_run(cfg: RLConfig) -> dict:
    """The sync-1x1 step's work with no Ray: the same objects, called in order in this process."""
    algo, P, G = cfg.algo, cfg.algo.prompts_per_step, cfg.algo.group_size
    with PeakMemory() as memory:
        reward = RewardWorker(cfg.reward.terms, "cpu", cfg.reward.max_batch_size, cfg.reward.max_wait_s, threads=1)
        worker = RolloutWorker(cfg.policy, cfg.seed, LocalRewardClient(reward), threads=1)
        learner = Learner(cfg, 0, 1, free_port(), threads=1)
        worker.set_weights(learner.trainable_state(), 0)
        prompts, _ = load_prompts(cfg.data.train_prompts, cfg.policy.height, cfg.policy.width)
        times = []
        for step in range(cfg.num_steps):
            t0 = time.perf_counter()
            rows = [prompts[i] for i in prompts_for_step(len(prompts), step, P, cfg.seed) for _ in range(G)]
            group_ids = torch.arange(P).repeat_interleave(G)
            result = worker.rollout(rows, group_ids, algo.micro_batch_size, step, overlap=False)
            t_rollout = time.perf_counter()
            total = total_rewards(Scores.cat(result.scores).terms, {t.name: t.weight for t in cfg.reward.terms}, group_ids).total
            targets = learner.algorithm.targets(total, group_ids).values.split(algo.micro_batch_size)
            learner.update(result.rollouts, [MicroTargets(v, cfg.seed * 1_000_003 + step * 1009 + i) for i, v in enumerate(targets)])
            t_update = time.perf_counter()
            worker.set_weights(learner.trainable_state(), step + 1)
            t_sync = time.perf_counter()
            times.append(
                {"step_s": t_sync - t0, "rollout_s": t_rollout - t0, "sample_s": result.sample_s, "reward_wait_s": result.wait_s,
                 "waiting_s": t_rollout - t0 - result.sample_s - result.wait_s, "update_s": t_update - t_rollout, "sync_s": t_sync - t_update}
            )
    torch.distributed.destroy_process_group()
    steps = times[1:]
    result = {"config": "in-process-1x1", **{p: median([t[p] for t in steps]) for p in PHASES}}
    result["edits_s"] = P * G / result["step_s"]
    result["driver_gib"] = memory.peak_gib
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(SIZES), help="policy and reward model sizes")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per run (the first is a warm-up)")
    parser.add_argument("--configs", default="sync-1x1,async-1x1,async-2x1,async-1x2,async-2x2", help="MODE-RxL, MODE sync or async")
    parser.add_argument("--max-wait-s", type=float, default=None, help="the reward actor's batching wait (default: the preset's)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    parser.add_argument("--out", default="runs/bench/rl_step.json", help="where the JSON report goes (settings, machine, results)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.max_wait_s is not None and args.max_wait_s < 0:
        parser.error("--max-wait-s must be >= 0")
    runs = []
    for name in args.configs.split(","):
        mode, _, shape = name.partition("-")
        workers, _, learners = shape.partition("x")
        if mode not in ("sync", "async") or not (workers.isdigit() and learners.isdigit()):
            parser.error(f"config {name!r} is not MODE-RxL (e.g. async-2x1)")
        runs.append((name, mode, int(workers), int(learners)))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = prepare(root, args.size)
        if not args.no_in_process:
            results.append(in_process_run(rl_config(paths, args.size, root / "in-process", args.steps, "sync", 1, 1, args.max_wait_s)))
            print(table(results[-1:], list(results[-1])), flush=True)
        env = {"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}}
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False, runtime_env=env)
        try:
            for name, mode, workers, learners in runs:
                results.append(ray_run(rl_config(paths, args.size, root / name, args.steps, mode, workers, learners, args.max_wait_s), name))
                print(table(results[-1:], list(results[-1])), flush=True)
        finally:
            ray.shutdown()
    by_name = {r["config"]: r for r in results}
    base = by_name.get("in-process-1x1")
    for r in results:
        if base is not None:
            r["vs_in_process"] = r["step_s"] / base["step_s"] - 1
        if "sync-1x1" in by_name:
            r["speedup_vs_sync_1x1"] = by_name["sync-1x1"]["step_s"] / r["step_s"]
    columns = ["config", *PHASES, "edits_s", "vs_in_process", "speedup_vs_sync_1x1"]
    print("\n" + table(results, columns, f"RL step phases (median seconds over steps 2..{args.steps}), {os.cpu_count()} cores, 1 thread per actor"))
    memory = ["config", *(f"{role}_gib" for role in ROLES), "driver_gib"]
    print("\n" + table(results, memory, "Peak resident memory per role (GiB; in-process: the one process)"))
    path = write_report(args.out, "rl_step", command_line(__file__, argv), vars(args), {"rows": results})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
