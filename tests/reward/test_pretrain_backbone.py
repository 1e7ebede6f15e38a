"""Backbone pretraining on ShapeEdit grounding tasks: exact answers, a checkpoint that loads like a real one, reuse."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from reward.config import ConfigError
from reward.model import JRM, JRMArgs
from reward.pretrain_backbone import PretrainConfig, locate_questions, pretrain
from reward.shapeedit.critique import box, box_text, parse_locations
from reward.shapeedit.grounding import TASKS, describe, sample_example
from reward.shapeedit.world import sample_scene


def test_grounding_answers_are_exact():
    rng = np.random.default_rng(0)
    for task in TASKS:
        seen = 0
        while seen < 30:
            example = sample_example(rng, 32, task)
            if example is None:
                continue
            seen += 1
            assert example.task == task and example.source.shape == example.second.shape == (32, 32, 3)
            if task in ("describe", "locate", "instruction_regions"):
                assert np.array_equal(example.source, example.second)  # one image asked about
            edges = parse_locations(example.answer)
            assert len(edges) % 4 == 0 and (edges or task != "locate"), example
            for ymin, xmin, ymax, xmax in zip(*[iter(edges)] * 4):
                assert 0 < ymin < ymax < 1000 and 0 < xmin < xmax < 1000, example
    scene = sample_scene(np.random.default_rng(1), num_shapes=3)
    text = describe(scene)
    # Reading order: the boxes appear sorted, one per shape, each the shape's exact box.
    boxes = re.findall(r"(?:<\|loc_\d+\|>){4}", text)
    assert boxes == [box_text(b) for b in sorted(box(s) for s in scene.shapes)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    cfg = PretrainConfig(
        output_dir=str(out),
        model=JRMArgs(tiny_hidden=64, tiny_layers=2),
        trainer={
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "report_to": [],
            "save_strategy": "no",
            "remove_unused_columns": False,
            "disable_tqdm": True,
            "logging_steps": 1,
        },  # fmt: skip
    )
    record = pretrain(cfg)
    return cfg, record


def test_pretrained_backbone_loads_like_a_real_checkpoint(pretrained):
    cfg, record = pretrained
    assert record["final_loss"] is not None and np.isfinite(record["final_loss"])
    # The localisation probe ran on 64 questions: an error exactly when some answer was a box.
    assert 0 <= record["locate_unparsable"] <= 64
    assert (record["locate_box_error"] is None) == (record["locate_unparsable"] == 64)
    assert 0 < record["constant_box_error"] < 500
    saved = AutoModelForImageTextToText.from_pretrained(cfg.output_dir)
    jrm = JRM.build(JRMArgs(backbone=cfg.output_dir))  # reward/train.py model.backbone=DIR takes this path
    assert type(saved) is type(jrm.backbone)
    for (name, a), (_, b) in zip(saved.state_dict().items(), jrm.backbone.state_dict().items()):
        assert torch.equal(a, b), name
    # The grounded critiques' region tags were already in the vocabulary: nothing was added or resized.
    assert len(jrm.processor.tokenizer) == saved.get_input_embeddings().weight.shape[0]


def test_the_edge_probe_reads_every_edge_of_every_box(pretrained):
    """locate_edges: four edges per question, each error between 0 and 1000, their mean the reported mean, and
    the constant answer's error recounted here from the same questions' location tokens."""
    cfg, record = pretrained
    assert record["locate_edge_questions"] == 256 and len(record["locate_edge_errors"]) == 4
    assert all(0 <= e <= 1000 for e in record["locate_edge_errors"])
    assert record["locate_edge_error"] == pytest.approx(np.mean(record["locate_edge_errors"]), abs=0.05)
    questions = locate_questions(cfg.image_size, cfg.seed, 2**31 + 1, 256)
    truth = np.array([parse_locations(q.answer) for q in questions])
    assert truth.shape == (256, 4)
    constant = np.abs(truth - truth.mean(0)).mean(0)
    assert record["constant_edge_error"] == pytest.approx(constant.mean())
    assert record["constant_edge_errors"] == pytest.approx(constant, abs=0.05)


def test_a_second_run_reuses_the_checkpoint_and_other_settings_are_refused(pretrained):
    cfg, record = pretrained
    weights = Path(cfg.output_dir) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert pretrain(cfg) == record
    assert weights.stat().st_mtime_ns == stamp
    other = PretrainConfig(output_dir=cfg.output_dir, model=cfg.model, trainer=dict(cfg.trainer, max_steps=4))
    with pytest.raises(ConfigError, match="other settings"):
        pretrain(other)
    assert json.loads((Path(cfg.output_dir) / "pretrain.json").read_text()) == record
    # A folder written before a model setting existed held its default: still reused, another value refused
    done = Path(cfg.output_dir) / "pretrain.json"
    older = json.loads(done.read_text())
    del older["settings"]["model"]["tiny_patch"], older["settings"]["model"]["tiny_vision_depth"]
    done.write_text(json.dumps(older))
    try:
        assert pretrain(cfg)["final_loss"] == record["final_loss"]
        assert weights.stat().st_mtime_ns == stamp
        finer = PretrainConfig(output_dir=cfg.output_dir, model=JRMArgs(tiny_hidden=64, tiny_layers=2, tiny_patch=4))
        with pytest.raises(ConfigError, match="other settings"):
            pretrain(dataclasses.replace(finer, trainer=cfg.trainer))
    finally:
        done.write_text(json.dumps(record, indent=1) + "\n")
