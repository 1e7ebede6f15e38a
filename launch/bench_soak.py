"""A soak under repeated faults: one RL run of >= 100 steps on 2 simulated nodes during which rollout workers, reward
actors, learners and a whole node are killed at random steps, each fault recovered by the run itself (a restarted
worker and a redone step, a retried reward call) or by `resume=auto` (a dead learner or node stops the run with a
checkpoint to continue from; a dead node is replaced first). The faulted run must end with the weights and metrics
of an uninterrupted run of the same seed, within the float noise two uninterrupted runs show.

    python launch/bench_soak.py [--steps 100] [--faults 9] [--seed 0] [--out docs/bench/soak.json]

The run is the RL tests' tiny ShapeEdit run (launch/benchmarking.py tiny_learning_run: a policy that learns from
its first step, the oracle as reward) on a Ray cluster of this machine (`ray.cluster_utils.Cluster`: a head with
no CPUs for the driver, 2 nodes of 2 CPUs and 2 'GPUs' each, as tests/rl/test_multinode.py), one rollout worker
and one learner rank per node. Writes faults injected and recovered (and how), steps redone, wall-clock overhead
and the largest metric and weight differences to the JSON report; docs/reliability.md shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/bench_soak.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import psutil  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from launch.benchmarking import SIMULATED_NODE, command_line, simulated_cluster, table, tiny_learning_run, write_report  # noqa: E402
from reward.config import load_config  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rl.loop import train  # noqa: E402
from rl.ray_actors import ray_actors  # noqa: E402

# what each kind of fault kills: the first process of this Ray title (an actor's process, busy or idle), or a node
TITLES = {"rollout-worker": "ray::RolloutWorker", "reward-actor": "ray::RewardWorker", "learner": "ray::Learner"}
KINDS = ["rollout-worker", "reward-actor", "learner", "node"]


def overrides(paths: dict[str, Path], out: Path, steps: int) -> list[str]:
    data = paths["data"]
    return [
        f"output_dir={out}",
        f"policy.path={paths['policy']}",
        "policy.height=32",
        "policy.width=32",
        "policy.sampler.num_steps=3",
        "policy.sampler.noise_level=0.9",
        "policy.sampler.sample_last_step=true",
        "policy.trainable.lora_rank=4",
        "policy.eval_denoising_steps=3",
        f"reward.terms=[{{name: oracle, spec: 'oracle:{data}'}}]",
        f"reward.gold=oracle:{data}",
        "reward.timeout_s=30",
        f"data.train_prompts={data / 'train_prompts.json'}",
        f"data.eval_prompts={data / 'test_heldout_prompts.json'}",
        "data.num_eval=4",
        "algo.prompts_per_step=2",
        "algo.group_size=4",
        "algo.micro_batch_size=2",
        "algo.updates_per_step=1",
        "algo.lr=0.01",
        f"num_rl_steps={steps}",
        "save_every=5",
        f"eval_every={max(steps // 4, 1)}",
        "keep_checkpoints=2",
        "wandb=false",
        "cluster.num_nodes=2",
        "cluster.num_rollout_workers=1",
        "cluster.num_learners=1",
        "cluster.gpus_per_node=2",
        "cluster.gpu_resource=fake_gpu",
        "cluster.reward_gpu=1",
        "cluster.placement_timeout_s=120",
    ]


def schedule(steps: int, faults: int, seed: int) -> list[dict]:
    """`faults` faults at distinct random steps in [3, steps - 3], every kind at least twice when there is room."""
    rng = random.Random(seed)
    kinds = (KINDS * faults)[:faults]
    rng.shuffle(kinds)
    at = sorted(rng.sample(range(3, steps - 2), faults))
    return [{"step": s, "kind": k} for s, k in zip(at, kinds)]


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


class Injector:
    """A thread that injects the scheduled faults as the run reaches their steps (read from metrics.jsonl)."""

    def __init__(self, run: Path, plan: list[dict], cluster: Cluster, nodes: list):
        self.run, self.plan, self.cluster, self.nodes = run, plan, cluster, nodes
        self.done: list[dict] = []
        self.node_down = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._inject_all, daemon=True)

    def __enter__(self) -> Injector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _inject_all(self) -> None:
        for fault in self.plan:
            while not self._stop.is_set() and (last_step(self.run) < fault["step"] or self.node_down.is_set()):
                time.sleep(0.01)
            if self._stop.is_set():
                return
            fault = {**fault, "at_step": last_step(self.run), "injected": self._inject(fault["kind"])}
            self.done.append(fault)
            print(
                f"[soak] fault {len(self.done)}: {fault['kind']} at step {fault['at_step']} "
                f"({'injected' if fault['injected'] else 'missed'})",
                flush=True,
            )

    def _inject(self, kind: str) -> bool:
        if kind == "node":
            self.node_down.set()
            self.cluster.remove_node(self.nodes[1], allow_graceful=False)
            return True
        deadline = time.time() + 30
        while time.time() < deadline:  # the actor may be restarting after an earlier fault
            for p in psutil.Process().children(recursive=True):
                try:
                    if p.cmdline() and p.cmdline()[0].startswith(TITLES[kind]):
                        p.kill()
                        return True
                except psutil.Error:
                    continue
            time.sleep(0.05)
        return False

    def repair(self) -> None:
        """Bring the cluster back to 2 nodes after a node fault."""
        if self.node_down.is_set():
            self.nodes[1] = self.cluster.add_node(**SIMULATED_NODE)
            self.node_down.clear()


class Tee(io.TextIOBase):
    """stdout, also kept, to count the run's own recoveries."""

    def __init__(self, out):
        self.out, self.text = out, []

    def write(self, s: str) -> int:
        self.text.append(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def run_to_the_end(cfg: RLConfig, injector: Injector | None) -> dict:
    """train(cfg, ray_actors), continued with resume=auto after every stop the faults cause; what it took."""
    start, resumes, redone = time.perf_counter(), [], 0
    while True:
        try:
            train(cfg, ray_actors)
            break
        except Exception as e:  # noqa: BLE001 - a fault stopped the run: resume it, as a user would
            if injector is None:
                raise
            reached = last_step(Path(cfg.output_dir))
            from rl import checkpoint

            found = checkpoint.find_resume(cfg.output_dir, "auto")
            resumed_at = int(json.loads((found / "state.json").read_text())["step"]) if found else 0
            redone += reached - resumed_at
            resumes.append(
                {"error": f"{type(e).__name__}: {str(e)[:200]}", "reached": reached, "resumed_from": resumed_at}
            )
            print(
                f"[soak] the run stopped at step {reached} ({type(e).__name__}); resume=auto from step {resumed_at}",
                flush=True,
            )
            injector.repair()
    return {"seconds": time.perf_counter() - start, "resumes": resumes, "steps_redone_after_resume": redone}


def differences(got: Path, want: Path) -> dict:
    """Largest differences of two runs: every non-timing metric of every row, and the final trainable weights."""

    def rows(run):
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("perf/", "reward/node_"))}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    a, b = rows(got), rows(want)
    if [r["step"] for r in a] != [r["step"] for r in b] or any(x.keys() != y.keys() for x, y in zip(a, b)):
        return {"same_rows": False, "max_metric_abs": float("inf"), "max_weight_abs": float("inf")}
    metric = max((abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if isinstance(x[k], (int, float))), default=0.0)
    last = sorted((got / "checkpoints").glob("step-*"))[-1].name
    wa, wb = (load_file(str(run / "checkpoints" / last / "policy.safetensors")) for run in (got, want))
    weight = max((wa[k] - wb[k]).abs().max().item() for k in wb)
    return {"same_rows": True, "max_metric_abs": metric, "max_weight_abs": weight}


RECOVERY = {
    "rollout-worker": "Ray restarts it, the step is redone",
    "reward-actor": "Ray restarts it, the call is retried",
    "learner": "the run stops, resume=auto",
    "node": "the run stops, a node is added, resume=auto",
}


def markdown(report: dict) -> str:
    """The table docs/reliability.md holds, from the JSON report."""
    r = report
    kinds = sorted({f["kind"] for f in r["faults"]})
    lines = ["| fault | injected | at steps | recovered by |", "| --- | --- | --- | --- |"]
    for kind in kinds:
        at = [f["at_step"] for f in r["faults"] if f["kind"] == kind]
        injected = sum(f["injected"] for f in r["faults"] if f["kind"] == kind)
        lines.append(f"| {kind} | {injected} of {len(at)} | {', '.join(map(str, at))} | {RECOVERY[kind]} |")
    s, noise = r["soaked"], r["noise"]
    lines += [
        "",
        f"{r['faults_injected']} faults in a {r['steps']}-step run: {len(r['resumes'])} resumes, {r['redos_in_run']} "
        f"steps redone in the run, {r['reward_retries']} reward calls retried, {r['steps_redone']} steps computed "
        f"twice in all; {r['seconds']['faulted']:.0f} s against {r['seconds']['uninterrupted']:.0f} s uninterrupted "
        f"(overhead {r['overhead']:+.0%}). Largest difference from the uninterrupted run: metrics "
        f"{s['max_metric_abs']:.3g}, weights {s['max_weight_abs']:.3g} (two uninterrupted runs: "
        f"{noise['max_metric_abs']:.3g} and {noise['max_weight_abs']:.3g}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="RL steps of each run")
    parser.add_argument(
        "--faults", type=int, default=9, help="faults injected into the soaked run (>= 8: every kind twice)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--out", default="docs/bench/soak.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.steps < 10 or not 1 <= args.faults <= args.steps - 6:
        parser.error(f"--steps must be >= 10 and --faults between 1 and steps - 6, got {args.steps} and {args.faults}")
    plan = schedule(args.steps, args.faults, args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        paths = tiny_learning_run(root)
        with simulated_cluster(2) as (cluster, nodes):
            runs = {}
            for name in ("uninterrupted", "uninterrupted-again"):
                runs[name] = run_to_the_end(
                    load_config(RLConfig, None, overrides(paths, root / name, args.steps)), None
                )
            faulted = root / "faulted"
            tee = Tee(sys.stdout)
            with Injector(faulted, plan, cluster, nodes) as injector, contextlib.redirect_stdout(tee):
                runs["faulted"] = run_to_the_end(
                    load_config(RLConfig, None, overrides(paths, faulted, args.steps)), injector
                )
            printed = "".join(tee.text)
        noise = differences(root / "uninterrupted-again", root / "uninterrupted")
        soaked = differences(faulted, root / "uninterrupted")
    faults = injector.done
    in_run = printed.count("redoing the step")
    result = {
        "steps": args.steps,
        "faults_planned": plan,
        "faults": faults,
        "faults_injected": sum(f["injected"] for f in faults),
        "resumes": runs["faulted"]["resumes"],
        "redos_in_run": in_run,
        "reward_retries": printed.count("reward call failed"),
        "steps_redone": runs["faulted"]["steps_redone_after_resume"] + in_run,
        "seconds": {k: round(v["seconds"], 1) for k, v in runs.items()},
        "overhead": round(runs["faulted"]["seconds"] / runs["uninterrupted"]["seconds"] - 1, 3),
        "noise": noise,
        "soaked": soaked,
        "recovered": soaked["same_rows"]
        and soaked["max_metric_abs"] <= max(noise["max_metric_abs"], 1e-6) * 10
        and soaked["max_weight_abs"] <= max(noise["max_weight_abs"], 1e-6) * 10,
    }
    print(
        table(
            [
                {"fault": f["kind"], "planned step": f["step"], "at step": f["at_step"], "injected": f["injected"]}
                for f in faults
            ],
            ["fault", "planned step", "at step", "injected"],
            f"{len(faults)} faults in a {args.steps}-step run on 2 simulated nodes",
        )
    )
    print(
        f"resumes {len(result['resumes'])}, redos in the run {in_run}, reward retries {result['reward_retries']}, "
        f"steps redone {result['steps_redone']}, wall-clock {result['seconds']} (overhead {result['overhead']:+.1%})"
    )
    print(
        f"largest differences: faulted vs uninterrupted {soaked}; two uninterrupted runs {noise}; recovered: "
        f"{result['recovered']}"
    )
    print(markdown(result))
    print(f"wrote {write_report(args.out, 'soak', command_line(__file__, argv), vars(args), result)}")
    return result


if __name__ == "__main__":
    main()
