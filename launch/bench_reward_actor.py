"""The Ray reward actor's batching: requests from C concurrent clients gathered into one scoring call
(`RewardWorker.score_batched`) against one request at a time (`RewardWorker.score`, the next request sent when
the previous one is answered), through the same actor on a local Ray cluster on 127.0.0.1.

    python launch/bench_reward_actor.py [--sizes small] [--clients 4,16,64] [--requests 128] [--request-size 1]
                                        [--max-wait-s 0.05] [--out runs/bench/reward_actor.json]

Each client is a closed loop, like a rollout worker: it sends a request of `--request-size` edits, waits for
its scores, sends the next. The actor scores with a JRM of the given size (random weights, saved and loaded
through its `jrm:PATH` spec as in an RL run). Reports edits/s, the speed-up over one request at a time, the
mean batch the actor scored, and per-request latency percentiles (submit to answer). docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/bench_reward_actor.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only (see launch/grpo_edit.py)

import numpy as np  # noqa: E402
import ray  # noqa: E402

from launch.bench_reward import SIZES, build_model, candidates  # noqa: E402
from launch.benchmarking import comma_list, command_line, median, table, write_report  # noqa: E402
from reward.config import HelpFormatter  # noqa: E402
from rl.config import RewardTerm  # noqa: E402
from rl.rewards import RewardWorker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def percentiles(latencies: list[float]) -> dict:
    """p50, p90 and p99 of latencies given in seconds, in milliseconds."""
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def one_at_a_time(actor, requests: list[tuple]) -> tuple[float, list[float]]:
    """Seconds for all requests sent one by one to `score`, and each request's latency."""
    latencies = []
    start = time.perf_counter()
    for request in requests:
        sent = time.perf_counter()
        ray.get(actor.score.remote(*request))
        latencies.append(time.perf_counter() - sent)
    return time.perf_counter() - start, latencies


def with_clients(actor, requests: list[tuple], clients: int) -> tuple[float, list[float]]:
    """Seconds for all requests sent by `clients` closed-loop clients to `score_batched`, and the latencies."""
    latencies: list[float] = []

    async def client(mine: list[tuple]) -> None:
        for request in mine:
            sent = time.perf_counter()
            await actor.score_batched.remote(*request)
            latencies.append(time.perf_counter() - sent)

    async def run_all() -> None:
        await asyncio.gather(*(client(requests[c::clients]) for c in range(clients)))

    start = time.perf_counter()
    asyncio.run(run_all())
    return time.perf_counter() - start, latencies


def round_trip_ms(actor, calls: int = 50) -> float:
    """Median milliseconds of an empty call to the actor: Ray's own cost per request."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(actor.__ray_ready__.remote())
        times.append(time.perf_counter() - start)
    return median(times) * 1000


def batch_sizes_since(actor, seen: int) -> list[int]:
    """The sizes of the scoring calls the actor made after its first `seen` calls."""
    return ray.get(actor.__ray_call__.remote(lambda worker: worker.batch_sizes[seen:]))


def bench_size(
    size: str,
    clients: list[int],
    num_requests: int,
    request_size: int,
    max_batch: int,
    micro_batch: int,
    max_wait_s: float,
    threads: int,
) -> list[dict]:
    """Rows for one JRM size: one request at a time, then batched with each number of clients, on one actor."""
    with tempfile.TemporaryDirectory() as tmp:
        build_model(size).save_pretrained(tmp)
        actor = (
            ray.remote(RewardWorker)
            .options(max_concurrency=max(clients) + 1)
            .remote(
                [RewardTerm(name="jrm", spec=f"jrm:{tmp}", micro_batch_size=micro_batch)],
                "cpu",
                max_batch,
                max_wait_s,
                threads,
            )
        )
        ray.get(actor.__ray_ready__.remote())
    n = num_requests * request_size
    sources, instructions, edits = candidates(n, SIZES[size]["image"])
    requests = [
        (sources[i : i + request_size], instructions[i : i + request_size], edits[i : i + request_size])
        for i in range(0, n, request_size)
    ]
    one_at_a_time(actor, requests[:4])  # warm-up: first calls pay for lazy initialisation
    with_clients(actor, requests[: 2 * max(clients)], max(clients))
    seen = len(batch_sizes_since(actor, 0))

    seconds, latencies = one_at_a_time(actor, requests)
    seen += len(requests)
    base = n / seconds
    empty_ms = round_trip_ms(actor)
    rows = [
        {
            "size": size,
            "mode": "one at a time",
            "clients": 1,
            "edits_s": base,
            "speedup": 1.0,
            "mean_batch": float(request_size),
            **percentiles(latencies),
            "empty_call_ms": empty_ms,
        }
    ]
    for c in clients:
        seconds, latencies = with_clients(actor, requests, c)
        sizes = batch_sizes_since(actor, seen)
        seen += len(sizes)
        rows.append(
            {
                "size": size,
                "mode": "batched",
                "clients": c,
                "edits_s": n / seconds,
                "speedup": n / seconds / base,
                "mean_batch": float(np.mean(sizes)),
                **percentiles(latencies),
            }
        )
    ray.kill(actor)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default="small", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--clients", default="4,16,64", help="concurrent clients of the batched runs")
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--request-size", type=int, default=1, help="edits per request")
    parser.add_argument(
        "--max-batch-size", type=int, default=64, help="edits the actor gathers into one call (reward.max_batch_size)"
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=64, help="edits the JRM forwards at once (the term's micro_batch_size)"
    )
    parser.add_argument("--max-wait-s", type=float, default=0.05, help="the actor's max_wait_s (reward.max_wait_s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the actor (default: all cores)")
    parser.add_argument(
        "--out", default="runs/bench/reward_actor.json", help="where the JSON report goes (settings, machine, results)"
    )
    args = parser.parse_args(argv)
    sizes = comma_list(parser, "--sizes", args.sizes, SIZES)
    clients = comma_list(parser, "--clients", args.clients)
    if min(args.requests, args.request_size, args.max_batch_size, args.micro_batch_size) < 1 or args.max_wait_s < 0:
        parser.error(
            "--requests, --request-size, --max-batch-size and --micro-batch-size must be positive, --max-wait-s >= 0"
        )
    threads = args.threads or os.cpu_count()
    env = {"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}}
    ray.init(  # a cluster of its own, even where this machine runs another
        address="local", _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False, runtime_env=env
    )
    try:
        rows = [
            row
            for size in sizes
            for row in bench_size(
                size,
                clients,
                args.requests,
                args.request_size,
                args.max_batch_size,
                args.micro_batch_size,
                args.max_wait_s,
                threads,
            )
        ]
    finally:
        ray.shutdown()
    columns = [
        "size",
        "mode",
        "clients",
        "edits_s",
        "speedup",
        "mean_batch",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "empty_call_ms",
    ]
    title = (
        f"Ray reward actor: {args.requests} requests of {args.request_size} edit(s), max_wait_s {args.max_wait_s}, "
        f"{threads} threads"
    )
    print("\n" + table(rows, columns, title))
    path = write_report(args.out, "reward_actor", command_line(__file__, argv), vars(args), {"rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
