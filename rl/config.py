"""The RL run's configuration: one dataclass per part, filled from a preset YAML and `a.b=c` overrides.

    cfg = load_config(RLConfig, "launch/configs/shapeedit.yaml", ["algo.kl_beta=0.04"])

Unknown keys are errors that list the valid ones (reward.config.load_config); the resolved config is
written to the run directory as config.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from policies.adapters import TrainableConfig
from policies.registry import policy_entry
from policies.sampling import SamplerConfig
from reward.config import build


@dataclass
class PolicyConfig:
    RENAMED: ClassVar[dict[str, str]] = {
        "lora_rank": "trainable.lora_rank",
        "lora_alpha": "trainable.lora_alpha",
        "lora_targets": "trainable.lora_targets",
        "gradient_checkpointing": "trainable.gradient_checkpointing",
        "eval_steps": "eval_denoising_steps",
    }

    kind: str = "shapeedit"
    """Which editing model (policies/registry.py POLICIES): 'shapeedit' (a saved ShapeEdit policy),
    'flux_kontext' or 'qwen_image_edit' (diffusers weights)."""
    path: str = "runs/demo/policy"
    """Folder or hub id of the pretrained policy."""
    options: dict = field(default_factory=dict)
    """The kind's own options (policies/registry.py: e.g. {plus: true} for Qwen-Image-Edit-Plus,
    {max_sequence_length: 256} for FLUX.1 Kontext); an unknown one is an error that lists the valid ones."""
    dtype: str = "float32"
    """Weights dtype: float32 or bfloat16 (the SDE math and the adapters are float32 either way)."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    """What RL trains: LoRA adapters on the denoiser (rank, alpha, targets) or every weight (lora_rank 0), and
    gradient checkpointing (policies/adapters.py)."""
    height: int = 64
    """Image height the policy edits (sources are resized to it)."""
    width: int = 64
    """Image width."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Rollout sampling: denoising steps, noise level, SDE window, guidance."""
    eval_denoising_steps: int = 10
    """Denoising (ODE) steps of evaluation samples."""
    eval_samples: int = 1
    """Samples per evaluation prompt, drawn from the same seeds at every evaluation; a prompt's scores are their
    mean, so a policy whose samples of one prompt differ (a decision code) is judged by its distribution, not by
    one draw."""

    def __post_init__(self):
        entry = policy_entry(self.kind)
        self.kind_options()  # refuses unknown options now, before any actor starts
        if self.trainable.gradient_checkpointing and not entry.gradient_checkpointing:
            raise ValueError(
                f"policy.trainable.gradient_checkpointing: the {self.kind} policy does not support it; set it false"
            )
        if self.eval_samples < 1:
            raise ValueError(f"policy.eval_samples must be >= 1, got {self.eval_samples}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"policy.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.sampler.sample_last_step and not entry.categorical_last_step:
            raise ValueError(
                f"policy.sampler.sample_last_step: {self.kind} ends in a Gaussian step, which has no categorical "
                f"draw; set it false"
            )

    def kind_options(self):
        """policy.options as the kind's options dataclass."""
        return build(policy_entry(self.kind).options, self.options, "policy.options.")

    def eval_sampler(self) -> SamplerConfig:
        """Evaluation's sampler: ODE (noise 0) with eval_denoising_steps, the rollout sampler's guidance."""
        return SamplerConfig(
            num_steps=self.eval_denoising_steps,
            noise_level=0.0,
            guidance_scale=self.sampler.guidance_scale,
            guidance=self.sampler.guidance,
        )


@dataclass
class RewardTerm:
    name: str = "jrm"
    """Metric name of the term (rollout/reward_<name>)."""
    spec: str = "jrm:runs/demo/jrm/final"
    """jrm:PATH, generative:PATH, oracle:SHAPEEDIT_DIR or preservation (1 - mean |edit - source|)."""
    weight: float = 1.0
    """Weight in the total reward."""
    required: bool = True
    """A required term that fails stops the run (with a checkpoint). An optional one that raises, or returns None
    for an edit, leaves that edit unscored: its whole GRPO group is then scored without this term (the term's
    weight dropped for the group), counted in rollout/reward_errors_<name> (edits) and
    rollout/reward_dropped_groups_<name>."""
    micro_batch_size: int = 16
    """Edits this term forwards at once (its memory bound; JRM scores do not depend on it). The reward actor's
    calls of up to reward.max_batch_size edits are split into these."""

    def __post_init__(self):
        if not self.name or self.micro_batch_size < 1:
            raise ValueError(
                f"reward term {self.name!r}: name must be non-empty and micro_batch_size >= 1, got "
                f"{self.micro_batch_size}"
            )


LABELLERS = ("oracle", "generative", "queue")


@dataclass
class RefreshConfig:
    """Online refresh of a JRM term while RL runs (rl/refresh.py, docs/rl.md "Online reward refresh")."""

    term: str = ""
    """The reward term to refresh (a `jrm:` term of reward.terms); '' = no refresh, the reward stays frozen."""
    every: int = 2
    """Refresh after every this many RL steps (between steps: a rollout batch is never scored by two versions)."""
    pairs: int = 16
    """Pairs of the step's rollouts sent to the labeller at each refresh (fewer once the budget runs out)."""
    select: str = "top"
    """Which pairs: 'top' (in each group, the sample the reward ranks first against samples spread over the rest of
    its ranking: the edits RL is about to reinforce, where a wrong reward is reward hacking) or 'random'."""
    labeller: str = ""
    """Who labels them: oracle:SHAPEEDIT_DIR (the exact ShapeEdit judge, with grounded critiques), generative:PATH (a
    judge model decoding critiques with verdicts) or queue:DIR (pairs written to DIR/pending, labels read back from
    DIR/labels when present; the run never waits for them)."""
    tie_eps: float = 0.02
    """Judged scores closer than this make a tie (not trained on: ShapeEdit's generator's rule)."""
    budget: int = 2000
    """Labels asked for over the whole run; refreshes stop asking once it is spent."""
    steps: int = 8
    """Optimizer steps of the reward trainer per refresh (0: label and measure only, never train: the frozen
    control with the same on-policy accuracy curve)."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate of the refresh."""
    original_data: str = ""
    """EditReward-Data json/jsonl of the reward model's own training pairs, replayed beside the labelled ones so it
    does not forget them; '' = labelled pairs only."""
    original_fraction: float = 0.5
    """Share of each refresh batch drawn from original_data (when given)."""
    alpha: float | None = None
    """L_LM's share in the refresh loss; None: the model's own, read with the rest of its loss from the config.yaml
    of its reward/train.py run (the folder above the model, or the model's folder)."""

    def __post_init__(self):
        if not self.term:
            return
        if self.every < 1 or self.pairs < 1 or self.budget < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError(
                "reward.refresh needs every, pairs, budget and batch_size >= 1 and steps >= 0, got "
                f"{self.every}, {self.pairs}, {self.budget}, {self.batch_size}, {self.steps}"
            )
        if self.select not in ("top", "random"):
            raise ValueError(f"reward.refresh.select must be top or random, got {self.select!r}")
        kind, _, path = self.labeller.partition(":")
        if kind not in LABELLERS or not path:
            raise ValueError(
                f"reward.refresh.labeller: {self.labeller!r} is not a labeller; use "
                + ", ".join(f"{k}:{'DIR' if k != 'generative' else 'PATH'}" for k in LABELLERS)
            )
        if not 0 <= self.original_fraction < 1 or self.lr <= 0 or self.tie_eps < 0:
            raise ValueError(
                f"reward.refresh.original_fraction must be in [0, 1), lr > 0 and tie_eps >= 0, got "
                f"{self.original_fraction}, {self.lr}, {self.tie_eps}"
            )
        if self.alpha is not None and not 0 <= self.alpha < 1:
            raise ValueError(f"reward.refresh.alpha must be in [0, 1), got {self.alpha}")


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    """The reward is the weighted sum of these terms, each logged."""
    gold: str = ""
    """Held-out judge for evaluation only (oracle:SHAPEEDIT_DIR on ShapeEdit); '' = none."""
    max_batch_size: int = 64
    """The reward actor gathers up to this many edits from the rollout workers into one call (each term then
    forwards them in micro-batches of its micro_batch_size); evaluation sends edits in requests of this size ..."""
    max_wait_s: float = 0.05
    """... waiting at most this long for more requests to fill a batch (counted from when the actor is free:
    requests that arrive during a call go into the next one)."""
    timeout_s: float = 120.0
    """Per-call timeout of a scoring request."""
    retries: int = 2
    """Retries after a timeout before the run stops."""
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    """Keep training a JRM term on labelled pairs of the policy's current samples during the run (off by default)."""

    def __post_init__(self):
        names = [t.name for t in self.terms]
        if self.refresh.term:
            term = next((t for t in self.terms if t.name == self.refresh.term), None)
            if term is None or not term.spec.startswith("jrm:") or not term.required:
                raise ValueError(
                    f"reward.refresh.term {self.refresh.term!r} must name a required jrm: term of reward.terms "
                    f"({names}): pairs are chosen by its scores of every row"
                )
        if not names or len(set(names)) != len(names):
            raise ValueError(f"reward.terms need distinct names and at least one term, got {names}")
        if self.max_batch_size < 1 or self.max_wait_s < 0:
            raise ValueError(
                f"reward.max_batch_size must be >= 1 and reward.max_wait_s >= 0, got {self.max_batch_size} and "
                f"{self.max_wait_s}"
            )


@dataclass
class AlgoConfig:
    RENAMED: ClassVar[dict[str, str]] = {"algo": "name"}

    name: str = "grpo"
    """'grpo' (Flow-GRPO: group-relative advantages), 'ppo' (learned value baseline, per-step advantages) or
    'nft' (DiffusionNFT: flow matching on the clean edits, weighted by optimality; no log-probs)."""
    group_size: int = 8
    """Edits sampled per prompt."""
    prompts_per_step: int = 8
    """Prompts per RL step; the rollout batch is prompts_per_step x group_size."""
    micro_batch_size: int = 16
    """Rows per rollout call and per learner forward (the same, so the on-policy ratio is exactly 1)."""
    updates_per_step: int = 2
    """Optimizer steps per rollout batch (the batch is split into this many minibatches)."""
    clip_range: float = 1e-3
    """PPO ratio clip c, the lower side (sde log-probs are means over latent dims, so c is small; cps needs ~1e-5)."""
    clip_range_high: float | None = None
    """Upper side of the ratio clip; None: clip_range (symmetric). Larger than clip_range is DAPO's
    "clip higher" (the JRM paper's RL: 1e-4 below, 5e-4 above)."""
    adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    adv_std: str = "group"
    """'group' or 'batch' std in the GRPO normalisation."""
    drop_zero_std: bool = False
    """Leave groups whose rewards are all equal out of the surrogate's mean (their advantages are 0 anyway;
    without this they dilute the other rows' gradient)."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference policy (adapters off). Our KL is the exact Gaussian KL of the
    transition, 1/(-dt) times Flow-GRPO's: carry a Flow-GRPO beta over as beta * (-dt) (docs/algorithms.md).
    NFT: weight of the squared velocity distance to the reference."""
    nft_beta: float = 1.0
    """NFT: how far the implicit positive and negative policies sit from the old one
    (v+- = v_old +- beta (v - v_old))."""
    nft_terms: int = 2
    """NFT: noise levels drawn per micro-batch (from the rollout's schedule), one loss term and backward each."""
    lr: float = 3e-4
    """AdamW learning rate (constant)."""
    decision_lr: float | None = None
    """AdamW learning rate of the policy's decision weights (`decision_parameters`: the ShapeEdit policy's
    decision-code mean, its offset or its instruction weights too, policy.trainable.decision_mean); null = lr. The
    draw of the code decides which edit a sample makes, and its mean is one number per instruction, not a large
    network's slice: at an adapter's lr it moves about 3e-4 an update, 0.01 over a demo's 40 updates, far less
    than the unit spread of the codes. Its learning rate comes from the checkpoint when a run resumes, like lr's."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    value_lr: float = 1e-3
    """PPO: learning rate of the value model."""
    value_clip: float = 0.2
    """PPO: value loss clip."""
    value_coef: float = 0.5
    """PPO: weight of the value loss."""

    def __post_init__(self):
        if self.name not in ("grpo", "ppo", "nft"):
            raise ValueError(f"algo.name must be 'grpo', 'ppo' or 'nft', got {self.name!r}")
        if self.decision_lr is not None and self.decision_lr <= 0:
            raise ValueError(f"algo.decision_lr must be > 0 (or null for lr), got {self.decision_lr}")
        if self.clip_range_high is not None and self.clip_range_high <= 0:
            raise ValueError(f"algo.clip_range_high must be > 0 (or null for clip_range), got {self.clip_range_high}")
        if self.nft_beta <= 0 or self.nft_terms < 1:
            raise ValueError(
                f"algo.nft_beta must be > 0 and algo.nft_terms >= 1, got {self.nft_beta} and {self.nft_terms}"
            )
        if self.name == "nft" and self.adv_clip <= 0:
            raise ValueError("algo.adv_clip must be > 0 with nft: it is the advantage that counts as certainly optimal")
        if self.group_size < 2:
            raise ValueError(
                f"algo.group_size must be >= 2 (advantages compare edits of one prompt), got {self.group_size}"
            )
        batch = self.prompts_per_step * self.group_size
        if batch % self.micro_batch_size:
            raise ValueError(
                f"the rollout batch (prompts_per_step x group_size = {batch}) must be divisible by micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if (batch // self.micro_batch_size) % self.updates_per_step:
            raise ValueError(
                f"the {batch // self.micro_batch_size} micro-batches per step must split evenly into updates_per_step "
                f"({self.updates_per_step}) minibatches"
            )


@dataclass
class ClusterConfig:
    num_nodes: int = 1
    """Ray nodes the job spreads over; each runs the actors below and its own reward actor (rl/ray_actors.py)."""
    num_rollout_workers: int = 2
    """Rollout actors per node (each holds a copy of the policy)."""
    num_learners: int = 1
    """Learner actors per node; those of all nodes form one DeepSpeed data-parallel group."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the learners: 2 (optimizer state and gradients sharded; the LoRA default) or 3
    (the weights sharded too: a full fine-tune of a model larger than one GPU's share)."""
    device: str = "cpu"
    """'cpu' (gloo) or 'cuda' (NCCL)."""
    gpus_per_node: int = 0
    """GPUs per node (0: a CPU run). One placement-group bundle per GPU: rollout worker i on GPU i mod
    gpus_per_node, learner j on GPU j mod gpus_per_node, the reward actor on reward_gpu; the actors on one GPU
    split it in equal shares. `python launch/grpo_edit.py --plan` prints the layout and its memory."""
    gpu_memory_gib: float = 79.0
    """Memory of one GPU (an H100 80GB shows 79.1 GiB); the preflight plan (`--plan`) keeps each GPU under 90% of it."""
    reward_gpu: int = -1
    """The GPU of each node that holds its reward actor (-1: the last)."""
    learner_first_gpu: int = 0
    """Learner j goes on GPU (learner_first_gpu + j) mod gpus_per_node: 0 shares each GPU between a rollout worker
    and a learner; num_rollout_workers puts them on GPUs of their own (a model too large for both on one GPU)."""
    gpu_resource: str = "GPU"
    """The Ray resource that stands for one GPU. Tests on CPU use a custom one (e.g. 'fake_gpu') to check the GPU
    layout on simulated nodes."""
    threads_per_worker: int = 1
    """torch intra-op threads in each actor (CPU runs)."""
    async_reward: bool = True
    """Score micro-batch k while micro-batch k + 1 is sampled (still on-policy); false = wait for each score."""
    address: str = ""
    """Ray address; '' = the job's cluster under `ray job submit`, else a local one on 127.0.0.1."""
    placement_timeout_s: float = 300.0
    """How long to wait for the placement groups before refusing (the nodes lack the resources)."""

    def __post_init__(self):
        if self.zero_stage not in (2, 3):
            raise ValueError(f"cluster.zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"cluster.device must be cpu or cuda, got {self.device!r}")
        if self.num_nodes < 1 or self.num_rollout_workers < 1 or self.num_learners < 1:
            raise ValueError("cluster.num_nodes, num_rollout_workers and num_learners must be >= 1")
        if self.gpus_per_node < 0 or (
            self.gpus_per_node and not -self.gpus_per_node <= self.reward_gpu < self.gpus_per_node
        ):
            raise ValueError(
                f"cluster.reward_gpu {self.reward_gpu} is not a GPU of a node with gpus_per_node={self.gpus_per_node}"
            )
        if self.learner_first_gpu < 0 or (self.gpus_per_node and self.learner_first_gpu >= self.gpus_per_node):
            raise ValueError(
                f"cluster.learner_first_gpu {self.learner_first_gpu} is not a GPU of a node with "
                f"gpus_per_node={self.gpus_per_node}"
            )

    @property
    def rollout_workers(self) -> int:
        """Rollout workers of the whole job."""
        return self.num_nodes * self.num_rollout_workers

    @property
    def learners(self) -> int:
        """Learner ranks of the whole job."""
        return self.num_nodes * self.num_learners


@dataclass
class PromptConfig:
    train_prompts: str = "runs/demo/data/train_prompts.json"
    """ShapeEdit *_prompts.json, or a .jsonl of {"source": image path, "instruction": text} (paths relative to the
    file)."""
    eval_prompts: str = "runs/demo/data/test_heldout_prompts.json"
    """Prompts for periodic ODE evaluation."""
    num_eval: int = 64
    """Evaluation prompts used."""
    skip_bad: bool = False
    """Skip (and count: data/skipped_prompts in metrics.jsonl) prompt rows with missing fields or unreadable images
    instead of stopping."""


@dataclass
class RLConfig:
    output_dir: str = "runs/grpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, eval/ grids, wandb/."""
    seed: int = 0
    """Seeds prompts order, rollout noise and initial adapters."""
    RENAMED: ClassVar[dict[str, str]] = {"num_steps": "num_rl_steps"}

    num_rl_steps: int = 100
    """RL steps (rollout batch + update); the sampler's denoising steps are policy.sampler.num_steps."""
    resume: str = "auto"
    """'auto' = continue from the newest complete checkpoint in output_dir/checkpoints, 'none' (start fresh), or a
    checkpoint path."""
    save_every: int = 10
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones deleted)."""
    eval_every: int = 10
    """Evaluate every this many steps (and at step 0 and the end)."""
    max_bad_steps: int = 3
    """Consecutive steps with NaN/Inf rewards or losses (skipped) before the run stops."""
    wandb: bool = True
    """Log to wandb too (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "jrm-edit"
    """wandb project name."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The editing policy."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward: terms, gold judge, batching."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """GRPO / PPO settings."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Actors and devices."""
    data: PromptConfig = field(default_factory=PromptConfig)
    """Prompts."""

    def __post_init__(self):
        rows = self.algo.prompts_per_step * self.algo.group_size
        if rows % (self.cluster.rollout_workers * self.algo.micro_batch_size):
            raise ValueError(
                f"the rollout batch ({rows} rows) must split into whole micro-batches of {self.algo.micro_batch_size} "
                f"for each of the {self.cluster.rollout_workers} rollout workers ({self.cluster.num_nodes} node(s) x "
                f"cluster.num_rollout_workers)"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if policy_entry(self.policy.kind).cpu_only and self.cluster.device != "cpu":
            raise ValueError(f"the {self.policy.kind} policy runs on CPU; set cluster.device=cpu")
        micro = rows // self.algo.micro_batch_size
        if micro % self.cluster.learners:
            raise ValueError(
                f"{micro} micro-batches per step cannot be shared evenly by {self.cluster.learners} learners"
            )
        if (micro // self.algo.updates_per_step) % self.cluster.learners:
            raise ValueError(
                f"each of the {self.algo.updates_per_step} minibatches holds {micro // self.algo.updates_per_step} "
                f"micro-batches, which {self.cluster.learners} learners cannot share evenly"
            )
