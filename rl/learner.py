"""The learner: one rank of a DeepSpeed ZeRO data-parallel group that updates the policy's trainable weights.

A plain class; rl/loop.py makes M of them Ray actors and gives each rank the same share of every
minibatch. Each optimizer step accumulates, over this rank's micro-batches and every trained
(stochastic) denoising step, the Flow-GRPO loss of rl/algorithms.py:
    clipped surrogate(logp_theta(x_{t+1} | x_t), logp_old, A) + kl_beta KL(theta || reference) [+ value loss, PPO]
DeepSpeed averages gradients over accumulation steps and ranks (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from policies.policy import EditingPolicy
from policies.rollout import Rollout
from rl.algorithms import clipped_surrogate, gaussian_kl, value_loss
from rl.config import RLConfig
from rl.value import ValueModel, value_inputs
from rl.workers import build_policy


class Learner:
    def __init__(self, cfg: RLConfig, rank: int, world_size: int, master_port: int, threads: int = 0, policy: EditingPolicy | None = None):
        """Join the DeepSpeed group as `rank` of `world_size` and set up the optimizer over the policy's trainable weights.

        `policy`: an editing policy already on cfg.cluster.device to train instead of the one cfg.policy names
        (launch/gpu_check.py passes random weights at real sizes); by default build_policy(cfg.policy, cfg.seed).
        """
        if threads:
            torch.set_num_threads(threads)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        if cfg.cluster.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if cfg.cluster.device == "cpu" else "nccl")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        if policy is None:
            policy = build_policy(cfg.policy, cfg.seed)
            if cfg.cluster.device != "cpu":
                policy.to(cfg.cluster.device)
        self.policy = policy
        algo = cfg.algo
        self.value = ValueModel() if algo.algo == "ppo" else None
        groups = [{"params": self.policy.trainable_parameters(), "lr": algo.lr}]
        module = nn.ModuleDict({"policy": nn.ParameterList(self.policy.trainable_parameters())})
        if self.value is not None:
            module["value"] = self.value
            groups.append({"params": list(self.value.parameters()), "lr": algo.value_lr})
        micro_per_rank = cfg.algo.prompts_per_step * cfg.algo.group_size // cfg.algo.micro_batch_size // world_size
        self.micro_per_update = micro_per_rank // algo.updates_per_step
        steps = cfg.policy.sampler.sde_window_size or max(cfg.policy.sampler.num_steps - 1, 1)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.algo.micro_batch_size,
            "gradient_accumulation_steps": self.micro_per_update * steps,
            "gradient_clipping": algo.max_grad_norm,
            "zero_optimization": {"stage": cfg.cluster.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},  # trainable weights stay float32 (see policies/adapters.py)
        }
        optimizer = torch.optim.AdamW(groups, lr=algo.lr, weight_decay=algo.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.steps_per_update = steps

    # ---- the update -----------------------------------------------------------------------------------------

    def update(self, rollouts: list[Rollout], advantages: list[Tensor], rewards: list[Tensor]) -> dict:
        """Train on this rank's micro-batches (in minibatch order); returns mean diagnostics of this rank.

        Args:
            rollouts: micro-batches, micro_per_update per optimizer step, updates_per_step of them in order.
            advantages: (B,) GRPO advantages per micro-batch (ignored by PPO, which uses R - V).
            rewards: (B,) total rewards per micro-batch (PPO's returns).
        """
        algo = self.cfg.algo
        device = self.cfg.cluster.device
        rollouts = [r.to(device) for r in rollouts]
        old_values = self._old_values(rollouts) if self.value is not None else None
        if old_values is not None:  # PPO: per-step advantages R - V, whitened over this rank's batch
            raw = [rewards[i].to(device)[:, None] - old_values[i] for i in range(len(rollouts))]
            flat = torch.cat([a[mb.stochastic] for a, mb in zip(raw, rollouts)])  # trained steps only (this rank's)
            advantages = [(a - flat.mean()) / (flat.std() + 1e-6) for a in raw]
        sums: dict[str, float] = {}
        count = 0
        nonfinite = 0
        ratio_min, ratio_max = float("inf"), float("-inf")
        for i, mb in enumerate(rollouts):
            trained = mb.stochastic.any(0).nonzero().flatten().tolist()
            if len(trained) != self.steps_per_update:
                raise ValueError(f"micro-batch {i} has {len(trained)} stochastic steps; the learner was set up for {self.steps_per_update} (policy.sampler: every rollout of a run must use the same num_steps and sde_window_size)")
            for t in trained:
                out = self.policy.log_prob(mb, t)
                adv = advantages[i][:, t] if old_values is not None else advantages[i].to(device)
                loss, stats = clipped_surrogate(out.log_probs, mb.log_probs[:, t], adv, algo.clip_range)
                row = asdict(stats)
                if algo.kl_beta > 0:
                    with torch.no_grad(), self.policy.reference():
                        ref = self.policy.log_prob(mb, t)
                    kl = gaussian_kl(out.mean, ref.mean, out.std).mean()
                    loss = loss + algo.kl_beta * kl
                    row["kl"] = kl.item()
                if self.value is not None:
                    v = self.value(value_inputs(mb, t))
                    vloss = value_loss(v, old_values[i][:, t], rewards[i].to(device), algo.value_clip)
                    loss = loss + algo.value_coef * vloss
                    row["value_loss"] = vloss.item()
                if not torch.isfinite(loss):
                    # keep every rank's backward/step sequence intact: a zero loss on the same parameters
                    nonfinite += 1
                    loss = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
                row["loss"] = loss.item()
                self.engine.backward(loss)
                self.engine.step()
                ratio_min, ratio_max = min(ratio_min, row.pop("ratio_min")), max(ratio_max, row.pop("ratio_max"))
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {f"train/{k}": v / count for k, v in sums.items()}
        out["train/ratio_min"], out["train/ratio_max"] = ratio_min, ratio_max
        out["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["train/lr"] = self.engine.optimizer.param_groups[0]["lr"]
        out["train/nonfinite_losses"] = nonfinite
        return out

    @torch.no_grad()
    def _old_values(self, rollouts: list[Rollout]) -> list[Tensor]:
        return [torch.stack([self.value(value_inputs(mb, t)) for t in range(mb.num_steps)], 1) for mb in rollouts]

    # ---- weights and checkpoints -----------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The policy's trainable weights as numpy arrays (cheapest through Ray's object store)."""
        return {k: v.float().cpu().numpy() for k, v in self.policy.trainable_state().items()}

    def save(self, path: str) -> None:
        """This rank's part of a checkpoint: trainable weights, value model, optimizer (DeepSpeed format)."""
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"), tag="state", exclude_frozen_parameters=True)

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
