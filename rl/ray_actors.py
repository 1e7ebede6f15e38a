"""The Ray actor set (rl/actors.py `ActorSet`): the RL job's actors on any number of Ray nodes. The only module of
rl/ that imports Ray.

`ray_actors(cfg, algorithm)` places, per node, `cluster.num_rollout_workers` rollout workers, `cluster.num_learners`
learner ranks and **one reward actor that batches the scoring requests of that node's rollout workers**, so
scoring traffic never leaves the node. Each node gets its own placement group, pinned to one node (bundle label
`ray.io/node-id`) and holding **one bundle per slot**: one per GPU on GPU runs (the actors sharing a GPU split its
bundle in equal, explicit shares: `placement()`), one per actor on CPU runs. The learners of all nodes form one
DeepSpeed group; its rendezvous is the address of rank 0's node, asked of Ray on that node (`rendezvous`).

`RayActors` turns the driver's plain calls into remote calls, waits on them while watching the job's nodes, and
turns Ray's failures into the driver's own: a rollout worker that died mid-call -> `Redo`, a learner that died
or a worker gone for good -> `ActorLost`, a dead node -> `NodeLost`.

Rollouts bypass the driver: a rollout worker puts each micro-batch's rollout in its node's object store and
returns only the references, with the scores; learners fetch their shards directly from the workers' nodes
(`fetch_rollouts`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, ObjectLostError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.actors import (
    ActorLost,
    NodeLost,
    Redo,
    RolloutShare,
    checked_reward_trainer_dir,
    free_port,
    payload_bytes,
    reward_trainer_dir,
)
from rl.algorithms import MicroTargets
from rl.config import ClusterConfig, RLConfig
from rl.learner import Learner
from rl.prompts import Prompt
from rl.refresh import RefreshRequest, RewardTrainer, latest_weights
from rl.rewards import RewardWorker
from rl.workers import EvalResult, RolloutResult, RolloutWorker

# ---- reward clients: how a rollout worker (and the driver's evaluation) reaches a reward actor ----------------------


class RewardUnavailable(RuntimeError):
    """The reward actor did not answer within timeout and retries."""


class RayRewardClient:
    """Scoring through a Ray reward actor, with a per-call timeout and retries."""

    def __init__(self, handle, timeout_s: float, retries: int):
        self.handle, self.timeout_s, self.retries = handle, timeout_s, retries

    def submit(self, sources, instructions, edited, method: str = "score_batched"):
        """Start `method` of the reward actor on the edits: score_batched (a rollout's rewards, batched with
        other workers' requests) or judge (an evaluation's scores and gold)."""
        return getattr(self.handle, method).remote(sources, instructions, edited), (
            method,
            sources,
            instructions,
            edited,
        )

    def result(self, submitted):
        ref, (method, *args) = submitted
        for attempt in range(self.retries + 1):
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except (GetTimeoutError, RayActorError) as e:
                if attempt == self.retries:
                    raise RewardUnavailable(
                        f"the reward actor failed {self.retries + 1} times ({type(e).__name__}) on a batch of "
                        f"{len(args[0])} edits"
                    ) from e
                print(f"reward call failed ({type(e).__name__}); retry {attempt + 1} of {self.retries}", flush=True)
                ray.cancel(ref)
                if isinstance(e, RayActorError):  # died: Ray restarts it (max_restarts); calls fail fast until then
                    wait_until_alive(self.handle, self.timeout_s)
                ref = getattr(self.handle, method).remote(*args)
        raise AssertionError("unreachable")


def wait_until_alive(handle, timeout_s: float) -> None:
    """Poll an actor that died until Ray has restarted it and it answers, for at most timeout_s (a call after that
    fails and says so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 0.01))
            return
        except ActorDiedError:  # restarts used up: waiting can't help
            return
        except (GetTimeoutError, RayActorError):  # still restarting
            time.sleep(0.2)


# ---- the actor set --------------------------------------------------------------------------------------------------


@dataclass
class Placement:
    role: str  # "rollout", "learner" or "reward"
    index: int  # rollout worker index, learner rank, or node index (reward)
    node: int  # node index in the job
    slot: int  # GPU index on the node (GPU runs) or bundle index (CPU runs)
    share: float  # of the slot's GPU (GPU runs) or CPUs (CPU runs)


@dataclass
class RayActors:
    """The actor set on Ray (rl/actors.py ActorSet). Lists are node-major: rollout worker k lives on node
    k // num_rollout_workers of the node. The handles stay public for tests and benchmarks that plant faults."""

    rollout_workers: list
    learners: list  # in rank order
    reward_actors: list  # one per node
    reward_clients: list  # one per node
    placements: list[Placement]
    nodes: list[str]  # Ray node ids, one per node
    reward_timeout_s: float  # how long a metric call to a reward actor may take
    reward_trainer: Any = None  # the online refresh's trainer (rl/refresh.py), beside node 0's reward actor
    refreshed_term: str = ""  # the reward term it trains
    poll_s: float = 5.0  # how often a long wait (`watch`) checks that the job's nodes are alive

    @property
    def num_rollout_workers(self) -> int:
        return len(self.rollout_workers)

    @property
    def num_learners(self) -> int:
        return len(self.learners)

    def rollout(self, shares: list[RolloutShare], micro_batch_size: int, overlap: bool) -> list[RolloutResult]:
        calls = [
            w.rollout.remote(s.prompts, s.group_ids, micro_batch_size, s.seed, overlap)
            for w, s in zip(self.rollout_workers, shares)
        ]
        try:
            return self.watch(calls)
        except RayActorError as e:  # Ray restarts the worker (max_restarts); the step's rows are redone
            raise Redo(f"a rollout worker died ({type(e).__name__})") from e

    def update(self, shares: list[tuple[list, list[MicroTargets]]]) -> list[dict]:
        try:
            return self.watch(
                [rank.update.remote(micro, targets) for rank, (micro, targets) in zip(self.learners, shares)]
            )
        except RayActorError as e:  # its optimizer state is gone with it: restarting it would silently reset training
            raise ActorLost("a learner died") from e  # its type shows in the chained traceback

    def send_weights(self, version: int) -> None:
        # every rank is asked: under ZeRO-3 gathering the weights is a collective; the other ranks answer None
        weights = [rank.trainable_state.remote() for rank in self.learners][0]
        try:
            self.watch([w.set_weights.remote(weights, version) for w in self.rollout_workers])
        except RayActorError as e:  # restarts used up: the worker is gone for good (or its node is)
            self.check_nodes(grace_s=30.0)  # a dead node says so, rather than a worker gone
            raise ActorLost(f"a rollout worker is gone for good ({type(e).__name__})") from e

    def evaluate(self, shares: list[list[Prompt]], seed: int, batch_size: int, grid_rows: int) -> list[EvalResult]:
        return self.watch(
            [w.evaluate.remote(p, seed, batch_size, grid_rows) for w, p in zip(self.rollout_workers, shares) if p]
        )

    def refresh(self, request: RefreshRequest) -> dict:
        try:
            metrics = self.watch([self.reward_trainer.refresh.remote(request)])[0]
        except RayActorError:  # Ray restarts it with its state after the last refresh; this one is asked again
            print("the reward trainer died during a refresh; asking the restarted one again", flush=True)
            wait_until_alive(self.reward_trainer, self.reward_timeout_s)
            metrics = self.watch([self.reward_trainer.refresh.remote(request)])[0]
        if metrics["refresh/trained"]:
            self.send_reward_weights()
        return metrics

    def send_reward_weights(self) -> None:
        """The trainer's tensors to every node's reward actor, through the object store."""
        weights = self.reward_trainer.trainable_state.remote()
        self.watch([a.load_term_weights.remote(self.refreshed_term, weights) for a in self.reward_actors])

    def save(self, staging: str) -> list:
        if self.reward_trainer is not None:
            self.watch([self.reward_trainer.save.remote(str(reward_trainer_dir(staging)))])
        return self.watch([rank.save.remote(staging) for rank in self.learners])

    def load(self, path: str) -> None:
        ray.get([rank.load.remote(path) for rank in self.learners])
        if self.reward_trainer is not None:
            version = ray.get(self.reward_trainer.load.remote(str(checked_reward_trainer_dir(path))))
            if version:
                self.send_reward_weights()

    def reward_batch_sizes(self) -> list[list[int] | None]:
        sizes = []
        for n, actor in enumerate(self.reward_actors):
            try:
                sizes.append(ray.get(actor.take_batch_sizes.remote(), timeout=self.reward_timeout_s))
            except Exception as e:  # noqa: BLE001 - a metric; the reward client handles a dead actor where it matters
                print(f"reward actor of node {n}: no batch sizes ({type(e).__name__})", flush=True)
                sizes.append(None)
        return sizes

    def watch(self, refs: list):
        """`ray.get`, for the long calls of a step: every poll_s, check that every node of the job is alive, and
        raise NodeLost naming the dead ones instead of waiting for actors that cannot come back (their placement
        group is pinned to the dead node)."""
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            if pending:
                self.check_nodes()
        return ray.get(refs)

    def check_nodes(self, grace_s: float = 0.0) -> None:
        """Raise NodeLost if a node of the job is dead. `grace_s`: after an actor became unreachable for good, how
        long to give Ray's health checks (about 15 s) to tell whether its node died, polling every second."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            dead = [i for i, node in enumerate(self.nodes) if node not in alive]
            if dead:
                raise NodeLost(f"node(s) {dead} of the job ({', '.join(self.nodes[i][:8] for i in dead)}) died")
            if time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def node_of_worker(self, k: int) -> int:
        return k * len(self.reward_actors) // len(self.rollout_workers)

    def actor_nodes(self) -> dict[str, list[str]]:
        """The Ray node id each actor runs on, by role (tests assert the topology with it)."""

        def node_ids(handles):
            return ray.get([h.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for h in handles])

        return {
            "rollout": node_ids(self.rollout_workers),
            "learner": node_ids(self.learners),
            "reward": node_ids(self.reward_actors),
        }


# ---- the Ray topology -----------------------------------------------------------------------------------------------


def placement(c: ClusterConfig, node: int = 0) -> list[Placement]:
    """Where each actor of node `node` goes (every node has the same layout), with the job-wide indices: rollout
    worker node x R + i, learner rank node x L + j, reward actor `node`.

    GPU runs: rollout worker i on GPU i mod G, learner j on GPU (learner_first_gpu + j) mod G, the reward actor on
    GPU `reward_gpu`; the actors on one GPU split it in equal shares (Ray's fractional GPUs: a share reserves a
    fraction of the bundle, not of the memory; launch/plan.py checks the memory). CPU runs: each actor its own bundle.
    """
    R, L = c.num_rollout_workers, c.num_learners
    roles = [("rollout", i) for i in range(R)] + [("learner", j) for j in range(L)] + [("reward", 0)]
    first = {"rollout": node * R, "learner": node * L, "reward": node}
    if not c.gpus_per_node:
        return [Placement(role, first[role] + index, node, b, 1.0) for b, (role, index) in enumerate(roles)]
    G = c.gpus_per_node
    slot = {
        "rollout": lambda i: i % G,
        "learner": lambda j: (c.learner_first_gpu + j) % G,
        "reward": lambda _: c.reward_gpu % G,
    }
    slots = [slot[role](index) for role, index in roles]
    return [
        Placement(role, first[role] + index, node, s, 1.0 / slots.count(s)) for (role, index), s in zip(roles, slots)
    ]


def choose_nodes(c: ClusterConfig) -> list[dict]:
    """`num_nodes` alive Ray nodes that can hold one node's bundles: the driver's node first (a laptop run stays
    where it was started), then the others in Ray's order. Refuses, naming what it found, when too few qualify."""
    need = {c.gpu_resource: float(c.gpus_per_node)} if c.gpus_per_node else {"CPU": 1.0}
    alive = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    alive.sort(key=lambda n: n["NodeID"] != here)
    fit = [n for n in alive if all(n["Resources"].get(k, 0.0) >= v for k, v in need.items())]
    if len(fit) < c.num_nodes:
        found = ", ".join(f"{n['NodeID'][:8]} { ({k: n['Resources'].get(k, 0) for k in need}) }" for n in alive)
        raise RuntimeError(
            f"cluster.num_nodes={c.num_nodes} needs that many nodes with {need}; the Ray cluster has {len(fit)}: "
            f"{found}"
        )
    return fit[: c.num_nodes]


def rendezvous(_actor=None) -> tuple[str, int]:
    """Called in an actor on learner rank 0's node (its reward actor, already running: no new worker process to
    start): that node's address as Ray knows it, and a port free there."""
    host = ray.util.get_node_ip_address()
    return host, free_port(host)


@contextlib.contextmanager
def ray_actors(cfg: RLConfig, algorithm) -> Iterator[RayActors]:
    """The Ray topology (module docstring). Actors and placement groups are killed and freed however the run ends
    (a failed run in a notebook or test must not hold the cluster)."""
    c = cfg.cluster
    layout = placement(c)  # node 0's; the bundles are the same on every node
    nodes = choose_nodes(c)
    groups, actors = [], []
    try:
        for node in nodes:
            cpus = node["Resources"].get("CPU", 1.0)
            if c.gpus_per_node:
                per_gpu = [sum(1 for p in layout if p.slot == g) for g in range(c.gpus_per_node)]
                bundles = [{c.gpu_resource: 1.0, "CPU": min(float(n), cpus / c.gpus_per_node)} for n in per_gpu]
            else:
                bundles = [{"CPU": min(1.0, cpus / len(layout))} for _ in layout]
            pg = placement_group(
                bundles,
                strategy="STRICT_PACK",
                bundle_label_selector=[{"ray.io/node-id": node["NodeID"]}] * len(bundles),
            )
            groups.append(pg)
        try:
            ray.get([pg.ready() for pg in groups], timeout=c.placement_timeout_s)
        except GetTimeoutError as e:
            raise RuntimeError(
                f"the placement groups of {len(nodes)} node(s) were not placed within {c.placement_timeout_s} s: the "
                f"nodes lack the resources of {layout} (see `ray status`)"
            ) from e

        def options(pg, p: Placement) -> dict:
            bundle = pg.bundle_specs[p.slot]
            share = p.share * bundle.get(c.gpu_resource, 0.0) if c.gpus_per_node else 0.0
            opts = {
                "num_cpus": bundle["CPU"] * p.share,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=p.slot
                ),
            }
            if share:
                opts.update({"num_gpus": share} if c.gpu_resource == "GPU" else {"resources": {c.gpu_resource: share}})
            return opts

        rewards, clients, workers, learners = [], [], [], []
        placements = [p for n in range(len(groups)) for p in placement(c, n)]
        final_only = cfg.algo.name == "nft"
        refresh = cfg.reward.refresh
        reward_at = next(p for p in layout if p.role == "reward")
        trainer = None
        for n, pg in enumerate(groups):
            at = options(pg, reward_at)
            if refresh.term and n == 0:  # the reward trainer shares node 0's reward slot: half of it each
                at = halved(at)
                trainer = (
                    ray.remote(RewardTrainer)
                    .options(**at, max_restarts=2, max_task_retries=0)
                    .remote(cfg, c.device, c.threads_per_worker, fetch=fetch_rollouts, restarted=was_restarted)
                )
                actors.append(trainer)
            reward = (
                ray.remote(RewardWorker)
                .options(**at, max_restarts=2, max_task_retries=0, max_concurrency=64)
                .remote(
                    cfg.reward.terms,
                    c.device,
                    cfg.reward.max_batch_size,
                    cfg.reward.max_wait_s,
                    c.threads_per_worker,
                    c.num_rollout_workers,
                    cfg.reward.gold,
                    functools.partial(restarted_reward, cfg.output_dir, refresh.term) if refresh.term else None,
                )
            )
            actors.append(reward)
            rewards.append(reward)
            clients.append(RayRewardClient(reward, cfg.reward.timeout_s, cfg.reward.retries))
            for p in (p for p in layout if p.role == "rollout"):
                worker = (
                    ray.remote(RolloutWorker)
                    .options(**options(pg, p), max_restarts=2, max_task_retries=2)
                    .remote(
                        cfg.policy,
                        cfg.seed,
                        clients[-1],
                        c.threads_per_worker,
                        c.device,
                        final_only=final_only,
                        store=ray.put,
                    )
                )
                actors.append(worker)
                workers.append(worker)
        host, port = ray.get(rewards[0].__ray_call__.remote(rendezvous))  # node 0 holds learner rank 0
        world = c.num_learners * len(groups)
        for n, pg in enumerate(groups):
            for p in (p for p in placement(c, n) if p.role == "learner"):
                # on GPU runs Ray shows each actor only its own GPU (CUDA_VISIBLE_DEVICES), so its device index is 0
                local_rank = 0 if c.gpus_per_node else p.index - n * c.num_learners
                learner = (
                    ray.remote(Learner)
                    .options(**options(pg, p))
                    .remote(
                        cfg,
                        algorithm,
                        p.index,
                        world,
                        host,
                        port,
                        local_rank,
                        c.threads_per_worker,
                        fetch=fetch_rollouts,
                    )
                )
                actors.append(learner)
                learners.append(learner)
        yield RayActors(
            workers,
            learners,
            rewards,
            clients,
            placements,
            [node["NodeID"] for node in nodes],
            cfg.reward.timeout_s,
            trainer,
            refresh.term,
        )
    finally:
        for actor in actors:
            _release(ray.kill, actor)
        for pg in groups:
            _release(remove_placement_group, pg)


def halved(opts: dict) -> dict:
    """Placement options for half of the slot `opts` reserves (its CPUs, and its GPU share on GPU runs)."""
    out = {**opts, "num_cpus": opts["num_cpus"] / 2}
    if "num_gpus" in out:
        out["num_gpus"] = out["num_gpus"] / 2
    if "resources" in out:
        out["resources"] = {k: v / 2 for k, v in out["resources"].items()}
    return out


def was_restarted() -> bool:
    """Whether this actor is one that Ray restarted after it died."""
    return ray.get_runtime_context().was_current_actor_reconstructed


def restarted_reward(run_dir: str, term: str) -> tuple[str, dict] | None:
    """In a reward actor that Ray restarted: the refreshed term's latest weights (rl/refresh.py latest_weights)."""
    if not was_restarted():
        return None
    found = latest_weights(run_dir)
    return None if found is None else (term, found)


def _release(release, what) -> None:
    """One cleanup call; a failure is printed, so it hides neither the run's own error nor the other calls."""
    try:
        release(what)
    except Exception as e:  # noqa: BLE001
        print(f"cleanup: {type(e).__name__}: {e}", flush=True)


# ---- what moves where ----------------------------------------------------------------------------------------------


def fetch_rollouts(items: list) -> tuple[list, str, int]:
    """A learner's rollouts, read from the object store where they are references (one call for all): the
    rollouts, why they could not be read ('' when they could: a worker that died took its objects along), and
    the bytes read."""
    refs = [i for i, r in enumerate(items) if isinstance(r, ray.ObjectRef)]
    try:
        values = ray.get([items[i] for i in refs])
    except ObjectLostError as e:  # the worker that owned them died (OwnerDiedError), or its node did
        return [], f"{type(e).__name__}: {str(e).splitlines()[0]}", 0
    out = list(items)
    for i, v in zip(refs, values):
        out[i] = v
    return out, "", payload_bytes(values)
