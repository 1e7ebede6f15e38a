"""The RL driver: `train(cfg, actors)`, whose step reads top to bottom.

    prompts -> rollout (rollout workers; each node's reward actor scores its workers' micro-batches)
            -> targets (the algorithm's: advantages, returns or optimality; from rewards only)
            -> update (DeepSpeed learner ranks, which fetch their rollouts from the workers' object stores)
            -> weight sync (versioned) -> log / eval / checkpoint

The driver speaks the plain methods of an actor set (rl/actors.py `ActorSet`) and imports no Ray: the Ray
topology over any number of nodes (rl/ray_actors.py `ray_actors`) and the set in this process
(rl/actors.py `local_actors`) run the same step. The driver receives rewards and metadata, never rollouts. What
goes wrong on the way (a worker died, weights out of date, rollouts lost, a learner died, NaN rewards or losses)
is handled by the named helpers of `Run`, so that `_steps` shows only the step. Entry point: launch/grpo_edit.py.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from PIL import Image

from reward.config import save_config
from reward.evaluate import parse_reward_spec
from rl import checkpoint
from rl.actors import ActorLost, ActorSet, NodeLost, Redo, RolloutShare, payload_bytes
from rl.algorithms import MicroTargets, build_algorithm
from rl.compare import scores_file
from rl.config import RLConfig
from rl.logger import MetricsLogger
from rl.prompts import load_prompts, prompts_for_step
from rl.refresh import RefreshRequest, select_pairs
from rl.rewards import Scores, total_rewards

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


def grid_caption(prompts: list, shown: list[int], proxy: list[float], gold: list[float] | None) -> str:
    """One line per row of an evaluation grid (source | edit): the instruction and its scores."""
    return "\n".join(
        f"{row + 1}. {prompts[i].instruction}: proxy {proxy[i]:.3f}" + ("" if gold is None else f", gold {gold[i]:.3f}")
        for row, i in enumerate(shown)
    )


class Run:
    """One run's state and the helpers that keep the step in `_steps` short: rollout, update, weight sync,
    evaluation, checkpoints, and the recovery each needs."""

    def __init__(self, cfg: RLConfig, actors: ActorSet, algorithm, data: dict):
        self.cfg, self.actors = cfg, actors
        self.run_dir = Path(cfg.output_dir)
        self.prompts, self.eval_prompts, self.skipped = data["prompts"], data["eval_prompts"], data["skipped"]
        self.term_weights = {t.name: t.weight for t in cfg.reward.terms}
        self.algorithm = algorithm  # the driver calls only its targets()
        self.version = 0
        self.reward_version = 0  # the refreshed reward term's weights version (0: as loaded)
        self.redos = 0
        self.bad_steps = 0  # consecutive steps with non-finite rewards or losses
        self.logger: MetricsLogger | None = None

    # ---- start --------------------------------------------------------------------------------------------------

    def start(self, resume_from: Path | None) -> int:
        """Load the checkpoint (if any) into the learners, send the weights to the workers, open the logger; returns
        the step."""
        step, run_id = 0, None
        if resume_from is not None:
            state, _ = checkpoint.load(resume_from)
            self.actors.load(str(resume_from))
            step, self.version, run_id = state["step"], state["policy_version"], state["wandb_run_id"]
            self.reward_version = state.get("reward_version", 0)  # checkpoints of runs from before the refresh existed
            if self.reward_version and not self.cfg.reward.refresh.term:
                print(
                    f"warning: {resume_from} was saved with a refreshed reward (version {self.reward_version}); "
                    f"without reward.refresh this run goes on with the reward as loaded from its spec",
                    flush=True,
                )
            print(f"resumed from {resume_from} (step {step})", flush=True)
        self.actors.send_weights(self.version)
        self.logger = MetricsLogger(
            self.run_dir,
            step if resume_from else None,
            self.cfg.wandb,
            self.cfg.wandb_project,
            run_id,
            asdict(self.cfg),
        )
        if step == 0 and any(self.skipped):
            self.logger.log(0, {"data/skipped_prompts": self.skipped[0], "data/skipped_eval_prompts": self.skipped[1]})
        return step

    def batch(self, step: int) -> tuple[list, torch.Tensor]:
        """The step's rows: prompts_per_step prompts, each repeated group_size times (a group = one prompt)."""
        P, G = self.cfg.algo.prompts_per_step, self.cfg.algo.group_size
        rows = [self.prompts[i] for i in prompts_for_step(len(self.prompts), step, P, self.cfg.seed) for _ in range(G)]
        return rows, torch.arange(P).repeat_interleave(G)

    # ---- rollout ------------------------------------------------------------------------------------------------

    def rollout(self, step: int, rows: list, group_ids: torch.Tensor) -> list:
        """Each worker samples its share in micro-batches, scored by its node's reward actor. Raises Redo when a
        worker died mid-step or sampled with other weights than the current version; any other failure (a reward
        actor unavailable, a required term failed) stops the run with a checkpoint of the steps done."""
        cut = np.array_split(np.arange(len(rows)), self.actors.num_rollout_workers)
        shares = [
            RolloutShare([rows[i] for i in s], group_ids[s], self.cfg.seed * 1_000_003 + step * 1009 + k)
            for k, s in enumerate(cut)
        ]
        try:
            results = self.actors.rollout(shares, self.cfg.algo.micro_batch_size, self.cfg.cluster.async_reward)
        except (Redo, NodeLost):  # NodeLost: no checkpoint (see stopped_by)
            raise
        except Exception:
            self.save_after_failure(step)
            raise
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
            self.actors.send_weights(self.version)
        except ActorLost as e:
            self.save_after_failure(step)
            raise RuntimeError(f"step {step}: {e}; resume=auto continues from {self.last_checkpoint()}") from e

    def rewards(self, step: int, results: list, group_ids: torch.Tensor):
        """The rows' scores and total rewards, or None when some are NaN/Inf: the step is skipped (and counted;
        max_bad_steps in a row stop the run)."""
        scored = Scores.cat([s for res in results for s in res.scores])  # rows in the order of group_ids
        # an optional term missing in a group: left out of all of it
        reward = total_rewards(scored.terms, self.term_weights, group_ids)
        if torch.isfinite(reward.total).all():
            return scored, reward
        self.bad_steps += 1
        self.logger.log(step + 1, {"train/skipped_nonfinite_reward": 1})
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} consecutive steps had NaN/Inf rewards (step {step + 1}); see the reward terms, "
                f"resume=auto continues from the last checkpoint"
            )
        return None

    def micro_targets(self, step: int, targets) -> list[MicroTargets]:
        """Each micro-batch's share of the targets, with the seed of its loss's randomness."""
        values = targets.values.split(self.cfg.algo.micro_batch_size)
        return [MicroTargets(v, self.cfg.seed * 1_000_003 + step * 1009 + i) for i, v in enumerate(values)]

    # ---- update -------------------------------------------------------------------------------------------------

    def update(self, step: int, micro: list, targets: list[MicroTargets]) -> list[dict]:
        """Minibatch u = micro-batches [u K, (u + 1) K); rank r takes every M-th of each and fetches them itself.
        Raises Redo when a rank could not fetch its rollouts (no rank trained); a learner that died stops the run."""
        M, U = self.actors.num_learners, self.cfg.algo.updates_per_step
        K = len(micro) // U
        order = [[u * K + j for u in range(U) for j in range(r, K, M)] for r in range(M)]
        try:
            stats = self.actors.update([([micro[i] for i in idx], [targets[i] for i in idx]) for idx in order])
        except ActorLost as e:
            raise RuntimeError(
                f"{e} during step {step + 1}; resume=auto continues from {self.last_checkpoint()}"
            ) from e
        lost = [s["lost"] for s in stats if s.get("lost")]
        if lost:
            raise Redo(f"rollouts lost before the update ({lost[0]})")
        return stats

    def check_losses(self, step: int, stats: list[dict]) -> None:
        """Stop after max_bad_steps steps in a row whose every loss was NaN/Inf (no save: the weights may be
        damaged; the last checkpoint is not)."""
        self.bad_steps = self.bad_steps + 1 if sum(s["train/nonfinite_losses"] for s in stats) else 0
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} consecutive steps had NaN/Inf losses (step {step}); lower algo.lr and resume=auto "
                f"from the last checkpoint"
            )

    def reward_batches(self) -> dict:
        """reward/node_<n>/batch_mean: the mean edits per scoring call of each node's reward actor since the last
        step (left out for a node whose actor did not answer)."""
        return {
            f"reward/node_{n}/batch_mean": float(np.mean(sizes)) if sizes else float("nan")
            for n, sizes in enumerate(self.actors.reward_batch_sizes())
            if sizes is not None
        }

    # ---- reward refresh -----------------------------------------------------------------------------------------

    def refresh(self, step: int, rows: list, group_ids: torch.Tensor, scored: Scores, micro: list) -> None:
        """Pairs of the step's rows (rl/refresh.py select_pairs on the refreshed term's scores) go to the reward
        trainer, located in the micro-batches (each worker's rows are whole micro-batches, in row order). A failure
        stops the run without a checkpoint: the trainer may be half-way, the last checkpoint is whole."""
        r = self.cfg.reward.refresh
        scores = scored.terms[r.term]
        pairs = select_pairs(scores, group_ids, r.pairs, r.select, self.cfg.seed * 1_000_003 + step)
        m = self.cfg.algo.micro_batch_size
        needed = sorted({i // m for pair in pairs for i in pair})  # only these micro-batches travel to the trainer
        at = {k: n for n, k in enumerate(needed)}
        request = RefreshRequest(
            step,
            [rows[i] for i, _ in pairs],
            [((at[i // m], i % m), (at[j // m], j % m)) for i, j in pairs],
            [(scores[i], scores[j]) for i, j in pairs],
            [micro[k] for k in needed],
            train=step < self.cfg.num_rl_steps,
        )
        try:
            metrics = self.actors.refresh(request)
        except NodeLost:  # train() stops the run naming the node (Run.stopped_by)
            raise
        except Exception as e:
            raise RuntimeError(
                f"the reward refresh after step {step} failed: {type(e).__name__}: {e}; resume=auto continues from "
                f"{self.last_checkpoint()}"
            ) from e
        self.reward_version = metrics["refresh/version"]
        self.logger.log(step, metrics)

    # ---- evaluation and checkpoints ------------------------------------------------------------------------------

    def evaluate(self, at_step: int) -> dict:
        """ODE edits of the evaluation prompts, judged on the workers' nodes (reward terms and gold judge): the
        driver receives their scores and thumbnails, never the edits. Writes each prompt's scores (rl/compare.py
        pairs them across evaluations), a grid, and the metrics row."""
        start = time.perf_counter()
        cut = np.array_split(np.arange(len(self.eval_prompts)), self.actors.num_rollout_workers)
        shares = [[self.eval_prompts[i] for i in s] for s in cut]
        for attempt in range(MAX_REDOS + 1):
            parts = self.actors.evaluate(shares, self.cfg.seed, self.cfg.algo.micro_batch_size, GRID_ROWS)
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
            self.actors.send_weights(self.version)
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
        grid = self.run_dir / "eval" / f"step-{at_step:06d}.png"
        save_grid(grid, torch.cat([p.grid for p in parts])[:GRID_ROWS])
        row["perf/eval_s"] = time.perf_counter() - start
        row["perf/eval_driver_bytes"] = payload_bytes(parts)
        self.logger.log(at_step, row)
        shown = [int(i) for s, p in zip(cut, parts) for i in s[: len(p.grid)]][:GRID_ROWS]  # the grid's rows
        self.logger.log_image(at_step, "eval/grid", grid, grid_caption(self.eval_prompts, shown, total, gold))
        print(f"[eval step {at_step}] " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
        return row

    def evaluate_or_save(self, at_step: int) -> dict:
        """`evaluate`; when it fails, keep this step's update (resume=auto continues after it, without the
        evaluation)."""
        try:
            return self.evaluate(at_step)
        except Exception:
            self.save_after_failure(at_step)
            raise

    def save(self, at_step: int) -> None:
        """The learners write the checkpoint (rank 0 the trainable weights, every rank its DeepSpeed state) into
        a staging folder; the driver logs what it received, then commits the folder with the run's state."""
        start = time.perf_counter()
        staging = checkpoint.staging_dir(self.run_dir, at_step)
        done = self.actors.save(str(staging))
        # logged before the commit: a resume from an earlier checkpoint drops this row with the step's others
        self.logger.log(
            at_step, {"perf/save_s": time.perf_counter() - start, "perf/checkpoint_driver_bytes": payload_bytes(done)}
        )
        state = {
            "step": at_step,
            "policy_version": self.version,
            "reward_version": self.reward_version,
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
        parse_reward_spec(term.spec, f"reward.terms {term.name!r}")
    if cfg.reward.gold:
        parse_reward_spec(cfg.reward.gold, "reward.gold")
    refresh = cfg.reward.refresh
    if refresh.term and not refresh.labeller.startswith("queue:"):
        parse_reward_spec(refresh.labeller, "reward.refresh.labeller")
    if refresh.term and refresh.original_data and not Path(refresh.original_data).is_file():
        raise FileNotFoundError(f"reward.refresh.original_data: no EditReward-Data file at {refresh.original_data}")
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    if resume_from is not None:
        checkpoint.check_decision_weights(resume_from, cfg.policy.trainable.decision_mean)
    found = checkpoint.complete_checkpoints(run_dir)
    if found and resume_from != found[-1]:
        raise ValueError(
            f"{run_dir} already holds checkpoints up to {found[-1].name}; continue it with resume=auto, or use "
            f"another output_dir (a new run here would prune or mix with them)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:  # a fresh run: no labelled pairs of an earlier attempt that never checkpointed
        shutil.rmtree(run_dir / "refresh", ignore_errors=True)
    save_config(cfg, run_dir / "config.yaml")
    return {
        "prompts": prompts,
        "eval_prompts": eval_prompts,
        "resume_from": resume_from,
        "skipped": (skipped, eval_skipped),
    }


def train(cfg: RLConfig, actor_set: Callable[[RLConfig, Any], ContextManager[ActorSet]]) -> dict:
    """Run (or continue) one RL run on the actors `actor_set(cfg, algorithm)` starts (rl/ray_actors.py ray_actors,
    or rl/actors.py local_actors) once the run's inputs are checked; returns the last evaluation metrics. The
    algorithm is built here, once: the driver calls its targets(), the learners train with it."""
    data = prepare(cfg)
    algorithm = build_algorithm(cfg.algo, cfg.seed)
    with actor_set(cfg, algorithm) as actors:
        run = Run(cfg, actors, algorithm, data)
        try:
            return _steps(cfg, run, run.start(data["resume_from"]))
        except NodeLost as e:
            raise run.stopped_by(e) from e


def _steps(cfg: RLConfig, run: Run, step: int) -> dict:
    last_eval = run.evaluate(0) if step == 0 else {}
    while step < cfg.num_rl_steps:
        t0 = time.perf_counter()
        # ---- prompts: prompts_per_step prompts, each repeated group_size times ------------------------------------
        rows, group_ids = run.batch(step)
        try:
            # ---- rollout + reward: rollouts stay in the workers' object stores; the driver gets their scores -------
            results = run.rollout(step, rows, group_ids)
            t_rollout = time.perf_counter()
            rewarded = run.rewards(step, results, group_ids)
            if rewarded is None:  # NaN/Inf rewards: the step is skipped
                step += 1
                continue
            scored, reward = rewarded

            # ---- targets: advantages (GRPO), returns (PPO, whose R - V the learners form) or optimality (NFT) -----
            targets = run.algorithm.targets(reward.total, group_ids)

            # ---- update: each learner rank fetches its micro-batches from the workers' nodes ----------------------
            micro = [r for res in results for r in res.rollouts]
            stats = run.update(step, micro, run.micro_targets(step, targets))
        except Redo as why:
            run.redo(step, why)
            continue
        run.redos = 0
        t_update = time.perf_counter()

        # ---- weight sync: learner rank 0 -> every rollout worker, through the object store ---------------------------
        run.version += 1
        run.actors.send_weights(run.version)
        step += 1

        # ---- reward refresh: labelled pairs of this step's samples train the reward, swapped in between steps -------
        if cfg.reward.refresh.term and step % cfg.reward.refresh.every == 0:
            run.refresh(step, rows, group_ids, scored, micro)

        # ---- log, eval, checkpoint -----------------------------------------------------------------------------------
        run.log_step(step, results, stats, reward, targets, scored, [t0, t_rollout, t_update, time.perf_counter()])
        run.check_losses(step, stats)
        if step % cfg.eval_every == 0 or step == cfg.num_rl_steps:
            last_eval = run.evaluate_or_save(step)
        if step % cfg.save_every == 0 or step == cfg.num_rl_steps:
            run.save(step)
    run.logger.close()
    return last_eval
