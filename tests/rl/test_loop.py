"""The whole Ray path on a tiny ShapeEdit setup: on-policy ratio 1, weights move, ZeRO-2 with 2 ranks equals
1 rank (and 1 rank in process), a reward actor that times out is retried and then stops the run, the local cluster
listens on loopback only, and real faults (SIGKILL of a rollout worker, the reward actor, a learner, or the
driver mid-checkpoint) leave the run's metrics and weights equal to the uninterrupted run's. Every run compared
is first checked to have learned (tests/rl/runs.py: a gradient at every step, reward spread, weights moved)."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from launch.benchmarking import local_ray
from reward.config import load_config
from rl import checkpoint
from rl.actors import local_actors
from rl.algorithms import MicroTargets
from rl.compare import read_metrics
from rl.config import RLConfig
from rl.loop import Run, train
from rl.ray_actors import RayRewardClient, RewardUnavailable, ray_actors
from rl.workers import build_policy
from tests.rl.runs import (
    assert_learned,
    assert_same_metrics,
    assert_same_weights,
    metrics,
    overrides,
    refreshed_overrides,
    run_in_process,
    tiny_data_and_policy,
    tiny_jrm,
    weights,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tiny_data_and_policy(tmp_path_factory.mktemp("rl"))
    with local_ray():
        yield root


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    """The uninterrupted 3-step run every fault test must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    train(load_config(RLConfig, None, overrides(setup, out)), ray_actors)
    assert_learned(out)
    return out


def kill_after_first_checkpoint(out: Path, args: list[str]) -> None:
    """Run launch/grpo_edit.py with `args` on this Ray cluster and SIGKILL it as soon as its step-1 checkpoint
    is complete (asserting step 2 was not saved yet, so the resume has work to redo)."""
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "grpo_edit.py"), *args, f"cluster.address={address}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000001" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "the run to be killed ended or stalled before its first checkpoint"
        )
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-000002").exists(), "killed too late: step 2 was already saved"


def test_the_ray_run_equals_the_in_process_run(setup, whole, tmp_path):
    """The same driver on the Ray topology and on in-process actors (rl/actors.py local_actors): the same
    seeds, samples, rewards and updates, so the same metrics and weights, step by step. Weights to 1e-5: AdamW
    divides by sqrt(v), so a gradient element near 0 turns a last-bit difference between two processes' float
    sums into a few 1e-6 of weight (measured: 2.3e-6 on one element of 1,024); a lost micro-batch moves them by
    2e-2 (tests/rl/test_local_runs.py)."""
    local = run_in_process(setup, tmp_path / "local")
    assert_learned(local)
    assert_same_metrics(whole, local)
    for step in (1, 2, 3):
        assert_same_weights(weights(whole, step), weights(local, step), atol=1e-5)


def skip_shard_of_rank_1():
    """The plant for the 2-rank comparison: Run.update as it is, but the micro-batches learner rank 1 takes
    (every 2nd: Run.update's order) carry zero targets, so with GRPO and kl_beta 0 rank 1 contributes no gradient."""
    update = Run.update

    def skipping(self, step, micro, targets):
        return update(
            self, step, micro, [MicroTargets(t.values * 0, t.seed) if i % 2 else t for i, t in enumerate(targets)]
        )

    return skipping


def test_grpo_on_policy_updates_ranks_and_resume(setup, whole, tmp_path, monkeypatch):
    root, a = setup, whole
    rows = [r for r in metrics(a) if "train/ratio_min" in r]
    assert len(rows) == 3
    for r in rows:  # one update per batch: every ratio is computed before the optimizer moves
        assert r["train/ratio_min"] == 1.0 and r["train/ratio_max"] == 1.0, r
    assert [r["rollout/policy_version"] for r in rows] == [0, 1, 2]
    assert (a / "eval" / "step-000003.png").is_file()

    # 2 learner ranks under ZeRO-2 on the same global batch (same rollout workers, so the same samples): the same
    # update; and with rank 1's shard skipped, not the same (the comparison bites)
    b = tmp_path / "b"
    train(load_config(RLConfig, None, overrides(root, b, "cluster.num_learners=2", "num_rl_steps=1")), ray_actors)
    assert_learned(b)
    assert_same_weights(weights(b, 1), weights(a, 1), atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(Run, "update", skip_shard_of_rank_1())
        planted = tmp_path / "planted"
        train(
            load_config(RLConfig, None, overrides(root, planted, "cluster.num_learners=2", "num_rl_steps=1")),
            ray_actors,
        )
    assert_learned(planted)
    with pytest.raises(AssertionError):
        assert_same_weights(weights(planted, 1), weights(a, 1), atol=1e-6)

    # kill a run (SIGKILL) once it has a checkpoint, resume it with resume=auto: the same metrics as run a
    c = tmp_path / "c"
    kill_after_first_checkpoint(c, overrides(root, c))
    train(load_config(RLConfig, None, overrides(root, c)), ray_actors)
    assert_learned(c)
    assert_same_metrics(c, a)
    assert_same_weights(weights(c, 3), weights(a, 3), atol=1e-6)


def nan_targets_on_rank_1_at_step_1():
    """The plant for the NaN guard: at step 1 the micro-batches learner rank 1 takes (every 2nd) get NaN targets,
    so only that rank's loss is NaN; every other step is left as it is."""
    update = Run.update

    def poisoned(self, step, micro, targets):
        if step == 0:
            targets = [MicroTargets(t.values * float("nan"), t.seed) if i % 2 else t for i, t in enumerate(targets)]
        return update(self, step, micro, targets)

    return poisoned


@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_loss_on_one_rank_skips_the_update_on_every_rank(setup, tmp_path, monkeypatch, stage):
    """2 learner ranks, a NaN loss on rank 1 only (step 1): no crash, no hang; both ranks skip that optimizer step
    (the weights stay the initial ones), log it, and step 2 trains as usual."""
    out = tmp_path / f"z{stage}"
    monkeypatch.setattr(Run, "update", nan_targets_on_rank_1_at_step_1())
    train(
        load_config(
            RLConfig,
            None,
            overrides(setup, out, f"cluster.zero_stage={stage}", "cluster.num_learners=2", "num_rl_steps=2"),
        ),
        ray_actors,
    )
    first, second = [r for r in metrics(out) if "train/skipped_updates" in r]
    assert first["train/skipped_updates"] == 1 and first["train/nonfinite_losses"] > 0, first
    assert (
        second["train/skipped_updates"] == 0 and second["train/nonfinite_losses"] == 0 and second["train/grad_norm"] > 0
    )
    fresh = build_policy(load_config(RLConfig, out / "config.yaml", []).policy, seed=0).trainable_state()
    assert_same_weights(weights(out, 1), fresh, atol=0)
    assert any(not torch.equal(weights(out, 2)[k], fresh[k]) for k in fresh)


def test_zero3_on_two_ranks_equals_zero2_and_resumes_exactly(setup, whole, tmp_path):
    """ZeRO-3 partitions the trained weights over the ranks and gathers them in the policy's forward: the same
    weights as ZeRO-2 (1 rank: the uninterrupted run) step by step, and a run stopped after step 1 and resumed
    from its ZeRO-3 checkpoint ends where the uninterrupted ZeRO-3 run does. (That this tolerance catches a
    dropped micro-batch gradient: tests/rl/test_comparisons_bite.py.)"""
    root = setup
    z3 = ("cluster.zero_stage=3", "cluster.num_learners=2")
    full = tmp_path / "z3"
    train(load_config(RLConfig, None, overrides(root, full, *z3, "num_rl_steps=2")), ray_actors)
    assert_learned(full)
    for step in (1, 2):
        assert_same_weights(weights(full, step), weights(whole, step), atol=1e-5)
    resumed = tmp_path / "z3-resumed"  # the run as it stood after step 1: its step-1 checkpoint, no step 2
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    train(load_config(RLConfig, None, overrides(root, resumed, *z3, "num_rl_steps=2")), ray_actors)
    assert_learned(resumed)
    assert_same_weights(weights(resumed, 2), weights(full, 2), atol=0)
    assert_same_metrics(resumed, full)


def test_nft_on_two_ray_ranks_equals_one_rank_in_process(setup, tmp_path):
    """DiffusionNFT on the same loop: 2 learner ranks on Ray equal 1 rank in process (rl/actors.py
    local_actors) on the same batch: the same rollout seeds, so the same samples and the same update.
    (NFT's resume and per-prompt scores: tests/rl/test_local_runs.py.)"""
    nft = ("algo.name=nft", "algo.nft_terms=2", "algo.kl_beta=0.01", "num_rl_steps=1")
    local = run_in_process(setup, tmp_path / "local", *nft)
    assert_learned(local)
    b = tmp_path / "b"
    train(load_config(RLConfig, None, overrides(setup, b, *nft, "cluster.num_learners=2")), ray_actors)
    assert_learned(b)
    assert_same_weights(weights(b, 1), weights(local, 1), atol=1e-6)
    assert_same_metrics(b, local, rel=1e-5, abs=1e-7)


class SlowReward:
    def __init__(self):
        self.calls = 0

    async def score_batched(self, *args):
        self.calls += 1
        await asyncio.sleep(30)

    def count(self):
        return self.calls


def test_reward_timeouts_are_retried_then_raise(setup):
    actor = ray.remote(SlowReward).options(max_concurrency=8).remote()
    assert ray.get(actor.count.remote()) == 0  # started: the timeouts below measure scoring, not start-up
    client = RayRewardClient(actor, timeout_s=0.5, retries=2)
    start = time.perf_counter()
    with pytest.raises(RewardUnavailable, match="failed 3 times"):
        client.result(client.submit([1], ["x"], [1]))
    assert time.perf_counter() - start >= 1.5  # 3 calls, each given up after its full 0.5 s
    assert ray.get(actor.count.remote()) == 3  # the first call and two retries reached the actor
    ray.kill(actor)


def test_the_local_cluster_listens_on_loopback_only(setup):
    """Ray would bind its GCS, raylet, agents and workers to every interface; ours stay on 127.0.0.1."""

    @ray.remote
    class Probe:
        def pid(self):
            return os.getpid()

    probe = Probe.remote()
    worker = ray.get(probe.pid.remote())
    processes = psutil.Process().children(recursive=True)
    assert worker in {p.pid for p in processes}
    listening = [
        (p.name(), c.laddr) for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    ]
    assert len(listening) >= 3  # GCS, raylet, the actor's worker at least
    exposed = [(name, addr) for name, addr in listening if addr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    ray.kill(probe)


def ours() -> list[psutil.Process]:
    """Processes of the Ray cluster this test module started (never another cluster on the machine)."""
    return psutil.Process().children(recursive=True)


def title(p: psutil.Process) -> str:
    try:
        cmdline = p.cmdline()
    except psutil.Error:  # gone meanwhile
        return ""
    return cmdline[0] if cmdline else ""


def kill(p: psutil.Process) -> bool:
    try:
        p.kill()
        return True
    except psutil.Error:
        return False


def kill_when(after: Path, process: str, until: threading.Event | None = None) -> tuple[threading.Thread, list]:
    """A thread that SIGKILLs the first process whose title starts with `process` (Ray titles a worker
    `ray::Class.method` while it runs that method) once the file `after` exists; the list gets its pid.
    With `until`, it goes on killing every such process (each restart) until that event is set."""
    killed = []

    def watch():
        deadline = time.time() + 240
        while time.time() < deadline and (not killed if until is None else not until.is_set()):
            for p in ours() if after.exists() else []:
                if title(p).startswith(process) and kill(p):
                    killed.append(p.pid)
                    break
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.parametrize(
    "process, recovery",
    [
        (
            "ray::RolloutWorker.rollout",
            "redoing the step (1/3)",
        ),  # Ray reruns it on the restarted worker, stale weights
        ("ray::RewardWorker", "reward call failed"),  # the caller's retry reaches the restarted reward actor
    ],
    ids=["rollout-worker", "reward-actor"],
)
def test_an_actor_killed_mid_step_is_restarted_and_the_run_unchanged(setup, whole, tmp_path, capfd, process, recovery):
    """SIGKILL an actor's process during step 2 (after checkpoint 1): Ray restarts it, the step is redone or the
    call retried with the same seeds, and the metrics equal the uninterrupted run's: no sample lost or counted twice."""
    want_dir, got_dir = whole, tmp_path / "killed"
    killer, killed = kill_when(got_dir / "checkpoints" / "step-000001" / "state.json", process)
    train(load_config(RLConfig, None, overrides(setup, got_dir)), ray_actors)
    killer.join()
    assert killed, f"no {process} process was caught: the fault was not injected"
    assert recovery in capfd.readouterr().out
    assert_learned(got_dir)
    assert_same_metrics(got_dir, want_dir)
    assert_same_weights(weights(got_dir, 3), weights(want_dir, 3), atol=1e-6)


def test_a_learner_killed_mid_step_stops_the_run_and_resume_reproduces_it(setup, whole, tmp_path):
    """A learner's optimizer state dies with it, so the run stops with a clear error (never a silent restart);
    resume=auto from the last checkpoint then ends exactly like the uninterrupted run."""
    want_dir, got_dir = whole, tmp_path / "killed"
    killer, killed = kill_when(got_dir / "checkpoints" / "step-000001" / "state.json", "ray::Learner.update")
    with pytest.raises(RuntimeError, match=r"a learner died during step \d.*resume=auto continues from .*step-00000\d"):
        train(load_config(RLConfig, None, overrides(setup, got_dir)), ray_actors)
    killer.join()
    assert killed
    train(load_config(RLConfig, None, overrides(setup, got_dir)), ray_actors)  # resume=auto is the default
    assert_learned(got_dir)
    assert_same_metrics(got_dir, want_dir)
    assert_same_weights(weights(got_dir, 3), weights(want_dir, 3), atol=1e-6)


def test_a_driver_killed_while_writing_a_checkpoint_never_loads_it(setup, whole, tmp_path):
    """SIGKILL the driver while checkpoints/.tmp-step-N exists (the checkpoint half written): resume=auto takes
    the previous complete checkpoint, and the run ends exactly like the uninterrupted one."""
    want_dir, got_dir = whole, tmp_path / "killed"
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "launch" / "grpo_edit.py"),
            *overrides(setup, got_dir, f"cluster.address={address}"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    staging = got_dir / "checkpoints" / ".tmp-step-000002"
    deadline = time.time() + 300
    while not staging.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before writing checkpoint 2"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (got_dir / "checkpoints" / "step-000002").exists(), (
        "the kill came after the rename: nothing was half-written"
    )
    assert checkpoint.find_resume(got_dir, "auto").name == "step-000001"
    train(load_config(RLConfig, None, overrides(setup, got_dir)), ray_actors)
    assert not staging.exists()
    assert_learned(got_dir)
    assert_same_metrics(got_dir, want_dir)
    assert_same_weights(weights(got_dir, 3), weights(want_dir, 3), atol=1e-6)


def test_a_reward_actor_that_stays_dead_stops_the_run_resumably(setup, whole, tmp_path):
    """Kill the reward actor every time Ray restarts it: the retries run out, the run stops naming the reward
    actor and keeps a checkpoint, and resume=auto (with a healthy reward) ends like the uninterrupted run."""
    run = tmp_path / "run"
    stop = threading.Event()
    killer, _ = kill_when(run / "checkpoints" / "step-000001" / "state.json", "ray::RewardWorker", until=stop)
    try:
        with pytest.raises(Exception, match=r"the reward actor failed 3 times|RewardWorker.*died"):
            train(load_config(RLConfig, None, overrides(setup, run, "reward.timeout_s=5")), ray_actors)
    finally:
        stop.set()
        killer.join()
    assert checkpoint.find_resume(run, "auto") is not None
    train(load_config(RLConfig, None, overrides(setup, run)), ray_actors)
    read_metrics(run / "metrics.jsonl")  # one run's metrics: no metric logged twice for a step (rl/compare.py)
    assert_learned(run)
    assert_same_metrics(run, whole)
    assert_same_weights(weights(run, 3), weights(whole, 3), atol=1e-6)


def test_a_reward_trainer_killed_during_a_refresh_is_restarted_and_the_run_unchanged(setup, tmp_path, capfd):
    """Online reward refresh on Ray (rl/refresh.py): SIGKILL the reward trainer while it refreshes after step 2.
    Ray restarts it, it takes back its state after step 1's refresh, the refresh is asked again, and the run's
    metrics and weights (policy and reward) equal the same run in process, which checks the Ray path besides."""
    root = tiny_jrm(setup)
    local = tmp_path / "local"
    train(load_config(RLConfig, None, refreshed_overrides(root, local)), local_actors)
    assert_learned(local)
    got_dir = tmp_path / "killed"
    killer, killed = kill_when(got_dir / "refresh" / "state-000001", "ray::RewardTrainer.refresh")
    train(load_config(RLConfig, None, refreshed_overrides(root, got_dir)), ray_actors)
    killer.join()
    assert killed, "the reward trainer was not caught refreshing: the fault was not injected"
    assert "asking the restarted one again" in capfd.readouterr().out
    assert_same_metrics(got_dir, local, rel=1e-4, abs=1e-6)
    assert [r["refresh/version"] for r in metrics(got_dir) if "refresh/version" in r] == [1, 2, 2]
    reward = "checkpoints/step-000003/reward_trainer/reward.safetensors"
    assert_same_weights(load_file(got_dir / reward), load_file(local / reward), atol=1e-5)
    assert_same_weights(weights(got_dir, 3), weights(local, 3), atol=1e-5)
