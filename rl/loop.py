"""The RL driver: one function, `train(cfg)`, that reads top to bottom.

    prompts -> rollout (Ray rollout actors; the colocated reward actor scores each micro-batch)
            -> targets (the algorithm's: advantages, returns or optimality) -> update (DeepSpeed learner actors)
            -> weight sync (versioned) -> log / eval / checkpoint

Actors (one placement group on one node; see the README's topology picture): N RolloutWorker, one
RewardWorker batching the scoring requests of every rollout worker, M Learner ranks forming one DeepSpeed
data-parallel group. Multi-node placement (a reward actor per node) is a later step: docs/performance.md.
Entry point: launch/grpo_edit.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from policies.images import images_to_tensor, tensor_to_images
from reward.config import save_config
from rl import checkpoint
from rl.algorithms import MicroTargets, build_algorithm
from rl.compare import scores_file
from rl.config import RLConfig
from rl.learner import Learner
from rl.logger import MetricsLogger
from rl.prompts import load_prompts, prompts_for_step
from rl.rewards import RewardWorker, Scores, build_reward, total_rewards
from rl.workers import RolloutWorker


class RewardUnavailable(RuntimeError):
    """The reward actor did not answer within timeout and retries."""


class RayRewardClient:
    """Scoring through the reward actor, with a per-call timeout and retries."""

    def __init__(self, handle, timeout_s: float, retries: int):
        self.handle, self.timeout_s, self.retries = handle, timeout_s, retries

    def submit(self, sources, instructions, edited):
        return self.handle.score_batched.remote(sources, instructions, edited), (sources, instructions, edited)

    def result(self, submitted) -> Scores:
        ref, args = submitted
        for attempt in range(self.retries + 1):
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except (GetTimeoutError, RayActorError) as e:
                if attempt == self.retries:
                    raise RewardUnavailable(f"the reward actor failed {self.retries + 1} times ({type(e).__name__}) on a batch of {len(args[0])} edits") from e
                print(f"reward call failed ({type(e).__name__}); retry {attempt + 1} of {self.retries}", flush=True)
                ray.cancel(ref)
                if isinstance(e, RayActorError):  # died: Ray restarts it (max_restarts); calls fail fast until then
                    self._wait_until_alive()
                ref = self.handle.score_batched.remote(*args)
        raise AssertionError("unreachable")

    def _wait_until_alive(self) -> None:
        """Poll the actor until it answers, for at most timeout_s (then the retry fails and counts)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 0.01))
                return
            except ActorDiedError:  # restarts used up: waiting can't help
                return
            except (GetTimeoutError, RayActorError):  # still restarting
                time.sleep(0.2)


MAX_REDOS = 3  # consecutive redos of one step (a rollout worker died or came back with old weights) before stopping


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the learners' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_actors(cfg: RLConfig):
    """Placement group and actors. CPU runs share the CPUs fractionally; GPU runs put one rollout worker, one
    learner and (on the first GPU) the reward actor on each GPU, as fractions of it. Returns the placement
    group, the reward actor, its retrying client (the workers' and the driver's evaluation), the rollout
    workers and the learners."""
    c = cfg.cluster
    n_actors = c.num_rollout_workers + c.num_learners + 1
    cpus = ray.available_resources().get("CPU", 1.0)
    cpu_each = min(1.0, cpus / n_actors)
    bundle = {"CPU": cpu_each * n_actors}
    if c.gpus_per_node:
        bundle["GPU"] = float(c.gpus_per_node)
    pg = placement_group([bundle], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=120)
    place = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
    gpu = (lambda share: share) if c.gpus_per_node else (lambda share: 0)
    reward = (
        ray.remote(RewardWorker)
        .options(num_cpus=cpu_each, num_gpus=gpu(0.2), scheduling_strategy=place, max_restarts=2, max_task_retries=0, max_concurrency=64)
        .remote(cfg.reward.terms, c.device, cfg.reward.max_batch_size, cfg.reward.max_wait_s, c.threads_per_worker)
    )
    client = RayRewardClient(reward, cfg.reward.timeout_s, cfg.reward.retries)
    rollout_workers = [
        ray.remote(RolloutWorker)
        .options(num_cpus=cpu_each, num_gpus=gpu(0.4), scheduling_strategy=place, max_restarts=2, max_task_retries=2)
        .remote(cfg.policy, cfg.seed, client, c.threads_per_worker, c.device, final_only=cfg.algo.algo == "nft")
        for _ in range(c.num_rollout_workers)
    ]
    port = free_port()
    learners = [
        ray.remote(Learner)
        .options(num_cpus=cpu_each, num_gpus=gpu(0.4), scheduling_strategy=place)
        .remote(cfg, rank, c.num_learners, port, c.threads_per_worker)
        for rank in range(c.num_learners)
    ]
    return pg, reward, client, rollout_workers, learners


def _standard_error(values) -> float:
    """Standard error of the mean of a 1-D sample (nan for a single value: its noise is unknown)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


@contextlib.contextmanager
def running_actors(cfg: RLConfig):
    """start_actors(), and kill them and free their placement group however the run ends (a failed run in a
    notebook or test must not hold the cluster's CPUs)."""
    pg, reward, client, rollout_workers, learners = start_actors(cfg)
    try:
        yield client, rollout_workers, learners
    finally:
        for actor in [reward, *rollout_workers, *learners]:
            _release(ray.kill, actor)
        _release(ray.util.remove_placement_group, pg)


def _release(release, what) -> None:
    """One cleanup call; a failure is printed, so it hides neither the run's own error nor the other calls."""
    try:
        release(what)
    except Exception as e:  # noqa: BLE001
        print(f"cleanup: {type(e).__name__}: {e}", flush=True)


def term_means(prefix: str, scores: Scores) -> dict:
    """{prefix}/reward_<term>: each term's mean over the edits it scored (nan when it scored none)."""
    means = {}
    for name, values in scores.terms.items():
        scored = [v for v in values if v is not None]
        means[f"{prefix}/reward_{name}"] = float(np.mean(scored)) if scored else float("nan")
    return means


def save_grid(path: Path, sources: torch.Tensor, edits: torch.Tensor, rows: int = 8) -> None:
    """A PNG with source | edit pairs side by side, `rows` of them."""
    srcs, outs = tensor_to_images(sources[:rows]), tensor_to_images(edits[:rows])
    w, h = srcs[0].size
    grid = Image.new("RGB", (2 * w, h * len(srcs)), "white")
    for i, (s, e) in enumerate(zip(srcs, outs)):
        grid.paste(s, (0, i * h))
        grid.paste(e, (w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def train(cfg: RLConfig) -> dict:
    """Run (or continue) one RL run; returns the last evaluation metrics."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    algo, P, G = cfg.algo, cfg.algo.prompts_per_step, cfg.algo.group_size
    algorithm = build_algorithm(algo)  # the driver only calls its targets(); the learners train with their own
    prompts, skipped = load_prompts(cfg.data.train_prompts, cfg.policy.height, cfg.policy.width, skip_bad=cfg.data.skip_bad)
    eval_prompts, eval_skipped = load_prompts(cfg.data.eval_prompts, cfg.policy.height, cfg.policy.width, cfg.data.num_eval, cfg.data.skip_bad)
    if skipped or eval_skipped:
        print(f"skipped bad prompt rows: {skipped} of {cfg.data.train_prompts}, {eval_skipped} of {cfg.data.eval_prompts}", flush=True)
    gold = build_reward(cfg.reward.gold) if cfg.reward.gold else None
    term_weights = {t.name: t.weight for t in cfg.reward.terms}
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    found = checkpoint.complete_checkpoints(run_dir)
    if found and resume_from != found[-1]:
        raise ValueError(
            f"{run_dir} already holds checkpoints up to {found[-1].name}; continue it with resume=auto, or use another output_dir "
            "(a new run here would prune or mix with them)"
        )
    with running_actors(cfg) as (reward_client, rollout_workers, learners):

        # ---- resume ------------------------------------------------------------------------------------------------
        step, version, run_id = 0, 0, None
        if resume_from is not None:
            state, _ = checkpoint.load(resume_from)
            ray.get([learner.load.remote(str(resume_from)) for learner in learners])
            step, version, run_id = state["step"], state["policy_version"], state["wandb_run_id"]
            print(f"resumed from {resume_from} (step {step})", flush=True)
        weights = learners[0].trainable_state.remote()
        ray.get([w.set_weights.remote(weights, version) for w in rollout_workers])
        logger = MetricsLogger(run_dir, step if resume_from else None, cfg.wandb, cfg.wandb_project, run_id, asdict(cfg))

        eval_sources = [p.source for p in eval_prompts]  # fixed for the run: prepared once
        eval_instructions = [p.instruction for p in eval_prompts]
        eval_source_tensor = images_to_tensor(eval_sources)

        def evaluate(at_step: int) -> dict:
            start = time.perf_counter()
            shares = np.array_split(np.arange(len(eval_prompts)), len(rollout_workers))
            for attempt in range(MAX_REDOS + 1):
                parts = ray.get([w.evaluate.remote([eval_prompts[i] for i in s], cfg.seed, algo.micro_batch_size) for w, s in zip(rollout_workers, shares) if len(s)])
                held = sorted({v for _, v in parts} - {version})
                if not held:
                    break
                if attempt == MAX_REDOS:  # a worker restarted during evaluation keeps coming back with other weights
                    raise RuntimeError(f"evaluation at step {at_step}: workers held weight versions {held} != {version}, {MAX_REDOS + 1} times")
                print(f"evaluation at step {at_step}: weight versions {held} != {version} (a worker restarted); resending weights", flush=True)
                ray.get([w.set_weights.remote(learners[0].trainable_state.remote(), version) for w in rollout_workers])
            edits = torch.cat([e for e, _ in parts])
            edited = tensor_to_images(edits)
            n = cfg.reward.max_batch_size  # scored in batches, like rollouts: one timeout per batch
            chunks = [reward_client.submit(eval_sources[i : i + n], eval_instructions[i : i + n], edited[i : i + n]) for i in range(0, len(edited), n)]
            scored = Scores.cat([reward_client.result(c) for c in chunks])
            total = total_rewards(scored.terms, term_weights, torch.arange(len(edited))).total.tolist()  # each edit its own group
            # the standard errors let rl/compare.py tell a real drop from evaluation noise
            row = {"eval/reward_mean": float(np.mean(total)), "eval/reward_sem": _standard_error(total)}
            row.update(term_means("eval", scored))
            gold_scores = None
            if gold is not None:
                gold_scores = gold.score(eval_sources, eval_instructions, edited).numpy()
                row["eval/gold_score"] = float(gold_scores.mean())
                row["eval/gold_sem"] = _standard_error(gold_scores)
            # every evaluation scores the same prompts with the same noise: rl/compare.py pairs them per prompt
            per_prompt = {"step": at_step, "instructions": eval_instructions, "proxy": [float(x) for x in total],
                          "gold": None if gold_scores is None else gold_scores.astype(float).tolist()}
            scores_path = scores_file(run_dir, at_step)
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            scores_path.write_text(json.dumps(per_prompt))
            save_grid(run_dir / "eval" / f"step-{at_step:06d}.png", eval_source_tensor, edits)
            row["perf/eval_s"] = time.perf_counter() - start
            logger.log(at_step, row)
            print(f"[eval step {at_step}] " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
            return row

        def save(at_step: int) -> None:
            staging = checkpoint.staging_dir(run_dir, at_step)
            ray.get([learner.save.remote(str(staging)) for learner in learners])
            state = {"step": at_step, "policy_version": version, "wandb_run_id": logger.run_id, "data_position": at_step * P, "seed": cfg.seed}
            checkpoint.commit(staging, state, ray.get(learners[0].trainable_state.remote()), cfg.keep_checkpoints)

        def save_after_failure(at_step: int) -> None:
            if at_step == 0:
                return
            try:
                save(at_step)
            except Exception as e:  # noqa: BLE001 - the original error matters more
                print(f"could not write a checkpoint at step {at_step} after the failure: {e}", flush=True)

        last_eval = evaluate(0) if step == 0 else {}
        if step == 0 and (skipped or eval_skipped):
            logger.log(0, {"data/skipped_prompts": skipped, "data/skipped_eval_prompts": eval_skipped})
        bad_steps = redos = 0
        while step < cfg.num_steps:
            t0 = time.perf_counter()
            # ---- prompts: P prompts, each repeated G times; a group = one prompt ----------------------------------------
            rows = [prompts[i] for i in prompts_for_step(len(prompts), step, P, cfg.seed) for _ in range(G)]
            group_ids = torch.arange(P).repeat_interleave(G)

            # ---- rollout + reward: each worker samples its share in micro-batches, scored by the reward actor -------------
            shares = np.array_split(np.arange(len(rows)), len(rollout_workers))
            try:
                results = ray.get(
                    [
                        w.rollout.remote([rows[i] for i in s], group_ids[s], algo.micro_batch_size, cfg.seed * 1_000_003 + step * 1009 + k, cfg.cluster.async_reward)
                        for k, (w, s) in enumerate(zip(rollout_workers, shares))
                    ]
                )
                micro = [r for res in results for r in res.rollouts]
                stale = sorted({int(v) for r in micro for v in r.policy_versions.unique() if v != version})
                lost = None
            except RayActorError as e:  # a rollout worker died mid-step; Ray restarts it (max_restarts)
                results, stale, lost = [], [], e
            except Exception:  # reward actor unavailable, a required term failed: keep what we have
                save_after_failure(step)
                raise
            t_rollout = time.perf_counter()
            if lost is not None or stale:
                # A restarted worker has fresh weights (or none of this step's rows): drop every row of the step, resend
                # the weights and redo it with the same seeds, so no sample is lost or counted twice.
                redos += 1
                why = f"a rollout worker died ({type(lost).__name__})" if lost is not None else f"rollouts from weight versions {stale} != {version}"
                if redos > MAX_REDOS:
                    save_after_failure(step)
                    raise RuntimeError(f"step {step}: {why}, {redos} times in a row; giving up (resume=auto continues from the checkpoint)") from lost
                print(f"step {step}: {why}; resending weights, redoing the step ({redos}/{MAX_REDOS})", flush=True)
                try:
                    ray.get([w.set_weights.remote(learners[0].trainable_state.remote(), version) for w in rollout_workers])
                except RayActorError as e:  # restarts used up: the worker is gone for good
                    save_after_failure(step)
                    raise RuntimeError(f"step {step}: a rollout worker is gone for good ({type(e).__name__}); resume=auto continues from the checkpoint") from e
                continue
            redos = 0
            scored = Scores.cat([s for res in results for s in res.scores])  # rows in the order of group_ids
            reward = total_rewards(scored.terms, term_weights, group_ids)  # an optional term missing in a group: left out of all of it
            total = reward.total
            if not torch.isfinite(total).all():
                bad_steps += 1
                step += 1
                logger.log(step, {"train/skipped_nonfinite_reward": 1})
                if bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"{bad_steps} consecutive steps had NaN/Inf rewards (step {step}); see the reward terms, resume=auto continues from the last checkpoint")
                continue

            # ---- targets: per-row advantages (GRPO), returns (PPO, whose R - V the learners form) or optimality (NFT) -----
            targets = algorithm.targets(total, group_ids)
            per_micro = [MicroTargets(v, cfg.seed * 1_000_003 + step * 1009 + i) for i, v in enumerate(targets.values.split(algo.micro_batch_size))]

            # ---- update: minibatch u = micro-batches [u K, (u + 1) K); rank r takes every M-th of each ----------------
            M = len(learners)
            K = len(micro) // algo.updates_per_step
            order = [[u * K + j for u in range(algo.updates_per_step) for j in range(r, K, M)] for r in range(M)]
            try:
                stats = ray.get([learner.update.remote([micro[i] for i in idx], [per_micro[i] for i in idx]) for learner, idx in zip(learners, order)])
            except RayActorError as e:  # its optimizer state is gone with it: restarting it would silently reset training
                last = checkpoint.complete_checkpoints(run_dir)
                raise RuntimeError(
                    f"a learner died during step {step + 1} ({type(e).__name__}); resume=auto continues from "
                    f"{last[-1] if last else 'the start (no checkpoint yet)'}"
                ) from e
            t_update = time.perf_counter()

            # ---- weight sync: learner rank 0 -> every rollout worker, through the object store --------------------------
            version += 1
            weights = learners[0].trainable_state.remote()
            ray.get([w.set_weights.remote(weights, version) for w in rollout_workers])
            t_sync = time.perf_counter()
            step += 1

            # ---- log ---------------------------------------------------------------------------------------------
            row = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
            if "train/ratio_min" in row:  # GRPO and PPO
                row["train/ratio_min"] = min(s["train/ratio_min"] for s in stats)
                row["train/ratio_max"] = max(s["train/ratio_max"] for s in stats)
            nonfinite = sum(s["train/nonfinite_losses"] for s in stats)
            row.update(
                {
                    "rollout/reward_mean": total.mean().item(),
                    "rollout/reward_std": total.std().item(),
                    "rollout/zero_std_ratio": targets.zero_std.float().mean().item(),
                    "rollout/policy_version": version - 1,
                    "perf/rollout_s": t_rollout - t0,
                    "perf/sample_s": max(r.sample_s for r in results),
                    "perf/reward_wait_s": max(r.wait_s for r in results),
                    "perf/update_s": t_update - t_rollout,
                    "perf/sync_s": t_sync - t_update,
                    "perf/step_s": t_sync - t0,
                }
            )
            row.update(term_means("rollout", scored))
            row.update({f"rollout/reward_errors_{k}": v for k, v in scored.errors.items()})
            row.update({f"rollout/reward_dropped_groups_{k}": v for k, v in reward.dropped_groups.items() if k in scored.errors})
            logger.log(step, row)
            shown = (
                f"clipfrac {row['train/clipfrac']:.3f} kl~{row['train/approx_kl']:.2e} ratio [{row['train/ratio_min']:.4f}, {row['train/ratio_max']:.4f}]"
                if "train/ratio_min" in row
                else f"drift {row['train/drift']:.2e}"
            )
            print(f"step {step} reward {row['rollout/reward_mean']:.4f} +- {row['rollout/reward_std']:.4f} loss {row['train/loss']:.4f} {shown} ({row['perf/step_s']:.1f} s)", flush=True)
            bad_steps = bad_steps + 1 if nonfinite else 0
            if bad_steps >= cfg.max_bad_steps:  # no save: the weights may be damaged; the last checkpoint is not
                raise RuntimeError(f"{bad_steps} consecutive steps had NaN/Inf losses (step {step}); lower algo.lr and resume=auto from the last checkpoint")

            # ---- eval and checkpoint -----------------------------------------------------------------------------
            if step % cfg.eval_every == 0 or step == cfg.num_steps:
                try:
                    last_eval = evaluate(step)
                except Exception:  # keep this step's update: resume=auto continues after it (without this evaluation)
                    save_after_failure(step)
                    raise
            if step % cfg.save_every == 0 or step == cfg.num_steps:
                save(step)
        logger.close()
        return last_eval

