"""Train the generative baseline: supervised fine-tuning of JRM's backbone to write the critique and its verdict.

    python reward/train_generative.py                                    # tiny backbone on ShapeEdit, CPU
    python reward/train_generative.py model.backbone=runs/backbone trainer.max_steps=800
    python reward/evaluate.py --reward generative:runs/generative/final \
        --benchmark shapeedit:runs/generative/data/test_iid.json --out runs/eval

EditScore-style judge: the model reads exactly the JRM's input (JRM.encode: both images, the instruction, the
score token, transition frames) and learns, by next-token loss on the critique alone, to write the critique
that ends in "overall c/8"; scoring decodes that verdict (reward/generative.py). TRL's SFTTrainer trains the
backbone of a fresh JRM, whose reward head stays untrained and unused. Without `data.train`, ShapeEdit is
generated into {output_dir}/data. Writes {output_dir}/config.yaml, metrics.jsonl, checkpoint-*/ (resumable:
resume=auto) and final/, each a JRM checkpoint that `generative:PATH` loads, and eval.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):  # run as `python reward/train_generative.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from reward.config import ConfigError, config_from_cli, save_config
from reward.data import DataError, PreferencePair, load_image
from reward.generative import GenerativeJudge
from reward.model import JRM, JRMArgs
from reward.train import DEFAULT_TRAINER as JRM_TRAINER
from reward.train import DataConfig, MetricsFile, prepare_data, resume_checkpoint, usable_pairs

# Set by this file: the collator encodes raw candidates (so TRL must not prepare the dataset or drop its
# columns), and model.gradient_checkpointing is the one switch for checkpointing (SFTConfig would turn the
# Trainer's on by default).
FIXED_TRAINER = {
    "remove_unused_columns": False,
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "activation_checkpointing": False,
}
# reward/train.py's defaults, so that the judge and the JRM train alike; SFTConfig turns bf16 autocast on
# unless told, and the tiny preset trains in float32.
DEFAULT_TRAINER = {k: v for k, v in JRM_TRAINER.items() if k not in FIXED_TRAINER} | {"bf16": False}
# SFTConfig's own fields that still act here; the rest configure TRL's model loading, dataset preparation and
# collators, which this trainer does not use.
SFT_FIELDS_USED = {"loss_type", "activation_offloading"}


@dataclass
class DecodeConfig:
    max_new_tokens: int = 0
    """Critique tokens decoded per candidate in the final evaluation; 0: model.max_critique_tokens + 1, as
    evaluate.py's generative:PATH (every verdict fits)."""
    batch_size: int = 16
    """Candidates per generate() call."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.batch_size < 1:
            raise ValueError(
                f"decode.max_new_tokens ({self.max_new_tokens}) must be >= 0 and decode.batch_size "
                f"({self.batch_size}) >= 1"
            )


@dataclass
class GenerativeConfig:
    output_dir: str = "runs/generative"
    """Run folder: config, metrics, checkpoints, final model, eval.json."""
    seed: int = 0
    """Seed of the model initialisation and data order."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output_dir; none; or a checkpoint path."""
    model: JRMArgs = field(default_factory=JRMArgs)
    """The backbone and input encoding, exactly as the JRM's (its reward head is built but never trained)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_eval_pairs=100))
    """Training and evaluation pairs (max_eval_pairs is 100 here: the final evaluation decodes every candidate)."""
    trainer: dict = field(default_factory=lambda: dict(DEFAULT_TRAINER))
    """trl.SFTConfig fields (learning_rate, max_steps, bf16, deepspeed, ...)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding in the final evaluation."""


@dataclass(frozen=True)
class Candidate:
    """One edited image to judge, with its reference critique: one training example."""

    source: str  # path of the source image
    instruction: str
    edited: str  # path of the edited image
    critique: str | None  # ends with the verdict "... overall c/8."; None when the data has none
    where: str  # "file:row" of the first pair that holds it


def candidates_of(pairs: list[PreferencePair]) -> tuple[list[Candidate], list[tuple[int, int]]]:
    """The distinct candidates of `pairs` (pairs of one prompt share candidates) in first-seen order.

    Returns:
        candidates; and per pair, the indices of its (chosen, rejected) candidates.
    """
    index: dict[tuple, int] = {}
    candidates: list[Candidate] = []
    slots = []
    for p in pairs:
        pair = []
        for edited, critique in ((p.chosen, p.chosen_critique), (p.rejected, p.rejected_critique)):
            key = (p.source, p.instruction, edited, critique)
            if key not in index:
                index[key] = len(candidates)
                candidates.append(Candidate(p.source, p.instruction, edited, critique, p.where))
            pair.append(index[key])
        slots.append((pair[0], pair[1]))
    return candidates, slots


class CandidateCollator:
    """Loads a batch of candidates' images and encodes them as the JRM does, with `labels` on the critique only."""

    def __init__(self, model: JRM):
        self.model = model

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sources = [load_image(r["source"], r["where"]) for r in rows]
        edited = [load_image(r["edited"], r["where"]) for r in rows]
        return self.model.encode(sources, [r["instruction"] for r in rows], edited, [r["critique"] for r in rows])


class GenerativeTrainer(SFTTrainer):
    """TRL's SFTTrainer whose checkpoints are JRMs: `generative:PATH` loads any checkpoint-*/, and resume reads one
    back.

    Trainer's own checkpoints of a Qwen-VL backbone do not resume: save_pretrained renames the weights to the
    original checkpoint layout and Trainer's reload does not map them back (it warns and keeps the fresh ones).
    """

    def __init__(self, *args, jrm: JRM, **kwargs):
        super().__init__(*args, **kwargs)
        self.jrm = jrm

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.jrm.save_pretrained(output_dir)  # every rank holds all the weights (ZeRO-3 is refused)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.jrm.load_checkpoint(resume_from_checkpoint)


def sft_config(cfg: GenerativeConfig) -> SFTConfig:
    valid = {f.name for f in fields(SFTConfig)}
    unknown = sorted(set(cfg.trainer) - valid)
    if unknown:
        raise ConfigError(f"unknown trainer key(s) {unknown}; they must be trl.SFTConfig fields")
    if "output_dir" in cfg.trainer or "seed" in cfg.trainer:
        raise ConfigError("set output_dir and seed at the top level of the config, not under trainer")
    fixed = sorted(k for k in cfg.trainer if k in FIXED_TRAINER or "checkpointing" in k)
    if fixed:
        raise ConfigError(
            f"trainer key(s) {fixed} are set by this trainer (gradient checkpointing: model.gradient_checkpointing)"
        )
    unused = sorted(set(cfg.trainer) & (valid - {f.name for f in fields(TrainingArguments)} - SFT_FIELDS_USED))
    if unused:
        raise ConfigError(
            f"trainer key(s) {unused} configure TRL's model loading or dataset preparation, which this trainer does "
            f"not use: `model` builds the model and JRM.encode every batch (model.max_critique_tokens cuts critiques)"
        )
    if cfg.trainer.get("load_best_model_at_end"):
        raise ConfigError(
            "trainer.load_best_model_at_end: Trainer cannot reload a JRM checkpoint as its model; compare checkpoints "
            "with reward/evaluate.py"
        )
    kwargs = {**cfg.trainer, **FIXED_TRAINER}
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
    return SFTConfig(output_dir=cfg.output_dir, seed=cfg.seed, **kwargs)


def judge_pairs(judge: GenerativeJudge, pairs: list[PreferencePair], batch_size: int) -> dict:
    """Pairwise accuracy of decoded verdicts on strict pairs: a tie between verdicts counts as wrong.

    Tie pairs are left out. Each distinct candidate is decoded once; pairs/s counts decoding time only
    (images are loaded first).
    """
    pairs = [p for p in pairs if not p.tie]
    candidates, slots = candidates_of(pairs)
    sources = [load_image(c.source, c.where) for c in candidates]
    edited = [load_image(c.edited, c.where) for c in candidates]
    failures, tokens = judge.parse_failures, judge.generated_tokens
    start = time.perf_counter()
    scores = judge.score(sources, [c.instruction for c in candidates], edited, batch_size=batch_size)
    seconds = time.perf_counter() - start
    chosen, rejected = scores[[c for c, _ in slots]], scores[[r for _, r in slots]]
    return {
        "eval/accuracy": float((chosen > rejected).float().mean()),
        "eval/score_ties": int((chosen == rejected).sum()),
        "eval/parse_failures": judge.parse_failures - failures,
        "eval/pairs": len(pairs),
        "eval/candidates": len(candidates),
        "eval/generated_tokens": judge.generated_tokens - tokens,
        "perf/pairs_per_s": len(pairs) / seconds,
    }


def warn_cut_verdicts(model: JRM, candidates: list[Candidate]) -> None:
    """Critiques over model.max_critique_tokens are cut before their verdict: the judge would never learn to end one."""
    lengths = [
        len(ids)
        for ids in model.processor.tokenizer([c.critique for c in candidates], add_special_tokens=False)["input_ids"]
    ]
    cut = sum(n > model.config.max_critique_tokens for n in lengths)
    if cut:
        print(
            f"warning: {cut} of {len(candidates)} training critiques exceed model.max_critique_tokens "
            f"({model.config.max_critique_tokens}) and lose their verdict"
        )


def train(cfg: GenerativeConfig) -> dict:
    """Fine-tune, save {output_dir}/final, and return the decoding evaluation (also written to eval.json)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", cfg.output_dir)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = sft_config(cfg)
    with args.main_process_first(desc="ShapeEdit data"):
        train_pairs, eval_pairs = prepare_data(cfg)  # reads only cfg.output_dir and cfg.data; checks every row
    model = JRM.build(cfg.model, seed=cfg.seed)
    train_pairs = usable_pairs(model, train_pairs, cfg.data.skip_bad, "training")
    eval_pairs = usable_pairs(model, eval_pairs, cfg.data.skip_bad, "evaluation")
    train_candidates = [c for c in candidates_of(train_pairs)[0] if c.critique]
    if not train_candidates:
        raise ValueError(
            "the generative judge learns from critiques (rationale1/rationale2), and the training data has none: see "
            "reward/synthesize_critiques.py"
        )
    if args.process_index == 0:  # only once every input passed: a bad input leaves an existing run as it was
        save_config(cfg, out / "config.yaml")
    warn_cut_verdicts(model, train_candidates)
    eval_candidates = [c for c in candidates_of(eval_pairs)[0] if c.critique]  # for the periodic critique loss
    if not eval_candidates:
        args.eval_strategy = "no"
    trainer = GenerativeTrainer(
        model=model.backbone,  # trained in place: the JRM holds the same module
        args=args,
        data_collator=CandidateCollator(model),
        train_dataset=Dataset.from_list([asdict(c) for c in train_candidates]),
        eval_dataset=Dataset.from_list([asdict(c) for c in eval_candidates]) if eval_candidates else None,
        processing_class=model.processor,
        callbacks=[MetricsFile(out / "metrics.jsonl")],
        jrm=model,
    )
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError(
            "ZeRO-3 partitions the weights that final/ is saved from; use ZeRO-2 (reward/configs/ds_zero2.json)"
        )
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg.resume, cfg.output_dir))
    trainer.save_model(str(out / "final"))
    results = {}
    if trainer.is_world_process_zero():
        if eval_pairs:
            # Judged as evaluate.py judges `generative:PATH`: the saved checkpoint, reloaded, decoding.
            device = "cuda" if torch.cuda.is_available() else "cpu"
            judge = GenerativeJudge(
                JRM.from_pretrained(out / "final").to(device), max_new_tokens=cfg.decode.max_new_tokens or None
            )
            results = judge_pairs(judge, eval_pairs, cfg.decode.batch_size)
        (out / "eval.json").write_text(json.dumps(results, indent=1))
    if torch.distributed.is_initialized():
        # An orderly shutdown: ranks that exit with the process group alive can abort in its threads.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> int:
    """Bad data: `error: ...` naming the file, row or key, and exit 2 (as reward/train.py)."""
    cfg = config_from_cli(GenerativeConfig, sys.argv[1:] if argv is None else argv, __doc__)
    try:
        print(json.dumps(train(cfg), indent=1))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
