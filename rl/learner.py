"""The learner: one rank of a DeepSpeed ZeRO data-parallel group that updates the policy's trainable weights.

A plain class; rl/ray_actors.py makes M of them Ray actors (num_learners per node, one group across nodes) and the
driver gives each rank the same share of every minibatch, as object references: each rank fetches its
rollouts from the rollout workers' nodes itself (`fetch`). The algorithm (rl/algorithms.py: GRPO, PPO or NFT) is one
object behind one seam: `prepare` once on this rank's micro-batches, then for every micro-batch and each of its loss
terms (GRPO/PPO: the trained denoising steps; NFT: the drawn noise levels) `loss`, one backward each. Each optimizer
step accumulates over a minibatch's micro-batches and terms; DeepSpeed averages gradients over accumulation
steps and ranks (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from policies.policy import EditingPolicy
from policies.rollout import Rollout
from rl import checkpoint
from rl.algorithms import MicroTargets
from rl.config import RLConfig
from rl.workers import build_policy


def zero3_modules(net: nn.Module) -> list[nn.Module]:
    """The modules of `net` that ZeRO-3 partitions over the learner ranks: those owning a trained parameter. A
    full fine-tune hands over the whole denoiser; LoRA only its adapters, and the frozen base stays whole on
    every rank. Why not the base too: it is the bf16 weights every forward runs through, which ZeRO-3 would
    all-gather block by block in each of the forward, the recomputation and the backward, for a saving of at
    most the base's size (24 GB for FLUX.1 Kontext, 40 GB for Qwen-Image on 80 GB GPUs, where it fits whole).
    launch/plan.py plans the same split."""
    return [m for m in net.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
"""The environment variables a learner sets for torch.distributed and DeepSpeed."""


class Learner:
    def __init__(
        self,
        cfg: RLConfig,
        algorithm,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        local_rank: int = 0,
        threads: int = 0,
        policy: EditingPolicy | None = None,
        fetch: Callable[[list], tuple[list[Rollout], str, int]] | None = None,
    ):
        """Train with `algorithm` (rl/algorithms.py build_algorithm, built once per run by whoever starts the
        learners). Join the DeepSpeed group as `rank` of `world_size`, whose rank 0 listens on
        master_addr:master_port, and set up the optimizer over the policy's trainable weights. `local_rank`: the
        device index in this process (0 in a Ray GPU actor, which sees only its own GPU). `fetch`: turns what
        update() is given into rollouts,
        with why it could not ('' when it could) and the bytes it moved (Ray actors get rl/ray_actors.py's
        fetch_rollouts, which reads object references); by default update() is given the rollouts themselves.

        `policy`: an editing policy already on cfg.cluster.device to train instead of the one cfg.policy names
        (launch/gpu_check.py passes random weights at real sizes); by default build_policy(cfg.policy, cfg.seed).
        """
        if threads:
            torch.set_num_threads(threads)
        # what close() puts back: an in-process learner (tests, benchmarks) must not leave a process that looks
        # distributed to what runs next (transformers' Trainer would wrap its model in DDP)
        self._environ = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        if cfg.cluster.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if cfg.cluster.device == "cpu" else "nccl")
        self.cfg = cfg
        self.fetch = fetch or (lambda rollouts: (rollouts, "", 0))
        self.rank = rank
        self.world_size = world_size
        if policy is None:
            policy = build_policy(cfg.policy, cfg.seed)
            policy.drop_encoders()  # rollouts carry the encoders' outputs: a learner runs only the denoiser
            if cfg.cluster.device != "cpu":
                policy.to(cfg.cluster.device)
        self.policy = policy
        algo = cfg.algo
        self.algorithm = algorithm
        # The decision weights at their own lr (AlgoConfig.decision_lr); a group of their own only when it differs,
        # so that a run without one keeps the optimizer state layout (and checkpoints) of a single group.
        split = algo.decision_lr not in (None, algo.lr)
        decision = self.policy.decision_parameters() if split else []
        rest = [p for p in self.policy.trainable_parameters() if all(p is not d for d in decision)]
        groups = [{"params": rest, "lr": algo.lr}]
        if decision:
            groups.append({"params": decision, "lr": algo.decision_lr})
        self.zero3 = cfg.cluster.zero_stage == 3
        if self.zero3:
            # ZeRO-3 partitions the parameters of the engine's modules and gathers a module's own parameters in
            # its forward (and backward) hooks. The policy's forward runs through the denoiser's modules, not the
            # engine's forward: so the engine gets the denoiser's modules that own trained parameters, and every
            # call of them inside the policy gathers what it needs.
            module = nn.ModuleDict({"policy": nn.ModuleList(zero3_modules(self.policy.trained_module()))})
        else:
            module = nn.ModuleDict({"policy": nn.ParameterList(self.policy.trainable_parameters())})
        for name, (extra, lr) in self.algorithm.modules().items():  # PPO's value model
            module[name] = extra.to(cfg.cluster.device)
            groups.append({"params": list(extra.parameters()), "lr": lr})
        micro_per_rank = cfg.algo.prompts_per_step * cfg.algo.group_size // cfg.algo.micro_batch_size // world_size
        self.micro_per_update = micro_per_rank // algo.updates_per_step
        self.terms_per_micro_batch = self.algorithm.terms_per_micro_batch(cfg.policy.sampler)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.algo.micro_batch_size,
            "gradient_accumulation_steps": self.micro_per_update * self.terms_per_micro_batch,
            "gradient_clipping": algo.max_grad_norm,
            "zero_optimization": {"stage": cfg.cluster.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},  # trainable weights stay float32 (see policies/adapters.py)
        }
        optimizer = torch.optim.AdamW(groups, lr=algo.lr, weight_decay=algo.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    # ---- the update -----------------------------------------------------------------------------------------

    def update(self, rollouts: list, targets: list[MicroTargets]) -> dict:
        """Train on this rank's micro-batches (in minibatch order); returns mean diagnostics of this rank.

        Args:
            rollouts: micro-batches (Rollouts, or what `fetch` turns into them), micro_per_update per optimizer step,
                updates_per_step of them in order.
            targets: each micro-batch's targets (rl/algorithms.py: advantages, returns or optimality) and seed.

        If any rank cannot fetch its rollouts (a rollout worker died and its objects with it), no rank trains and
        each returns {"lost": ...}: the driver redoes the step. Ranks agree first, so none waits in a collective.
        """
        start = time.perf_counter()
        fetched, lost, fetched_bytes = self.fetch(rollouts)
        if self.world_size > 1:
            flag = torch.tensor([0 if lost else 1])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            lost = lost or ("" if flag.item() else "another rank lost its rollouts")
        if lost:
            return {"lost": lost}
        device = self.cfg.cluster.device
        rollouts = [r.to(device) for r in fetched]
        targets = [MicroTargets(t.values.to(device), t.seed) for t in targets]
        prepared = self.algorithm.prepare(self.policy, rollouts, targets)
        sums: dict[str, float] = {}
        count = nonfinite = skipped = 0
        grad_norms = []
        ratio_min, ratio_max = float("inf"), float("-inf")
        for i, mb in enumerate(rollouts):
            terms = self.algorithm.terms(mb)
            if len(terms) != self.terms_per_micro_batch:
                raise ValueError(
                    f"micro-batch {i} has {len(terms)} loss terms; the learner was set up for "
                    f"{self.terms_per_micro_batch} (policy.sampler: every rollout of a run must use the same "
                    f"num_steps, sde_window_size and sample_last_step)"
                )
            for term in terms:
                # what engine.forward does first (the policy's forward bypasses the engine): ZeRO counts its
                # accumulation micro-steps here, and without it ZeRO-3 keeps only the last micro-step's gradient
                self.engine.optimizer.clear_backward_seen_flag()
                loss, row = self.algorithm.loss(self.policy, mb, prepared[i], term)
                boundary = self.engine.is_gradient_accumulation_boundary()
                # The NaN guard: a non-finite loss goes through backward like any other, so every rank makes the
                # same collectives (ZeRO-3 reduces gradients inside backward); its gradient makes the global
                # gradient norm, reduced over the ranks, non-finite, and DeepSpeed then skips this optimizer step
                # on every rank and clears the accumulated gradients. The next minibatch starts clean.
                self.engine.backward(loss)
                self.engine.step()
                if boundary:
                    if self.engine.was_step_applied():
                        grad_norms.append(float(self.engine.get_global_grad_norm()))
                    else:
                        skipped += 1
                if not torch.isfinite(loss):
                    nonfinite += 1
                    continue
                row["loss"] = loss.item()
                if "ratio_min" in row:
                    ratio_min, ratio_max = min(ratio_min, row.pop("ratio_min")), max(ratio_max, row.pop("ratio_max"))
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {f"train/{k}": v / count for k, v in sums.items()}
        if ratio_min <= ratio_max:
            out["train/ratio_min"], out["train/ratio_max"] = ratio_min, ratio_max
        out["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0  # over the optimizer steps taken
        out["train/lr"] = self.engine.optimizer.param_groups[0]["lr"]
        out["train/nonfinite_losses"] = nonfinite
        out["train/skipped_updates"] = skipped
        out["perf/learn_s"] = time.perf_counter() - start  # the fetch and the training, inside this rank
        out["perf/fetched_bytes"] = fetched_bytes
        return out

    # ---- weights and checkpoints -----------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, np.ndarray] | None:
        """The policy's trainable weights as numpy arrays (cheapest through Ray's object store). Under ZeRO-3 every
        rank must call it (the weights are gathered from all ranks) and only rank 0 returns them (others None)."""
        with self.gathered():
            if self.rank and self.zero3:
                return None
            return {k: v.float().cpu().numpy() for k, v in self.policy.trainable_state().items()}

    def gathered(self):
        """Within the block the trainable weights are whole on this rank (ZeRO-3: a collective every rank enters)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.policy.trainable_parameters(), modifier_rank=None)

    def save(self, path: str) -> None:
        """This rank's part of a checkpoint: its DeepSpeed state (trainable weights, value model, optimizer), and on
        rank 0 the trainable weights as policy.safetensors (under ZeRO-3 gathered from every rank, which all call
        this)."""
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        with self.gathered():
            if self.rank == 0:
                checkpoint.write_weights(Path(path), self.policy.trainable_state())

    def load(self, path: str) -> None:
        """Resume this rank from a checkpoint. DeepSpeed's own loader unpickles with weights_only=False; ours
        reads the same files with weights_only=True, allowing only the three DeepSpeed classes they hold."""
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        def load_weights_only(file, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(file, map_location=map_location, weights_only=True)

        self.engine.checkpoint_engine.load = load_weights_only
        self.engine.load_checkpoint(str(Path(path) / "deepspeed"), tag="state", load_module_strict=False)

    def barrier(self) -> int:
        torch.distributed.barrier()
        return self.rank

    def close(self) -> None:
        """Free the engine and leave the process group, through DeepSpeed, which also drops the groups it cached
        (a learner made later in this process, as in a test, then starts a fresh group), and put back the
        environment variables the learner set."""
        import deepspeed

        del self.engine
        gc.collect()
        deepspeed.comm.destroy_process_group()
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
