"""The Ray topology on simulated nodes (ray.cluster_utils.Cluster: several raylets on this machine, as Ray's own
tests do), with a custom resource standing for GPUs: each node's rollout workers call their own node's reward
actor, a 2-node run equals a 1-node run of the same global batch, the driver's received bytes stay flat when the
rollouts double, and a node that dies mid-run stops the run with a clear message, after which resume=auto on a
repaired cluster reproduces the uninterrupted run."""

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from launch.benchmarking import SIMULATED_NODE, simulated_cluster
from reward.config import load_config
from rl.algorithms import build_algorithm
from rl.config import RLConfig
from rl.loop import train
from rl.ray_actors import fetch_rollouts, ray_actors
from tests.rl.runs import assert_learned, assert_same_metrics, assert_same_weights, tiny_data_and_policy, weights
from tests.rl.runs import overrides as loop_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head that holds no actor (0 CPUs: the driver's) and 2 nodes of 2 'GPUs' each; tiny data and policy."""
    root = tiny_data_and_policy(tmp_path_factory.mktemp("multinode"))
    with simulated_cluster(2) as (c, nodes):
        yield root, c, nodes


def overrides(root, out, nodes: int, *extra):
    """test_loop's tiny run, on `nodes` nodes of 2 'GPUs': 2 rollout workers and 2 learners in all, the reward
    actor of each node on its GPU 1."""
    return loop_overrides(
        root,
        out,
        "algo.micro_batch_size=2",
        f"cluster.num_nodes={nodes}",
        f"cluster.num_rollout_workers={2 // nodes}",
        f"cluster.num_learners={2 // nodes}",
        "cluster.gpus_per_node=2",
        "cluster.gpu_resource=fake_gpu",
        "cluster.reward_gpu=1",
        *extra,
    )


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def steps(run):
    return [r for r in metrics(run) if "perf/step_s" in r]


def same_metrics(got_dir, want_dir):
    assert_same_metrics(got_dir, want_dir, rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    root = cluster[0]
    out = tmp_path_factory.mktemp("one")
    train(load_config(RLConfig, None, overrides(root, out, 1)), ray_actors)
    assert_learned(out)
    return out


def test_two_nodes_place_a_reward_actor_on_each_equal_one_node_and_batch_per_node(cluster, one_node, tmp_path):
    root, _, nodes = cluster
    two = tmp_path / "two"
    cfg = load_config(RLConfig, None, overrides(root, two, 2))
    with ray_actors(cfg, build_algorithm(cfg.algo, cfg.seed)) as actors:
        where = actors.actor_nodes()
        assert sorted(where["reward"]) == sorted(n.node_id for n in nodes)  # one reward actor on each node
        assert set(where["learner"]) == set(where["reward"])
        for k, (worker, node) in enumerate(zip(actors.rollout_workers, where["rollout"])):
            n = actors.node_of_worker(k)
            assert node == where["reward"][n], f"rollout worker {k} is not on node {n}"
            called = ray.get(worker.__ray_call__.remote(lambda w: w.reward.handle._actor_id.hex()))
            assert called == actors.reward_actors[n]._actor_id.hex(), (
                f"rollout worker {k} calls another node's reward actor"
            )
        assert [(p.role, p.node, p.slot, p.share) for p in actors.placements if p.node == 0] == [
            ("rollout", 0, 0, 0.5),
            ("learner", 0, 0, 0.5),
            ("reward", 0, 1, 1.0),
        ]
        train(cfg, lambda *_: contextlib.nullcontext(actors))  # the run itself, on these actors
    assert_learned(two)
    same_metrics(two, one_node)
    assert_same_weights(weights(two, 3), weights(one_node, 3), atol=1e-5)
    for r in steps(two):
        assert r["reward/node_0/batch_mean"] > 0 and r["reward/node_1/batch_mean"] > 0
        assert r["perf/driver_bytes"] < 0.05 * r["perf/rollout_bytes"], "rollouts went through the driver"
    assert "reward/node_1/batch_mean" not in steps(one_node)[0]

    # twice the rollout per row (9 denoising steps instead of 3): the learners fetch twice as much, the driver not more
    double = tmp_path / "double"
    train(
        load_config(RLConfig, None, overrides(root, double, 2, "policy.sampler.num_steps=9", "num_rl_steps=1")),
        ray_actors,
    )
    small, big = steps(two)[0], steps(double)[0]
    assert big["perf/rollout_bytes"] > 1.9 * small["perf/rollout_bytes"]
    assert big["perf/driver_bytes"] == pytest.approx(small["perf/driver_bytes"], rel=0.1)


def test_a_node_that_dies_stops_the_run_and_resume_reproduces_it(cluster, one_node, tmp_path):
    root, c, nodes = cluster
    out = tmp_path / "killed"
    killed = threading.Event()

    def kill_node_after_first_checkpoint():
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step-000001" / "state.json").exists() and time.time() < deadline:
            time.sleep(0.02)
        c.remove_node(nodes[1], allow_graceful=False)
        killed.set()

    thread = threading.Thread(target=kill_node_after_first_checkpoint, daemon=True)
    thread.start()
    with pytest.raises(RuntimeError, match=r"(died|node).*resume=auto continues from .*step-00000[12]"):
        train(load_config(RLConfig, None, overrides(root, out, 2, "cluster.placement_timeout_s=60")), ray_actors)
    thread.join()
    assert killed.is_set()
    nodes[1] = c.add_node(**SIMULATED_NODE)  # the cluster repaired: resume=auto finishes the run as if nothing happened
    train(load_config(RLConfig, None, overrides(root, out, 2)), ray_actors)
    assert_learned(out)
    same_metrics(out, one_node)
    assert_same_weights(weights(out, 3), weights(one_node, 3), atol=1e-5)


def test_rollouts_whose_worker_died_are_reported_lost_not_raised(cluster):
    """A learner fetches its rollouts by reference from the worker that put them; if that worker died, the fetch
    says why instead of raising, so every rank can agree to skip the update (Learner.update) and the step is redone."""

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self):
            return [ray.put(torch.ones(3))]

    owner = Owner.remote()
    refs = ray.get(owner.put.remote())
    fetched, lost, size = fetch_rollouts([refs[0], "in place"])  # references fetched, anything else kept as it is
    assert lost == "" and torch.equal(fetched[0], torch.ones(3)) and fetched[1] == "in place" and size == 12
    ray.kill(owner)
    time.sleep(1)
    fetched, lost, size = fetch_rollouts(refs)
    assert fetched == [] and "OwnerDiedError" in lost and size == 0
