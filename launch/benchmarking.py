"""What every benchmark in launch/ shares: the machine's description, peak-memory measurement, a printed table
and a JSON report. The benchmarks themselves: bench_reward.py (JRM vs the generative judge),
bench_reward_actor.py (the Ray reward actor's batching), bench_rl_step.py (RL step phases, Ray overhead,
async, scaling, memory per role) and gpu_check.py (real sizes on one GPU). Their figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image


def machine() -> dict:
    """Where the figures come from: CPU, cores, threads, GPU, library versions."""
    import diffusers
    import transformers

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class PeakMemory:
    """Peak memory while the block runs: GPU bytes allocated by torch on CUDA; on CPU the peak resident set of
    this process, libraries included (sampled every `interval_s`, so a spike shorter than that can be missed).

        with PeakMemory(device) as mem: ...
        mem.peak_gib
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_bytes = self._peak

    @property
    def peak_gib(self) -> float:
        """Peak in GiB: GPU memory allocated, or the process's resident set on CPU."""
        return self.peak_bytes / 2**30


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    """n random RGB images of size x size pixels (speed does not depend on what they show)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def comma_list(parser: argparse.ArgumentParser, option: str, text: str, choices=None) -> list:
    """A comma-separated option's items: names out of `choices`, or positive integers without; else a usage error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if choices is not None:
        unknown = sorted(set(items) - set(choices))
        if unknown or not items:
            parser.error(f"{option}: unknown {unknown or 'empty list'}; choose from {sorted(choices)}")
        return items
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        parser.error(f"{option}: expected comma-separated positive integers, got {text!r}")
    return [int(item) for item in items]


def named_folders(parser: argparse.ArgumentParser, option: str, specs: list[str], marker: str, what: str) -> dict:
    """{NAME: DIR} from an option's NAME=DIR values, each DIR holding the file `marker`; else a usage error."""
    folders = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / marker).is_file():
            parser.error(f"{option} takes NAME=DIR of {what} (with {marker}), got {spec!r}")
        folders[name] = path
    return folders


def median(values: list[float]) -> float:
    """The median as a plain float (for JSON)."""
    return float(statistics.median(values))


def seconds(fn, device: str | torch.device, repeats: int) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs, after one warm-up run (lazy set-up, kernels,
    allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times)


def command_line(script: str, argv: list[str] | None) -> str:
    """How to rerun a benchmark from the repository root: `python launch/<script> <its arguments>`."""
    return " ".join([f"python launch/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """A plain-text table of `rows` (dicts) in `columns` order; floats with 3 significant decimals."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> Path:
    """`data` as indented JSON at `path`, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def write_report(path: str | Path, name: str, command: str, settings: dict, results: dict) -> Path:
    """The JSON a benchmark leaves behind: what ran, where, with which settings, and what it measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": name,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": settings,
        "results": results,
    }
    path.write_text(json.dumps(report, indent=1))
    return path


# An untrained ShapeEdit palette policy keeps each source pixel with probability ~0.98 (log(50 K)); at 3.0 it
# paints a few pixels in ten with random palette colours, so the drawn edits of one prompt differ.
KEEP_LOGIT = 3.0


def tiny_learning_run(root: Path, size: int = 32, hidden_size: int = 64) -> dict[str, Path]:
    """ShapeEdit prompts at size x size (root/data) and a random tiny palette policy for them (root/policy) that
    RL can move from its first step: its 'keep the source pixel' logit lowered to KEEP_LOGIT, so that with the
    palette's last step drawn (sampler.sample_last_step) every sample of a group is a different edit with a
    different oracle reward. The RL tests (tests/rl/runs.py) and the soak benchmark run on it."""
    from reward.shapeedit import GenerateConfig, generate

    generate(GenerateConfig(out=str(root / "data"), pairs=300, size=size, seed=0), progress=False)
    save_tiny_learning_policy(root / "policy", root / "data", size, hidden_size)
    return {"data": root / "data", "policy": root / "policy"}


def save_tiny_learning_policy(
    out: Path, data: Path, size: int = 32, hidden_size: int = 64, decision_code: bool = False
) -> None:
    """tiny_learning_run's policy for the prompts of `data`, saved to `out`; with decision_code, one that draws a
    decision code per edit (ShapeEditPolicyConfig.decision_code)."""
    from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig

    rows = json.loads((data / "train_prompts.json").read_text())
    cfg = ShapeEditPolicyConfig(
        image_size=size,
        patch_size=8,
        hidden_size=hidden_size,
        num_layers=2,
        text_hidden_size=32,
        text_layers=1,
        max_instruction_tokens=24,
        decision_code=decision_code,
    )
    policy = ShapeEditPolicy.build(cfg, [r["instruction"] for r in rows])
    with torch.no_grad():
        policy.transformer.pixel_head[-1].bias[0] = KEEP_LOGIT
    policy.save_pretrained(out)


# a node of a simulated cluster: 2 CPUs and 2 'GPUs' (a custom resource standing for them), on loopback
SIMULATED_NODE = {"num_cpus": 2, "resources": {"fake_gpu": 2}, "node_ip_address": "127.0.0.1"}


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A one-node Ray cluster of this machine on 127.0.0.1, no dashboard, this process its driver; shut down after.
    Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray, so that everything listens on loopback only."""
    import ray

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    ray.init(
        address="local",  # a new cluster: never join one this machine runs already (another test's, a demo's)
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        configure_logging=False,
        runtime_env={"env_vars": env},
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def simulated_cluster(num_nodes: int, node: dict = SIMULATED_NODE):
    """A Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster, as Ray's own tests do), this
    process connected to it as the driver; yields (cluster, node handles). The head holds no CPUs (the driver's),
    so every actor runs on an added node; health checks every 0.5 s declare a killed node dead in about a
    second (Ray's default takes ~15 s). Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray, so that
    everything listens on loopback only."""
    import ray
    from ray.cluster_utils import Cluster

    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2, "health_check_initial_delay_ms": 0}
    head = {"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "_system_config": health}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = [cluster.add_node(**node) for _ in range(num_nodes)]
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
        ray.init(address=cluster.address, configure_logging=False, runtime_env={"env_vars": env})
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
