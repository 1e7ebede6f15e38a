"""Pretrain a reward model's backbone on label-free ShapeEdit grounding tasks, then save it as a Qwen-VL checkpoint.

    python -m reward.pretrain_backbone                                 # tiny Qwen2-VL into runs/backbone, CPU
    python -m reward.pretrain_backbone output_dir=runs/bb trainer.max_steps=200
    python reward/train.py model.backbone=runs/backbone                # a JRM from it, like any local checkpoint

The paper's JRM starts from a pretrained VLM; the tiny preset starts from random weights and would have to
learn to see shapes, read words and bind them from preference pairs alone. This script teaches that first,
with the tasks of reward/shapeedit/grounding.py (describe with boxes, name the differences, find an object,
point at the objects an instruction names: no preference labels), never the same example twice. Inputs are the
JRM's own ([source][second image] text <|score|> answer), so the fine-tuned model reads what it was
pretrained on. Both the JRM and its alpha = 0 ablation start from the same checkpoint.

Writes {output_dir}/ (config.json, model.safetensors, tokenizer and processor files: `load_backbone` and
`AutoModelForImageTextToText` read it), pretrain.json (the settings, final loss, and how well it localises:
the box error of greedy answers to fresh "where is ...?" questions and, teacher forced, each edge's error,
both beside those of a constant answer) and metrics.jsonl.
A second run with the same settings reuses the checkpoint; other settings in the same folder are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python reward/pretrain_backbone.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from reward.config import ConfigError, config_from_cli, save_config
from reward.model import JRM, JRMArgs, _unwrap
from reward.shapeedit.critique import LOC_TOKENS, parse_locations
from reward.shapeedit.grounding import TASKS, GroundingExample, sample_example

DEFAULT_TRAINER = {
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 50,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 16,
    "max_steps": 800,
    "logging_steps": 50,
    "save_strategy": "steps",
    "save_steps": 400,
    "save_total_limit": 1,
    "report_to": [],
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,
    "disable_tqdm": False,
}
DONE_FILE = "pretrain.json"


@dataclass
class PretrainConfig:
    output_dir: str = "runs/backbone"
    """Where the pretrained backbone goes (a Qwen-VL checkpoint folder)."""
    seed: int = 0
    """Seed of the initialisation and of the generated tasks."""
    model: JRMArgs = field(default_factory=JRMArgs)
    """The backbone to pretrain (model.backbone: tiny or a checkpoint; the reward head is not trained)."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Which grounding tasks to draw from, uniformly."""
    image_size: int = 64
    """Side of the generated images, in pixels (ShapeEdit's default)."""
    trainer: dict = field(default_factory=lambda: dict(DEFAULT_TRAINER))
    """transformers TrainingArguments (learning_rate, max_steps, per_device_train_batch_size, ...)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of {list(TASKS)}, got {self.tasks}")
        if self.model.lora_rank:
            raise ValueError("model.lora_rank: pretraining trains every weight; set it to 0")


class GroundingTasks(Dataset):
    """`size` generated grounding examples; example i depends only on (seed, i), so any order, any worker
    and a resumed run see the same data. (A map-style dataset: accelerate slices the batches of an
    iterable one by rows, which would cut the image patches apart.)"""

    def __init__(self, tasks: list[str], image_size: int, seed: int, size: int):
        self.tasks, self.image_size, self.seed, self.size = tasks, image_size, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> GroundingExample:
        rng = np.random.default_rng([self.seed, i])
        while True:
            example = sample_example(rng, self.image_size, self.tasks[int(rng.integers(len(self.tasks)))])
            if example is not None:
                return example


class GroundingCollator:
    """Encodes examples as the JRM encodes candidates: [source][second] question <|score|> answer."""

    def __init__(self, model: JRM):
        self.model = model

    def __call__(self, examples: list[GroundingExample]) -> dict[str, torch.Tensor]:
        return self.model.encode_chats(
            [self.model.chat_text(e.question) for e in examples],
            [Image.fromarray(e.source) for e in examples],
            [Image.fromarray(e.second) for e in examples],
            [e.answer for e in examples],
        )


class GroundingTrainer(Trainer):
    """Trainer whose loss is the JRM's language-modelling loss on the answers."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out.lm_loss, out) if return_outputs else out.lm_loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_backbone(self.model, output_dir or self.args.output_dir)
        torch.save(self.args, os.path.join(output_dir or self.args.output_dir, "training_args.bin"))


def save_backbone(model: JRM, path: str | Path) -> None:
    """The backbone and its processor as a plain Qwen-VL checkpoint (the reward head is left out)."""
    _unwrap(model.backbone).save_pretrained(str(path))
    model.processor.save_pretrained(str(path))


def locate_questions(image_size: int, seed: int, stream: int, num: int) -> list[GroundingExample]:
    """`num` "where is ...?" examples drawn from rng [seed, stream]; the training examples use [seed, i] with
    i < 2**31, so a stream >= 2**31 never repeats one of them."""
    rng = np.random.default_rng([seed, stream])
    examples: list[GroundingExample] = []
    while len(examples) < num:
        example = sample_example(rng, image_size, "locate")
        if example is not None:
            examples.append(example)
    return examples


@torch.inference_mode()
def locate_edges(model: JRM, image_size: int, seed: int, num: int = 256, batch_size: int = 32) -> dict:
    """A sharper localisation probe than greedy boxes, edge by edge: on `num` fresh "where is ...?" questions,
    with the true box given up to each edge (teacher forcing), the distance on the 0-1000 scale from the most
    probable location token's centre to the true edge, against always answering each edge's mean.

    Greedy answers can collapse onto a few likely boxes, so their error can say little about what a model has
    learnt, and 64 of them move by tens from run to run. Edge by edge the probe also says *what* is learnt:
    ymin and xmin place the object (given only the image and the question), ymax and xmax then follow from
    its size, so a backbone that sees rows but not columns shows it in the first two. Returns the mean over
    the four edges and each edge's, the constant's likewise, and the count of questions.
    """
    examples = locate_questions(image_size, seed, 2**31 + 1, num)  # other questions than locate_error's
    tokenizer = model.processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(LOC_TOKENS))
    is_location, centre = set(ids), np.array(parse_locations("".join(LOC_TOKENS)))
    was_training = model.training
    model.eval()
    answered, truth = [], np.array([parse_locations(e.answer) for e in examples])
    device = model.head.weight.device
    collate = GroundingCollator(model)
    for start in range(0, num, batch_size):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels")
        logits = _unwrap(model.backbone)(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
        for row in range(labels.shape[0]):
            answer = torch.nonzero(labels[row] != -100).flatten().tolist()
            at = [j for j in answer if labels[row, j].item() in is_location]
            answered.append([centre[logits[row, j - 1, ids].argmax().item()] for j in at])
    model.train(was_training)
    errors, constant = np.abs(np.array(answered) - truth).mean(0), np.abs(truth - truth.mean(0)).mean(0)
    return {
        "locate_edge_error": float(errors.mean()),
        "locate_edge_errors": [round(float(e), 1) for e in errors],
        "constant_edge_error": float(constant.mean()),
        "constant_edge_errors": [round(float(e), 1) for e in constant],
        "locate_edge_questions": num,
    }


@torch.inference_mode()
def locate_error(model: JRM, image_size: int, seed: int, num: int = 64) -> dict:
    """How well the backbone localises: greedy answers to `num` fresh "where is the ...?" questions.

    Returns the mean absolute error of the box coordinates (0-1000 scale), that of always answering the
    mean true box (what a backbone that does not look at the image can reach), and unparsable answers.
    """
    examples = locate_questions(image_size, seed, 2**31, num)
    was_training = model.training
    model.eval()
    tokenizer = model.processor.tokenizer
    batch = model.encode_chats(
        [model.chat_text(e.question) for e in examples],
        [Image.fromarray(e.source) for e in examples],
        [Image.fromarray(e.second) for e in examples],
        padding_side="left",
    )
    device = model.head.weight.device
    generated = _unwrap(model.backbone).generate(
        **{k: v.to(device) for k, v in batch.items()}, max_new_tokens=24, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model.train(was_training)
    answers = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
    truth = np.array([parse_locations(e.answer) for e in examples])
    errors, failures = [], 0
    for answer, box in zip(answers, truth):
        found = parse_locations(answer)[:4]
        if len(found) < 4:
            failures += 1
            continue
        errors.append(np.abs(np.array(found) - box).mean())
    return {
        "locate_box_error": float(np.mean(errors)) if errors else None,
        "constant_box_error": float(np.abs(truth - truth.mean(0)).mean()),
        "locate_unparsable": failures,
    }


def settings(cfg: PretrainConfig) -> dict:
    """What decides the checkpoint's weights: a run with the same settings reuses it."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain (or reuse) the backbone in cfg.output_dir; returns what pretrain.json holds."""
    out = Path(cfg.output_dir)
    done = out / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        saved = record["settings"]
        # model keys added since the folder was written hold their defaults there (what its run used)
        saved = {**saved, "model": {**dataclasses.asdict(JRMArgs()), **saved.get("model", {})}}
        if saved != settings(cfg):
            raise ConfigError(
                f"{out} holds a backbone pretrained with other settings ({done}); use another output_dir or delete "
                f"{out}"
            )
        print(f"reusing the pretrained backbone in {out}")
        return record
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pretrain_config.yaml")
    os.environ.setdefault("WANDB_MODE", "offline")
    kwargs = dict(cfg.trainer)
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    try:
        args = TrainingArguments(output_dir=str(out), seed=cfg.seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"trainer: {e}") from e
    model = JRM.build(cfg.model, seed=cfg.seed)
    trainer = GroundingTrainer(
        model=model,
        args=args,
        train_dataset=GroundingTasks(
            cfg.tasks,
            cfg.image_size,
            cfg.seed,
            args.max_steps * args.train_batch_size * args.gradient_accumulation_steps,
        ),
        data_collator=GroundingCollator(model),
    )
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(out)))
    save_backbone(model, out)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    record = {
        "settings": settings(cfg),
        "final_loss": losses[-1] if losses else None,
        "seconds": trainer.state.log_history[-1].get("train_runtime"),
    }
    record.update(locate_error(model, cfg.image_size, cfg.seed))
    record.update(locate_edges(model, cfg.image_size, cfg.seed))
    with (out / "metrics.jsonl").open("w") as f:
        for log in trainer.state.log_history:
            f.write(json.dumps(log) + "\n")
    for checkpoint in out.glob("checkpoint-*"):  # only for resuming an interrupted run; the folder is the model now
        shutil.rmtree(checkpoint)
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_cli(PretrainConfig, sys.argv[1:] if argv is None else argv, __doc__)
    try:
        print(json.dumps(pretrain(cfg), indent=1))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
