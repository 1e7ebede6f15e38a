"""Train a Joint Reward Model: L = (1 - alpha) L_rank + alpha L_LM on one backbone (arXiv 2602.07533).

    python reward/train.py                                   # tiny JRM from scratch on ShapeEdit, CPU
    python reward/train.py loss.alpha=0                      # the discriminative-only baseline
    torchrun --nproc_per_node=8 reward/train.py --config reward/configs/paper.yaml   # the paper's settings
    torchrun --nproc_per_node=8 reward/train.py --config reward/configs/qwen25vl7b_zero2.yaml

L_rank is Bradley-Terry or HPSv3's uncertainty-aware ranking (arXiv 2508.03789), on the reward and on each
per-dimension reward; L_LM is next-token cross-entropy on the critique after the score token.
Built on transformers' Trainer (schedules, accumulation, checkpoints, DeepSpeed ZeRO, wandb); this file
adds the pair collator, the joint loss and pairwise-accuracy evaluation. Without `data.train`, a ShapeEdit
dataset is generated into {output_dir}/data. Every row is checked (fields, images decoded, geometry,
instruction length) before training; a bad one stops with `error: FILE:row N: KEY: ...` and exit 2, or with
data.skip_bad=true is skipped and counted by kind. Then writes {output_dir}/config.yaml, metrics.jsonl,
checkpoint-*/ (resumable: resume=auto), final/ (JRM.save_pretrained) and eval.json.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):  # run as `python reward/train.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from reward.config import ConfigError, config_from_cli, save_config
from reward.data import DataError, PairCollator, PreferencePair, load_pairs
from reward.losses import LossConfig, joint_loss, pairwise_accuracy
from reward.model import JRM, JRMArgs
from reward.shapeedit import GenerateConfig, generate

DEFAULT_TRAINER = {
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 50,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "max_steps": 1600,
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 400,
    "save_strategy": "steps",
    "save_steps": 400,
    "save_total_limit": 2,
    "report_to": ["wandb"],
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,
    "disable_tqdm": False,
}


@dataclass
class DataConfig:
    train: str = ""
    """EditReward-Data json/jsonl of training pairs; empty: generate ShapeEdit into {output_dir}/data."""
    mix: list[str] = field(default_factory=list)
    """More EditReward-Data files whose pairs join the training pairs, each with image paths relative to its own
    folder (or data.image_root), e.g. labelled comparisons of a policy's own samples
    (launch/policy_pairs.py writes DATA/policy_train.json): reward data on the edits RL will score."""
    eval: str = ""
    """Pairs for periodic evaluation; empty with ShapeEdit: its val split."""
    image_root: str = ""
    """Folder the image paths are relative to; empty: each json file's folder."""
    skip_bad: bool = False
    """Skip (and count) bad rows instead of stopping."""
    max_eval_pairs: int = 400
    """Cap on evaluation pairs, to keep periodic evaluation cheap."""
    shapeedit_pairs: int = 10000
    """Pairs to generate when no training file is given."""
    shapeedit_seed: int = 0
    """Seed of the generated ShapeEdit data."""

    def __post_init__(self) -> None:
        if self.max_eval_pairs < 0:
            raise ValueError(f"data.max_eval_pairs must be >= 0, got {self.max_eval_pairs}")
        if self.shapeedit_pairs <= 0:
            raise ValueError(f"data.shapeedit_pairs must be > 0, got {self.shapeedit_pairs}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/jrm"
    """Run folder: config, metrics, checkpoints, final model."""
    seed: int = 0
    """Seed of the model initialisation and data order."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; none; or a checkpoint path."""
    model: JRMArgs = field(default_factory=JRMArgs)
    """The reward model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The joint objective."""
    trainer: dict = field(default_factory=lambda: dict(DEFAULT_TRAINER))
    """transformers TrainingArguments (learning_rate, max_steps, deepspeed, bf16, ...)."""

    def __post_init__(self) -> None:
        if (self.loss.ranking == "uncertainty") != self.model.uncertainty:
            raise ValueError(
                f"loss.ranking={self.loss.ranking} with model.uncertainty={str(self.model.uncertainty).lower()}: the "
                "uncertainty ranking needs the head's sigma outputs, and only it uses them; set both or neither"
            )


class PairDataset(Dataset):
    def __init__(self, pairs: list[PreferencePair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]


class JRMTrainer(Trainer):
    """transformers' Trainer with JRM's joint loss and pairwise evaluation."""

    def __init__(self, *args, loss_config: LossConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _joint_loss(self, model: JRM, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ties = inputs["ties"]
        out = joint_loss(model, inputs, self.loss_config)
        prefix = "train" if model.training else "eval"
        self._metrics[f"{prefix}/pref_loss"].append(float(out.pref))
        if out.lm is not None:
            self._metrics[f"{prefix}/lm_loss"].append(float(out.lm))
        if out.reward_std is not None:
            self._metrics[f"{prefix}/reward_std"].append(float(out.reward_std.mean()))
        acc = pairwise_accuracy(out.chosen, out.rejected, ties)
        if not math.isnan(acc):
            self._metrics[f"{prefix}/accuracy"].append(acc)
        return out.loss, out.chosen, out.rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, chosen, rejected = self._joint_loss(model, inputs)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        ties = inputs["ties"]
        with torch.no_grad():
            loss, chosen, rejected = self._joint_loss(model, inputs)
        return loss.detach(), torch.stack([chosen, rejected], dim=1), ties.long()

    def log(self, logs: dict, *args, **kwargs) -> None:
        prefix = "eval" if any(k.startswith("eval") for k in logs) else "train"
        for key in [k for k in self._metrics if k.startswith(prefix + "/")]:
            values = self._metrics.pop(key)
            logs[key] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The JRM reads its own checkpoints (full weights, shards, or LoRA adapters and head).
        (model or self.model).load_checkpoint(resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Checkpoints hold a loadable JRM (JRM.from_pretrained works on any checkpoint-*/).
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir, state_dict=state_dict if self.is_deepspeed_enabled else None)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def compute_metrics(prediction) -> dict[str, float]:
    """Pairwise accuracy over the whole evaluation set (the per-batch eval/accuracy averages batches)."""
    rewards, ties = torch.from_numpy(prediction.predictions), torch.from_numpy(prediction.label_ids.astype(bool))
    return {"pairwise_accuracy": pairwise_accuracy(rewards[:, 0], rewards[:, 1], ties)}


class MetricsFile(TrainerCallback):
    """Appends every log record, with its step, to {output_dir}/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    valid = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(cfg.trainer) - valid)
    if unknown:
        raise ConfigError(f"unknown trainer key(s) {unknown}; they must be transformers.TrainingArguments fields")
    if "output_dir" in cfg.trainer or "seed" in cfg.trainer:
        raise ConfigError("set output_dir and seed at the top level of the config, not under trainer")
    kwargs = dict(cfg.trainer)
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    return TrainingArguments(output_dir=cfg.output_dir, seed=cfg.seed, **kwargs)


def prepare_data(cfg: TrainConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and evaluation pairs; generates ShapeEdit when no training file is configured."""
    data = cfg.data
    root = data.image_root or None
    missing = [m for m in data.mix if not Path(m).is_file()]
    if missing:  # before any data is generated
        raise DataError(
            f"data.mix: {', '.join(missing)} not found; give existing EditReward-Data files (launch/policy_pairs.py "
            f"writes DATA/policy_train.json)"
        )
    named = [Path(m).resolve() for m in data.mix] + ([Path(data.train).resolve()] if data.train else [])
    if len(set(named)) < len(named):  # a file twice would silently double its weight
        raise DataError(f"data.mix names a file twice (or data.train again): {data.mix}; name each file once")
    if not data.train:
        data_dir = Path(cfg.output_dir) / "data"
        if not (data_dir / "meta.json").is_file():
            generate(
                GenerateConfig(out=str(data_dir), pairs=data.shapeedit_pairs, seed=data.shapeedit_seed, overwrite=True)
            )
        made = json.loads((data_dir / "meta.json").read_text())["config"]
        if (made["pairs"], made["seed"]) != (data.shapeedit_pairs, data.shapeedit_seed):
            raise ValueError(
                f"{data_dir} holds ShapeEdit data of {made['pairs']} pairs with seed {made['seed']}, but the config "
                f"asks for {data.shapeedit_pairs} pairs with seed {data.shapeedit_seed}: use another output_dir or "
                f"delete {data_dir}"
            )
        train_file, eval_file = data_dir / "train.json", Path(data.eval) if data.eval else data_dir / "val.json"
    else:
        train_file, eval_file = Path(data.train), Path(data.eval) if data.eval else None
    train, skipped = load_pairs(train_file, root, data.skip_bad)
    report_skipped(skipped, f"training rows of {train_file}")
    if not train:
        raise DataError(f"{train_file}: no usable training pair ({sum(skipped.values())} bad rows skipped)")
    for extra in data.mix:
        mixed, skipped = load_pairs(extra, root, data.skip_bad)
        report_skipped(skipped, f"training rows of {extra}")
        if not mixed:
            raise DataError(f"{extra} (data.mix): no usable training pair ({sum(skipped.values())} bad rows skipped)")
        train += mixed
    evaluation: list[PreferencePair] = []
    if eval_file is not None:
        evaluation, skipped = load_pairs(eval_file, root, data.skip_bad)
        report_skipped(skipped, f"evaluation rows of {eval_file}")
        evaluation = [p for p in evaluation if not p.tie][: data.max_eval_pairs]
    return train, evaluation


def report_skipped(skipped: Counter, what: str) -> None:
    """One line per file: how many bad rows data.skip_bad dropped, by kind of fault."""
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in skipped.most_common())
        print(f"skipped {sum(skipped.values())} bad {what} ({kinds})")


def usable_pairs(model: JRM, pairs: list[PreferencePair], skip_bad: bool, what: str) -> list[PreferencePair]:
    """Pairs whose instruction the model accepts (the one check load_pairs cannot make: it needs the model's
    tokenizer); any other stops with its file, row and key (or, with data.skip_bad, is dropped and counted)."""
    kept = []
    for pair in pairs:
        try:
            model.check_instruction(pair.instruction, f"{pair.where}: prompt: the instruction")
        except ValueError as e:
            if not skip_bad:
                raise DataError(str(e), "instruction refused by the model") from e
            continue
        kept.append(pair)
    report_skipped(
        Counter({"instruction refused by the model": len(pairs) - len(kept)}) if len(kept) < len(pairs) else Counter(),
        f"{what} pairs",
    )
    return kept


def resume_checkpoint(resume: str, output_dir: str) -> str | None:
    """The checkpoint a run continues from: `auto` the newest complete one in output_dir (None without one),
    `none` none, anything else that path."""
    checkpoint = get_last_checkpoint(output_dir) if resume == "auto" else None if resume == "none" else resume
    if checkpoint:
        print(f"resuming from {checkpoint}")
    return checkpoint


@dataclass
class PreparedRun:
    """Everything checked and built before the first step: what `fit` trains."""

    args: TrainingArguments
    model: JRM
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    with_critiques: bool


def prepare(cfg: TrainConfig) -> PreparedRun:
    """Check the whole configuration and every row of the data (fields, images decoded, geometry, instruction
    length) and build the model; raises DataError / ConfigError / ValueError naming the file, row and key.
    Writes {output_dir}/config.yaml only once all of it passed, so a bad input leaves an existing run as it was."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", cfg.output_dir)
    out = Path(cfg.output_dir)
    args = training_arguments(cfg)
    if cfg.model.dimension_heads not in (0, 2):
        raise ValueError(
            f"model.dimension_heads must be 0 or 2 (EditReward-Data has 2 dimension scores), got "
            f"{cfg.model.dimension_heads}"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank runs this: rank 0 generates the data while the others wait, then they read
    # what it wrote (concurrent generation into one folder races).
    with args.main_process_first(desc="ShapeEdit data"):
        train_pairs, eval_pairs = prepare_data(cfg)
    with_critiques = cfg.loss.alpha > 0
    if with_critiques and not any(p.chosen_critique for p in train_pairs):
        raise ValueError(
            "loss.alpha > 0 needs critiques (rationale1/rationale2) in the training data; loss.alpha=0 trains without"
        )
    if cfg.model.dimension_heads and not any(p.chosen_dims for p in train_pairs):
        raise ValueError("model.dimension_heads > 0 needs model1/2_dim1/2_score fields in the training data")
    if args.deepspeed:
        import deepspeed

        # ZeRO-3 partitions weights while the model is built: DeepSpeed must see every rank by then.
        deepspeed.init_distributed(dist_backend=args.ddp_backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    model = JRM.build(cfg.model, seed=cfg.seed)
    train_pairs = usable_pairs(
        model, train_pairs, cfg.data.skip_bad, "training"
    )  # before hours of training, not in them
    eval_pairs = usable_pairs(model, eval_pairs, cfg.data.skip_bad, "evaluation")
    if not train_pairs:
        raise DataError("no training pair is left once the instructions the model refuses are skipped")
    if args.process_index == 0:
        save_config(cfg, out / "config.yaml")
    return PreparedRun(args, model, train_pairs, eval_pairs, with_critiques)


def fit(cfg: TrainConfig, run: PreparedRun) -> dict:
    """Train a prepared run, save {output_dir}/final, and return the final evaluation metrics."""
    out = Path(cfg.output_dir)
    if not run.eval_pairs:
        run.args.eval_strategy = "no"
    trainer = JRMTrainer(
        model=run.model,
        args=run.args,
        train_dataset=PairDataset(run.train_pairs),
        eval_dataset=PairDataset(run.eval_pairs) if run.eval_pairs else None,
        data_collator=PairCollator(run.model, run.with_critiques),
        compute_metrics=compute_metrics,
        callbacks=[MetricsFile(out / "metrics.jsonl")],
        loss_config=cfg.loss,
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg.resume, cfg.output_dir))
    trainer.save_model(str(out / "final"))
    results = trainer.evaluate() if run.eval_pairs else {}
    if trainer.is_world_process_zero():
        (out / "eval.json").write_text(json.dumps(results, indent=1))
    if torch.distributed.is_initialized():
        # An orderly shutdown. A gloo group whose last reference (held by the DeepSpeed engine inside the
        # trainer) dies during interpreter finalisation can abort the process ("terminate called without an
        # active exception") after all the work is saved, so the trainer goes first, while Python is alive.
        torch.distributed.barrier()
        del trainer
        gc.collect()
        torch.distributed.destroy_process_group()
    return results


def train(cfg: TrainConfig) -> dict:
    """Check everything (`prepare`), then train (`fit`); returns the final evaluation metrics."""
    return fit(cfg, prepare(cfg))


def main(argv: list[str] | None = None) -> int:
    """Bad config or data: `error: ...` naming the file, row or key, and exit 2, before anything is written."""
    cfg = config_from_cli(TrainConfig, sys.argv[1:] if argv is None else argv, __doc__)
    try:
        run = prepare(cfg)
    except (DataError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(fit(cfg, run), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
