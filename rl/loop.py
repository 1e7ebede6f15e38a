"""The RL driver: `train(cfg, actors)`, whose step reads top to bottom.

    prompts -> rollout (rollout workers; each node's reward actor scores its workers' micro-batches)
            -> targets (the algorithm's: advantages, returns or optimality; from rewards only)
            -> update (DeepSpeed learner ranks, which fetch their rollouts from the workers' object stores)
            -> weight sync (versioned) -> log / eval / checkpoint

The actors come from rl/actors.py: the Ray topology over any number of nodes (`ray_actors`, the default) or
one process (`in_process_actors`). The driver receives rewards and metadata, never rollouts. What goes wrong on
the way (a worker died, weights out of date, rollouts lost, a learner died, NaN rewards) is handled by the named
helpers of `Run`, so that `train` shows only the step. Entry point: launch/grpo_edit.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray.exceptions import RayActorError

from reward.config import save_config
from rl import checkpoint
from rl.actors import ActorSet, NodeLost, payload_bytes, ray_actors
from rl.algorithms import MicroTargets, build_algorithm
from rl.compare import scores_file
from rl.config import RLConfig
from rl.logger import MetricsLogger
from rl.prompts import load_prompts, prompts_for_step
from rl.rewards import Scores, check_spec, total_rewards

GRID_ROWS = 8  # evaluation prompts shown in each evaluation's grid
MAX_REDOS = (
    3  # consecutive redos of one step (a rollout worker died, came back with old weights, or its rollouts were lost)
)


def _standard_error(values) -> float:
    """Standard error of the mean of a 1-D sample (nan for a single value: its noise is unknown)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def term_means(prefix: str, scores: Scores) -> dict:
    """{prefix}/reward_<term>: each term's mean over the edits it scored (nan when it scored none)."""
    means = {}
    for name, values in scores.terms.items():
        scored = [v for v in values if v is not None]
        means[f"{prefix}/reward_{name}"] = float(np.mean(scored)) if scored else float("nan")
    return means


def save_grid(path: Path, pairs: torch.Tensor) -> None:
    """A PNG of source | edit thumbnails (rl/workers.py pair_thumbnail), (n, 3, h, 2 w) uint8, one pair a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(list(pairs), dim=1).permute(1, 2, 0).numpy()).save(path)


class Redo(Exception):
    """This step's rollouts cannot be used (a worker died or restarted, or its rollouts were lost): redo it."""


class Run:
    """One run's state and the helpers that keep the step in `train` short: rollout, update, weight sync,
    evaluation, checkpoints, and the recovery each needs."""

    def __init__(self, cfg: RLConfig, actors: ActorSet, data: dict):
        self.cfg, self.actors, self.get = cfg, actors, actors.get
        self.run_dir = Path(cfg.output_dir)
        self.prompts, self.eval_prompts, self.skipped = data["prompts"], data["eval_prompts"], data["skipped"]
        self.term_weights = {t.name: t.weight for t in cfg.reward.terms}
        self.version = 0
        self.redos = 0
        self.logger: MetricsLogger | None = None

    # ---- start --------------------------------------------------------------------------------------------------

    def start(self, resume_from: Path | None) -> int:
        """Load the checkpoint (if any) into the learners, send the weights to the workers, open the logger; returns the
        step."""
        step, run_id = 0, None
        if resume_from is not None:
            state, _ = checkpoint.load(resume_from)
            self.get([learner.load.remote(str(resume_from)) for learner in self.actors.learners])
            step, self.version, run_id = state["step"], state["policy_version"], state["wandb_run_id"]
            print(f"resumed from {resume_from} (step {step})", flush=True)
        self.send_weights()
        self.logger = MetricsLogger(
            self.run_dir,
            step if resume_from else None,
            self.cfg.wandb,
            self.cfg.wandb_project,
            run_id,
            asdict(self.cfg),
        )
        return step

    def send_weights(self) -> None:
        """Learner rank 0's trainable weights to every rollout worker, through the object store (one pull per node)."""
        weights = self.weights()
        self.actors.watch([w.set_weights.remote(weights, self.version) for w in self.actors.rollout_workers])

    def weights(self):
        """Learner rank 0's trainable weights (a reference). Every rank is asked: under ZeRO-3 gathering them is a
        collective; the other ranks answer None."""
        return [learner.trainable_state.remote() for learner in self.actors.learners][0]

    # ---- rollout ------------------------------------------------------------------------------------------------

    def rollout(self, step: int, rows: list, group_ids: torch.Tensor) -> list:
        """Each worker samples its share in micro-batches, scored by its node's reward actor. Raises Redo when a
        worker died mid-step or sampled with other weights than the current version."""
        workers, algo = self.actors.rollout_workers, self.cfg.algo
        shares = np.array_split(np.arange(len(rows)), len(workers))
        try:
            results = self.actors.watch(
                [
                    w.rollout.remote(
                        [rows[i] for i in s],
                        group_ids[s],
                        algo.micro_batch_size,
                        self.cfg.seed * 1_000_003 + step * 1009 + k,
                        self.cfg.cluster.async_reward,
                    )
                    for k, (w, s) in enumerate(zip(workers, shares))
                ]
            )
        except RayActorError as e:  # a rollout worker died mid-step; Ray restarts it (max_restarts)
            raise Redo(f"a rollout worker died ({type(e).__name__})") from e
        stale = sorted({v for r in results for v in r.versions} - {self.version})
        if stale:
            raise Redo(f"rollouts from weight versions {stale} != {self.version}")
        return results

    def redo(self, step: int, why: Redo) -> None:
        """Drop every row of the step, resend the weights, and let the loop redo it with the same seeds (no sample
        lost or counted twice); after MAX_REDOS in a row, stop with a checkpoint."""
        self.actors.check_nodes()  # a dead node is not redone: the run stops (Run.stopped_by)
        self.redos += 1
        if self.redos > MAX_REDOS:
            self.save_after_failure(step)
            raise RuntimeError(
                f"step {step}: {why}, {self.redos} times in a row; giving up (resume=auto continues from the "
                f"checkpoint)"
            ) from why.__cause__
        print(f"step {step}: {why}; resending weights, redoing the step ({self.redos}/{MAX_REDOS})", flush=True)
        try:
            self.send_weights()
        except RayActorError as e:  # restarts used up: the worker is gone for good (or its node is)
            self.actors.check_nodes(grace_s=30.0)  # a dead node stops the run without a checkpoint (stopped_by)
            self.save_after_failure(step)
            raise RuntimeError(
                f"step {step}: a rollout worker is gone for good ({type(e).__name__}); resume=auto continues from "
                f"{self.last_checkpoint()}"
            ) from e

    # ---- update -------------------------------------------------------------------------------------------------

    def update(self, step: int, micro: list, targets: list[MicroTargets]) -> list[dict]:
        """Minibatch u = micro-batches [u K, (u + 1) K); rank r takes every M-th of each and fetches them itself.
        Raises Redo when a rank could not fetch its rollouts (no rank trained); a learner that died stops the run."""
        learners, algo = self.actors.learners, self.cfg.algo
        M, K = len(learners), len(micro) // algo.updates_per_step
        order = [[u * K + j for u in range(algo.updates_per_step) for j in range(r, K, M)] for r in range(M)]
        try:
            stats = self.actors.watch(
                [
                    learner.update.remote([micro[i] for i in idx], [targets[i] for i in idx])
                    for learner, idx in zip(learners, order)
                ]
            )
        except RayActorError as e:  # its optimizer state is gone with it: restarting it would silently reset training
            raise RuntimeError(
                f"a learner died during step {step + 1} ({type(e).__name__}); resume=auto continues from "
                f"{self.last_checkpoint()}"
            ) from e
        lost = [s["lost"] for s in stats if s.get("lost")]
        if lost:
            raise Redo(f"rollouts lost before the update ({lost[0]})")
        return stats

    def reward_batches(self) -> dict:
        """reward/node_<n>/batch_mean: the mean edits per scoring call of each node's reward actor since the last
        step."""
        row = {}
        for n, actor in enumerate(self.actors.reward_actors):
            try:
                sizes = self.get(actor.take_batch_sizes.remote(), timeout=self.cfg.reward.timeout_s)
            except Exception as e:  # noqa: BLE001 - a metric; the reward client handles a dead actor where it matters
                print(f"reward actor of node {n}: no batch sizes ({type(e).__name__})", flush=True)
                continue
            row[f"reward/node_{n}/batch_mean"] = float(np.mean(sizes)) if sizes else float("nan")
        return row

    # ---- evaluation and checkpoints ------------------------------------------------------------------------------

    def evaluate(self, at_step: int) -> dict:
        """ODE edits of the evaluation prompts, judged on the workers' nodes (reward terms and gold judge): the
        driver receives their scores and thumbnails, never the edits. Writes each prompt's scores (rl/compare.py
        pairs them across evaluations), a grid, and the metrics row."""
        start = time.perf_counter()
        workers, cfg = self.actors.rollout_workers, self.cfg
        shares = np.array_split(np.arange(len(self.eval_prompts)), len(workers))
        for attempt in range(MAX_REDOS + 1):
            parts = self.actors.watch(
                [
                    w.evaluate.remote([self.eval_prompts[i] for i in s], cfg.seed, cfg.algo.micro_batch_size, GRID_ROWS)
                    for w, s in zip(workers, shares)
                    if len(s)
                ]
            )
            held = sorted({p.version for p in parts} - {self.version})
            if not held:
                break
            if attempt == MAX_REDOS:  # a worker restarted during evaluation keeps coming back with other weights
                raise RuntimeError(
                    f"evaluation at step {at_step}: workers held weight versions {held} != {self.version}, "
                    f"{MAX_REDOS + 1} times"
                )
            print(
                f"evaluation at step {at_step}: weight versions {held} != {self.version} (a worker restarted); "
                f"resending weights",
                flush=True,
            )
            self.send_weights()
        scored = Scores.cat([p.scores for p in parts])
        total = total_rewards(
            scored.terms, self.term_weights, torch.arange(len(self.eval_prompts))
        ).total.tolist()  # each edit its own group
        # the standard errors let rl/compare.py tell a real drop from evaluation noise
        row = {"eval/reward_mean": float(np.mean(total)), "eval/reward_sem": _standard_error(total)}
        row.update(term_means("eval", scored))
        gold = None if parts[0].gold is None else [g for p in parts for g in p.gold]
        if gold is not None:
            row["eval/gold_score"] = float(np.mean(gold))
            row["eval/gold_sem"] = _standard_error(gold)
        # every evaluation scores the same prompts with the same noise: rl/compare.py pairs them per prompt
        per_prompt = {
            "step": at_step,
            "instructions": [p.instruction for p in self.eval_prompts],
            "proxy": [float(x) for x in total],
            "gold": gold,
        }
        scores_path = scores_file(self.run_dir, at_step)
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        scores_path.write_text(json.dumps(per_prompt))
        save_grid(self.run_dir / "eval" / f"step-{at_step:06d}.png", torch.cat([p.grid for p in parts])[:GRID_ROWS])
        row["perf/eval_s"] = time.perf_counter() - start
        row["perf/eval_driver_bytes"] = payload_bytes(parts)
        self.logger.log(at_step, row)
        print(f"[eval step {at_step}] " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
        return row

    def save(self, at_step: int) -> None:
        """The learners write the checkpoint (rank 0 the trainable weights, every rank its DeepSpeed state) into
        a staging folder; the driver logs what it received, then commits the folder with the run's state."""
        start = time.perf_counter()
        staging = checkpoint.staging_dir(self.run_dir, at_step)
        done = self.actors.watch([learner.save.remote(str(staging)) for learner in self.actors.learners])
        # logged before the commit: a resume from an earlier checkpoint drops this row with the step's others
        self.logger.log(
            at_step, {"perf/save_s": time.perf_counter() - start, "perf/checkpoint_driver_bytes": payload_bytes(done)}
        )
        state = {
            "step": at_step,
            "policy_version": self.version,
            "wandb_run_id": self.logger.run_id,
            "data_position": at_step * self.cfg.algo.prompts_per_step,
            "seed": self.cfg.seed,
        }
        checkpoint.commit(staging, state, self.cfg.keep_checkpoints)

    def stopped_by(self, lost: NodeLost) -> RuntimeError:
        """The error that stops a run whose node died. No checkpoint is attempted: the learners of the surviving
        nodes would wait in DeepSpeed's collectives for ranks that are gone."""
        return RuntimeError(
            f"{lost}; the run stops. Bring the cluster back to {self.cfg.cluster.num_nodes} node(s) and resume=auto "
            f"continues from {self.last_checkpoint()}"
        )

    def last_checkpoint(self) -> str:
        last = checkpoint.complete_checkpoints(self.run_dir)
        return str(last[-1]) if last else "the start (no checkpoint yet)"

    def save_after_failure(self, at_step: int) -> None:
        """Keep the steps done: a checkpoint of `at_step`, unless there is none to take (step 0) or it was saved
        already (saving it again would log the step's checkpoint metrics twice)."""
        saved = checkpoint.complete_checkpoints(self.run_dir)
        if at_step == 0 or (saved and saved[-1].name == f"{checkpoint.PREFIX}{at_step:06d}"):
            return
        try:
            self.save(at_step)
        except Exception as e:  # noqa: BLE001 - the original error matters more
            print(f"could not write a checkpoint at step {at_step} after the failure: {e}", flush=True)

    def log_step(
        self, step: int, results: list, stats: list[dict], reward, targets, scored: Scores, times: list[float]
    ) -> None:
        t0, t_rollout, t_update, t_sync = times
        total = reward.total
        keys = dict.fromkeys(k for s in stats for k in s)  # a rank whose every loss was non-finite has no loss stats
        row = {k: float(np.mean([s[k] for s in stats if k in s])) for k in keys}
        row["perf/learn_s"] = max(s["perf/learn_s"] for s in stats)  # the slowest rank
        if "train/ratio_min" in row:  # GRPO and PPO
            row["train/ratio_min"] = min(s["train/ratio_min"] for s in stats if "train/ratio_min" in s)
            row["train/ratio_max"] = max(s["train/ratio_max"] for s in stats if "train/ratio_max" in s)
        row.update(
            {
                "rollout/reward_mean": total.mean().item(),
                "rollout/reward_std": total.std().item(),
                "rollout/zero_std_ratio": targets.zero_std.float().mean().item(),
                "rollout/policy_version": self.version - 1,
                "perf/rollout_s": t_rollout - t0,
                "perf/sample_s": max(r.sample_s for r in results),
                "perf/reward_wait_s": max(r.wait_s for r in results),
                "perf/update_s": t_update - t_rollout,
                "perf/sync_s": t_sync - t_update,
                "perf/step_s": t_sync - t0,
                "perf/driver_bytes": payload_bytes(results) + payload_bytes(stats),
                "perf/rollout_bytes": sum(s["perf/fetched_bytes"] for s in stats),
            }
        )
        row.update(term_means("rollout", scored))
        row.update({f"rollout/reward_errors_{k}": v for k, v in scored.errors.items()})
        row.update(
            {f"rollout/reward_dropped_groups_{k}": v for k, v in reward.dropped_groups.items() if k in scored.errors}
        )
        row.update(self.reward_batches())
        self.logger.log(step, row)
        if "train/loss" not in row:
            shown = f"every loss non-finite, update skipped ({row['train/nonfinite_losses']:.0f} per rank)"
        elif "train/ratio_min" in row:
            shown = (
                f"loss {row['train/loss']:.4f} clipfrac {row['train/clipfrac']:.3f} kl~{row['train/approx_kl']:.2e} "
                f"ratio [{row['train/ratio_min']:.4f}, {row['train/ratio_max']:.4f}]"
            )
        else:
            shown = f"loss {row['train/loss']:.4f} drift {row['train/drift']:.2e}"
        print(
            f"step {step} reward {row['rollout/reward_mean']:.4f} +- {row['rollout/reward_std']:.4f} {shown} "
            f"({row['perf/step_s']:.1f} s)",
            flush=True,
        )


def prepare(cfg: RLConfig) -> dict:
    """Everything checked before an actor starts: the run directory, the prompts, the reward specs, what to resume."""
    run_dir = Path(cfg.output_dir)
    prompts, skipped = load_prompts(
        cfg.data.train_prompts, cfg.policy.height, cfg.policy.width, skip_bad=cfg.data.skip_bad
    )
    eval_prompts, eval_skipped = load_prompts(
        cfg.data.eval_prompts, cfg.policy.height, cfg.policy.width, cfg.data.num_eval, cfg.data.skip_bad
    )
    if skipped or eval_skipped:
        print(
            f"skipped bad prompt rows: {skipped} of {cfg.data.train_prompts}, {eval_skipped} of "
            f"{cfg.data.eval_prompts}",
            flush=True,
        )
    for term in cfg.reward.terms:
        check_spec(term.spec, f"reward.terms {term.name!r}")
    if cfg.reward.gold:
        check_spec(cfg.reward.gold, "reward.gold")
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    found = checkpoint.complete_checkpoints(run_dir)
    if found and resume_from != found[-1]:
        raise ValueError(
            f"{run_dir} already holds checkpoints up to {found[-1].name}; continue it with resume=auto, or use "
            f"another output_dir (a new run here would prune or mix with them)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return {
        "prompts": prompts,
        "eval_prompts": eval_prompts,
        "resume_from": resume_from,
        "skipped": (skipped, eval_skipped),
    }


def train(cfg: RLConfig, actors: ActorSet | None = None) -> dict:
    """Run (or continue) one RL run on `actors` (default: the Ray topology of cfg.cluster); returns the last
    evaluation metrics."""
    data = prepare(cfg)
    with ray_actors(cfg) if actors is None else contextlib.nullcontext(actors) as actors:
        run = Run(cfg, actors, data)
        try:
            return _steps(cfg, run, run.start(data["resume_from"]))
        except NodeLost as e:
            raise run.stopped_by(e) from e


def _steps(cfg: RLConfig, run: Run, step: int) -> dict:
    algo, P, G = cfg.algo, cfg.algo.prompts_per_step, cfg.algo.group_size
    algorithm = build_algorithm(algo)  # the driver only calls its targets(); the learners train with their own
    last_eval = run.evaluate(0) if step == 0 else {}
    if step == 0 and any(run.skipped):
        run.logger.log(0, {"data/skipped_prompts": run.skipped[0], "data/skipped_eval_prompts": run.skipped[1]})
    bad_steps = 0
    while step < cfg.num_steps:
        t0 = time.perf_counter()
        # ---- prompts: P prompts, each repeated G times; a group = one prompt -----------------------------------------
        rows = [run.prompts[i] for i in prompts_for_step(len(run.prompts), step, P, cfg.seed) for _ in range(G)]
        group_ids = torch.arange(P).repeat_interleave(G)

        # ---- rollout + reward: rollouts stay in the workers' object stores; the driver gets their scores -------------
        try:
            results = run.rollout(step, rows, group_ids)
        except Redo as why:
            run.redo(step, why)
            continue
        except NodeLost:  # no checkpoint: see Run.stopped_by
            raise
        except Exception:  # reward actor unavailable, a required term failed: keep what we have
            run.save_after_failure(step)
            raise
        t_rollout = time.perf_counter()
        scored = Scores.cat([s for res in results for s in res.scores])  # rows in the order of group_ids
        reward = total_rewards(
            scored.terms, run.term_weights, group_ids
        )  # an optional term missing in a group: left out of all of it
        if not torch.isfinite(reward.total).all():
            bad_steps += 1
            step += 1
            run.logger.log(step, {"train/skipped_nonfinite_reward": 1})
            if bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(
                    f"{bad_steps} consecutive steps had NaN/Inf rewards (step {step}); see the reward terms, "
                    f"resume=auto continues from the last checkpoint"
                )
            continue

        # ---- targets: per-row advantages (GRPO), returns (PPO, whose R - V the learners form) or optimality (NFT) ----
        targets = algorithm.targets(reward.total, group_ids)
        per_micro = [
            MicroTargets(v, cfg.seed * 1_000_003 + step * 1009 + i)
            for i, v in enumerate(targets.values.split(algo.micro_batch_size))
        ]

        # ---- update: each learner rank fetches its micro-batches from the workers' nodes -----------------------------
        try:
            stats = run.update(step, [r for res in results for r in res.rollouts], per_micro)
        except Redo as why:
            run.redo(step, why)
            continue
        run.redos = 0
        t_update = time.perf_counter()

        # ---- weight sync: learner rank 0 -> every rollout worker, through the object store ---------------------------
        run.version += 1
        run.send_weights()
        step += 1

        # ---- log, eval, checkpoint -----------------------------------------------------------------------------------
        run.log_step(step, results, stats, reward, targets, scored, [t0, t_rollout, t_update, time.perf_counter()])
        bad_steps = bad_steps + 1 if sum(s["train/nonfinite_losses"] for s in stats) else 0
        if bad_steps >= cfg.max_bad_steps:  # no save: the weights may be damaged; the last checkpoint is not
            raise RuntimeError(
                f"{bad_steps} consecutive steps had NaN/Inf losses (step {step}); lower algo.lr and resume=auto from "
                f"the last checkpoint"
            )
        if step % cfg.eval_every == 0 or step == cfg.num_steps:
            try:
                last_eval = run.evaluate(step)
            except Exception:  # keep this step's update: resume=auto continues after it (without this evaluation)
                run.save_after_failure(step)
                raise
        if step % cfg.save_every == 0 or step == cfg.num_steps:
            run.save(step)
    run.logger.close()
    return last_eval
