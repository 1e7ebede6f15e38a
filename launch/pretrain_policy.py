"""Pretrain the ShapeEdit policy by supervised flow matching on (source, instruction, target) triples.

    python launch/pretrain_policy.py [--config FILE.yaml] [key=value ...]
    python launch/pretrain_policy.py output_dir=runs/policy data_dir=runs/demo/data max_minutes=8

Training tasks are drawn on the fly from the ShapeEdit generator (held-out compositions excluded), so the
policy never sees the same triple twice. Every `eval_every` steps it samples the evaluation prompts of
`data_dir` (val and test_heldout, *_prompts.json) with the deterministic ODE sampler and the oracle
scores them, next to the score of doing nothing (returning the source) and of the exact target (1.0).
The result is saved with save_pretrained (and loaded with ShapeEditPolicy.from_pretrained).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/pretrain_policy.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from policies.images import tensor_to_images
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy, ShapeEditPolicyConfig, flow_matching_loss
from reward.config import config_from_cli, save_config
from reward.data import load_image
from reward.shapeedit import Edit, Scene, apply_edits, judge_image, render, sample_task
from reward.shapeedit.candidates import make_candidate

SCENE_FAILURES = ("not_applied", "wrong_object", "wrong_attribute", "partial", "over_edit")


@dataclass
class PolicyPretrainConfig:
    output_dir: str = "runs/policy"
    """Where the policy, metrics.jsonl and the resolved config go."""
    data_dir: str = "runs/demo/data"
    """A ShapeEdit dataset (python -m reward.shapeedit generate): its val and test_heldout prompts are the evaluation
    set."""
    seed: int = 0
    """Seeds the initial weights, the task stream and the noise."""
    policy: ShapeEditPolicyConfig = field(default_factory=ShapeEditPolicyConfig)
    """The policy's architecture."""
    init_from: str = ""
    """A saved ShapeEdit policy (a pretraining's output_dir, or assets/shapeedit_policy) whose weights and vocabulary
    training starts from, for longer pretraining in several runs; its architecture must be `policy`'s (checked
    before training). Empty: fresh weights."""
    max_steps: int = 1500
    """Optimizer steps; the cosine schedule ends here (training stops earlier when max_minutes is reached)."""
    max_minutes: float = 8.0
    """Wall-clock budget for training, evaluation excluded; 0 = no limit."""
    batch_size: int = 32
    """Triples per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 0 over max_steps, after warmup)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    uncond_probability: float = 0.1
    """Fraction of triples trained with an empty instruction (for classifier-free guidance)."""
    compose_probability: float = 0.25
    """Fraction of instructions that compose two edits."""
    vocab_instructions: int = 20000
    """Instructions drawn to learn the word-level vocabulary (fresh weights only; init_from keeps its own)."""
    gate_weight: float = 4.0
    """Weight of the gate's cross-entropy against the pixels each edit changes ('gated' policies; 0 = none)."""
    edit_weight: float = 1.0
    """Weight of the squared error averaged over the pixels each edit changes, beside the plain mean (0 = none)."""
    distractor_weight: float = 0.0
    """Weight of the squared error (the cross-entropy for 'palette') averaged over the pixels of the objects the
    edit leaves alone (kept pixels not of the source's most common colour), averaged like edit_weight's term: the
    price of painting an object that was not meant (policies.shapeedit.flow_matching_loss; 0 = none)."""
    edit_average: str = "image"
    """How edit_weight's term averages: over the batch's changed pixels ('batch') or per image, then over images
    ('image')."""
    demonstrator: str = "exact"
    """What the policy imitates: 'exact' (the correct target of every instruction) or 'decisions' (an imperfect
    demonstrator: the correct target with probability correct_probability, else one of failure_modes, each
    equally likely). With policy.decision_code, the demonstrator's choice is a function of the decision code z
    (its normal quantile picks the answer), so the policy learns to answer by z and its samples of one prompt
    make different decisions; without it, the policy can only average the answers."""
    correct_probability: float = 0.6
    """'decisions': the share of correct targets."""
    failure_modes: list[str] = field(default_factory=lambda: ["wrong_object", "wrong_attribute", "partial"])
    """'decisions': the scene-level failure modes of reward/shapeedit/candidates.py the other answers come from
    (where a mode does not apply to an instruction, the source: the edit not applied)."""
    sigma_location: float = 1.0
    """Location of the logit-normal noise levels (0 = SD3's; above 0 trains more at high noise)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights that is evaluated and saved (0 = none)."""
    eval_every: int = 1000
    """Evaluate every this many steps (and at the end)."""
    num_eval: int = 128
    """Evaluation prompts per split."""
    eval_denoising_steps: int = 10
    """ODE steps when sampling for evaluation."""
    eval_samples: int = 4
    """ODE samples per evaluation prompt, from the same seeds at every evaluation: a policy with a decision code
    is judged by the mean over its samples (RL's policy.eval_samples)."""
    eval_code_means: list[float] = field(default_factory=list)
    """A policy with a decision code: also evaluate with every instruction's code mean fixed at each of these
    (`eval/SPLIT/overall@MEAN`, gold_by_code_mean). At -2 nearly every code is the demonstrator's correct answer, so
    it measures how well the policy draws the edits asked for; the plain evaluation (mean 0) mixes in how faithfully
    it draws the demonstrator's failures, which lowers gold as it gets better at them."""
    spread_prompts: int = 32
    """Val prompts whose samples' spread is measured at the end (group_spread; 0 = none)."""
    spread_sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(num_steps=8, noise_level=0.7, sde_window_size=0)
    )
    """The sampler whose samples' spread is measured: RL's Gaussian SDE steps (launch/configs/shapeedit.yaml)."""
    group_size: int = 8
    """Samples per prompt for the spread (RL's algo.group_size)."""
    progress: bool = True
    """A progress bar over the steps, on stderr when it is a terminal (the log lines every 50 steps print either
    way)."""

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1 or self.eval_samples < 1:
            raise ValueError("batch_size, max_steps and eval_samples must be >= 1")
        if self.edit_average not in ("batch", "image"):
            raise ValueError(f"edit_average must be 'batch' or 'image', got {self.edit_average!r}")
        if not 0 <= self.uncond_probability < 1:
            raise ValueError(f"uncond_probability must be in [0, 1), got {self.uncond_probability}")
        if self.eval_code_means and not self.policy.decision_code:
            raise ValueError("eval_code_means needs a policy with a decision code (policy.decision_code=true)")
        if self.demonstrator not in ("exact", "decisions"):
            raise ValueError(f"demonstrator must be 'exact' or 'decisions', got {self.demonstrator!r}")
        if not 0 < self.correct_probability <= 1:
            raise ValueError(f"correct_probability must be in (0, 1], got {self.correct_probability}")
        unknown = sorted(set(self.failure_modes) - set(SCENE_FAILURES))
        if unknown or (self.demonstrator == "decisions" and not self.failure_modes):
            raise ValueError(f"failure_modes must be a non-empty list of {SCENE_FAILURES}, got {self.failure_modes}")


def demonstration(task, code: float, cfg: PolicyPretrainConfig) -> np.ndarray:
    """The demonstrator's answer to `task` for decision code `code`: its normal quantile u picks the correct
    target (u < correct_probability) or one failure mode (the rest of [0, 1) in equal parts)."""
    size = cfg.policy.image_size
    correct = apply_edits(task.scene, task.edits)
    u = 0.5 * (1.0 + math.erf(code / math.sqrt(2.0)))
    if cfg.demonstrator == "exact" or u < cfg.correct_probability:
        return render(correct, size)
    share = (u - cfg.correct_probability) / (1.0 - cfg.correct_probability)
    mode = cfg.failure_modes[min(int(share * len(cfg.failure_modes)), len(cfg.failure_modes) - 1)]
    # A fixed stream for the failure's details (which edit of a composition, which wrong value): the answer is a
    # function of (task, code), which the policy can learn; a drawn detail would leave it only the average.
    # Where the mode does not apply (no wrong object for an added shape), the edit is not applied: a code in the
    # failure share always fails, so which code an edit draws decides whether it succeeds.
    candidate = make_candidate(np.random.default_rng(0), task.scene, task.edits, mode)
    return render(task.scene if candidate is None else candidate.scene, size)


def draw_batch(
    rng: np.random.Generator, cfg: PolicyPretrainConfig
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """(B, 3, H, W) sources and targets in [-1, 1], B instructions and (B,) decision codes (demonstration), held-out
    compositions excluded."""
    size = cfg.policy.image_size
    sources, targets, instructions, codes = [], [], [], []
    while len(instructions) < cfg.batch_size:
        task = sample_task(rng, size, cfg.compose_probability)
        if task is None or task.heldout:
            continue
        # drawn only where used: the exact demonstrator keeps its stream of tasks
        code = float(rng.standard_normal()) if cfg.demonstrator == "decisions" or cfg.policy.decision_code else 0.0
        sources.append(render(task.scene, size))
        targets.append(demonstration(task, code, cfg))
        instructions.append("" if rng.random() < cfg.uncond_probability else task.instruction)
        codes.append(code)

    def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    return to_tensor(sources), to_tensor(targets), instructions, torch.tensor(codes, dtype=torch.float32)


def load_eval_prompts(data_dir: Path, split: str, limit: int, size: int) -> list[dict]:
    path = data_dir / f"{split}_prompts.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: generate the data first (python -m reward.shapeedit generate --out {data_dir})"
        )
    rows = json.loads(path.read_text())[:limit]
    prompts = []
    for i, row in enumerate(rows):
        source = load_image(data_dir / row["path_src"], f"{path} row {i}")
        if source.size != (size, size):
            source = Image.fromarray(
                render(Scene.from_dict(row["scene"]), size)
            )  # the scene re-rendered at the policy's size
        prompts.append(
            {
                "source": source,
                "instruction": row["instruction"],
                "scene": Scene.from_dict(row["scene"]),
                "edits": tuple(Edit.from_dict(e) for e in row["edits"]),
            }
        )
    return prompts


@torch.no_grad()
def evaluate(
    policy: ShapeEditPolicy, prompts: list[dict], num_steps: int, batch_size: int = 64, seed: int = 0, samples: int = 1
) -> dict:
    """Mean oracle scores of ODE samples (`samples` per prompt, from the same seeds at every call), and of
    returning the source unchanged, on these prompts."""
    sampler = SamplerConfig(num_steps=num_steps, noise_level=0.0)
    generator = torch.Generator().manual_seed(seed)
    totals = {"overall": 0.0, "following": 0.0, "consistency": 0.0, "quality": 0.0, "identity_overall": 0.0}
    repeated = [p for p in prompts for _ in range(samples)]
    for start in range(0, len(repeated), batch_size):
        chunk = repeated[start : start + batch_size]
        rollout = policy.sample([p["source"] for p in chunk], [p["instruction"] for p in chunk], sampler, generator)
        for p, image in zip(chunk, tensor_to_images(rollout.edited_images)):
            j = judge_image(p["scene"], p["edits"], image)
            for k in ("overall", "following", "consistency", "quality"):
                totals[k] += getattr(j, k)
            totals["identity_overall"] += judge_image(p["scene"], p["edits"], p["source"]).overall
    return {k: v / len(repeated) for k, v in totals.items()}


def gold_by_code_mean(
    policy: ShapeEditPolicy,
    prompts: list[dict],
    num_steps: int,
    samples: int,
    means=(-2.0, -1.0, 0.0, 1.0, 2.0),
    seed: int = 0,
) -> dict[str, float]:
    """The oracle's mean gold (`evaluate`'s, the same noise for every mean) with every instruction's decision-code
    mean fixed at each of `means`: what choosing the decisions alone makes of this policy. RL that moves only one
    offset of the code mean, shared by every instruction (policy.trainable.decision_mean 'shared'), cannot do
    much better than the best of these; a mean per instruction could, and the rest of any gain must come from how
    the policy draws its edits."""
    out = {}
    for mean in means:
        with policy.code_mean_fixed(mean):
            out[f"{mean:+g}"] = round(evaluate(policy, prompts, num_steps, seed=seed, samples=samples)["overall"], 4)
    return out


@torch.no_grad()
def group_spread(policy: ShapeEditPolicy, prompts: list[dict], sampler: SamplerConfig, group_size: int, seed: int = 0):
    """How the policy's samples of one prompt differ, as group-relative RL sees them: `group_size` samples of each
    prompt, judged by the oracle. Returns the mean over prompts of the std of gold within the group
    (`group_gold_std`), the share of groups whose samples are all one image (`identical_groups`) and the mean gold
    (`gold`)."""
    generator = torch.Generator().manual_seed(seed)
    stds, golds, identical = [], [], 0
    for p in prompts:
        rollout = policy.sample([p["source"]] * group_size, [p["instruction"]] * group_size, sampler, generator)
        edits = rollout.edited_images
        gold = [judge_image(p["scene"], p["edits"], image).overall for image in tensor_to_images(edits)]
        stds.append(float(np.std(gold)))
        golds += gold
        identical += bool((edits == edits[:1]).all())
    return {
        "group_gold_std": round(float(np.mean(stds)), 4),
        "identical_groups": round(identical / len(prompts), 4),
        "gold": round(float(np.mean(golds)), 4),
    }


def say(line: str) -> None:
    """A log line on stdout, above the progress bar, flushed (the log may be a file)."""
    tqdm.write(line)
    sys.stdout.flush()


def start_policy(cfg: PolicyPretrainConfig) -> ShapeEditPolicy:
    """Fresh weights with a vocabulary learnt from `vocab_instructions` drawn instructions (held-out compositions
    excluded; their own stream, so the task stream is the same either way), or `init_from`'s weights and
    vocabulary, refused unless its architecture is cfg.policy's (a difference would otherwise surface as a shape
    error mid-load, or not at all)."""
    if not cfg.init_from:
        vocab_rng, vocab = np.random.default_rng(cfg.seed + 1), []
        while len(vocab) < cfg.vocab_instructions:
            task = sample_task(vocab_rng, cfg.policy.image_size, cfg.compose_probability)
            if task is not None and not task.heldout:
                vocab.append(task.instruction)
        return ShapeEditPolicy.build(cfg.policy, vocab, seed=cfg.seed)
    policy = ShapeEditPolicy.from_pretrained(cfg.init_from)
    if policy.trainable is not None:
        raise ValueError(f"init_from {cfg.init_from} holds RL adapters: start pretraining from a pretrained policy")
    if policy.cfg != cfg.policy:
        saved, asked = asdict(policy.cfg), asdict(cfg.policy)
        diff = {k: (saved[k], asked[k]) for k in saved if saved[k] != asked[k]}
        raise ValueError(
            f"init_from {cfg.init_from} has another architecture (saved, asked): {diff}; set policy.* as saved "
            f"(its policy.json) or leave init_from empty for fresh weights"
        )
    return policy


def pretrain(cfg: PolicyPretrainConfig) -> dict:
    """Train, evaluate and save; returns the last evaluation."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    policy = start_policy(cfg)
    save_config(cfg, out / "config.yaml")
    data_dir = Path(cfg.data_dir)
    evals = {s: load_eval_prompts(data_dir, s, cfg.num_eval, cfg.policy.image_size) for s in ("val", "test_heldout")}

    policy.text_encoder.requires_grad_(True)
    params = list(policy.transformer.parameters()) + list(policy.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True) if cfg.ema_decay else None
    metrics = (out / "metrics.jsonl").open("w")
    print(
        f"ShapeEdit policy: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, vocabulary {len(policy.tokenizer)}"
    )

    def log(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    def run_eval(step: int) -> dict:
        """Evaluate the averaged weights (when EMA is on), then put the trained ones back."""
        policy.transformer.eval()
        policy.text_encoder.eval()
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        result = {"step": step}
        for split, prompts in evals.items():
            for k, v in evaluate(
                policy, prompts, cfg.eval_denoising_steps, seed=cfg.seed, samples=cfg.eval_samples
            ).items():
                result[f"eval/{split}/{k}"] = round(v, 4)
            if cfg.eval_code_means:
                by_mean = gold_by_code_mean(
                    policy, prompts, cfg.eval_denoising_steps, cfg.eval_samples, cfg.eval_code_means, cfg.seed
                )
                result.update({f"eval/{split}/overall@{m}": v for m, v in by_mean.items()})
        if ema is not None:
            ema.restore(params)
        policy.transformer.train()
        policy.text_encoder.train()
        log(result)
        say(" ".join(f"{k}={v}" for k, v in result.items()))
        return result

    trained_s, step, loss_sum = 0.0, 0, 0.0
    result = run_eval(0)
    bar = tqdm(
        total=cfg.max_steps, desc="pretraining", unit="step", disable=None if cfg.progress else True
    )  # None: on a terminal only
    while step < cfg.max_steps and not (cfg.max_minutes and trained_s > cfg.max_minutes * 60):
        start = time.perf_counter()
        source, target, instructions, codes = draw_batch(rng, cfg)
        loss = flow_matching_loss(
            policy,
            source,
            target,
            instructions,
            generator,
            cfg.gate_weight,
            cfg.edit_weight,
            cfg.sigma_location,
            cfg.edit_average,
            codes if cfg.policy.decision_code else None,
            cfg.distractor_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(params)
        step += 1
        bar.update(1)
        trained_s += time.perf_counter() - start
        loss_sum += loss.item()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the flow-matching loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        if step % 50 == 0:
            log(
                {
                    "step": step,
                    "train/loss": loss_sum / 50,
                    "train/grad_norm": float(grad_norm),
                    "train/lr": schedule.get_last_lr()[0],
                    "perf/trained_s": trained_s,
                }
            )
            say(f"step {step} loss {loss_sum / 50:.4f} ({trained_s:.0f} s)")
            loss_sum = 0.0
        if step % cfg.eval_every == 0:
            result = run_eval(step)
    bar.close()
    if result["step"] != step:
        result = run_eval(step)
    if ema is not None:
        ema.copy_to(params)  # the saved policy is the averaged one, as evaluated
    policy.text_encoder.requires_grad_(False)
    policy.transformer.eval()
    policy.text_encoder.eval()
    if cfg.spread_prompts:
        spread = group_spread(policy, evals["val"][: cfg.spread_prompts], cfg.spread_sampler, cfg.group_size, cfg.seed)
        result.update({f"spread/{k}": v for k, v in spread.items()})
        say(" ".join(f"{k}={v}" for k, v in spread.items()))
    policy.save_pretrained(out)
    result["trained_s"] = round(trained_s, 1)
    result["steps"] = step
    result["threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_cli(PolicyPretrainConfig, sys.argv[1:] if argv is None else argv, __doc__)
    print(json.dumps(pretrain(cfg), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
