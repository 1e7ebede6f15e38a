"""The trained generative baseline: SFT through TRL on the JRM's input, its labels and loss, its checkpoint, its
evaluation."""

import json
import shutil

import pytest
import torch

from reward.config import ConfigError, load_config
from reward.data import PreferencePair, load_image, load_pairs
from reward.evaluate import load_reward
from reward.generative import GenerativeJudge, parse_verdict
from reward.model import JRM, JRMArgs
from reward.shapeedit import GenerateConfig, generate
from reward.train_generative import CandidateCollator, GenerativeConfig, candidates_of, judge_pairs, sft_config, train

SMALL = dict(tiny_hidden=64, tiny_layers=2)


@pytest.fixture(scope="module")
def shapeedit(tmp_path_factory):
    """A small ShapeEdit dataset (with critiques) and a training file of its first pair only."""
    data = tmp_path_factory.mktemp("shapeedit")
    generate(GenerateConfig(out=str(data), pairs=36, seed=0, val_fraction=0.34), progress=False)
    rows = json.loads((data / "train.json").read_text())
    (data / "one_pair.json").write_text(json.dumps(rows[:1]))
    return data


def test_candidates_are_deduplicated_across_pairs():
    def pair(chosen, rejected):
        return PreferencePair(
            "src.png", "make it red", chosen, rejected, False, f"c {chosen}", f"c {rejected}", None, None, "f:0"
        )

    candidates, slots = candidates_of([pair("a", "b"), pair("b", "c"), pair("a", "c")])
    assert [c.edited for c in candidates] == ["a", "b", "c"]
    assert slots == [(0, 1), (1, 2), (0, 2)]
    assert [c.critique for c in candidates] == ["c a", "c b", "c c"]


def test_labels_hold_only_the_critique_and_trl_loss_is_the_jrm_critique_loss(shapeedit, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    model = JRM.build(JRMArgs(**SMALL), seed=0)
    candidates = candidates_of(load_pairs(shapeedit / "train.json")[0][:3])[0]
    rows = [c.__dict__ for c in candidates]
    batch = CandidateCollator(model)(rows)
    tokenizer = model.processor.tokenizer
    for row, candidate in enumerate(candidates):
        learnt = batch["labels"][row][batch["labels"][row] != -100]
        # Exactly the critique and the end token: no prompt, image or score token, no padding.
        assert tokenizer.decode(learnt) == candidate.critique + tokenizer.eos_token
        score_at = int((batch["input_ids"][row] == model.score_token_id).nonzero())
        assert (batch["labels"][row][: score_at + 1] == -100).all()

    cfg = load_config(
        GenerativeConfig, None, [f"output_dir={tmp_path}", "trainer.report_to=[]", "trainer.eval_strategy=no"]
    )
    trainer = SFTTrainer(
        model=model.backbone,
        args=sft_config(cfg),
        data_collator=CandidateCollator(model),
        train_dataset=Dataset.from_list(rows),
        processing_class=model.processor,
    )
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model.backbone, dict(batch))
        jrm_loss = model(**batch).lm_loss
    assert trl_loss.item() == pytest.approx(jrm_loss.item(), rel=1e-5)


@pytest.mark.slow
def test_sft_learns_the_critique_and_final_loads_as_a_generative_reward(shapeedit, tmp_path):
    common = [
        "model.tiny_hidden=64",
        "model.tiny_layers=2",
        f"data.train={shapeedit / 'one_pair.json'}",  # two candidates: every step sees the same batch
        f"data.eval={shapeedit / 'val.json'}",
        "data.max_eval_pairs=3",
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=2",
        "trainer.warmup_steps=0",
        "trainer.logging_steps=1",
        "trainer.eval_steps=4",
        "trainer.save_steps=2",
        "trainer.report_to=[]",
        "trainer.disable_tqdm=true",
        "decode.max_new_tokens=6",
    ]
    cfg = load_config(GenerativeConfig, None, [f"output_dir={tmp_path / 'full'}"] + common)
    results = train(cfg)
    logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert any("eval_loss" in r for r in logs)  # the periodic critique loss on the evaluation candidates

    # final/ is a JRM checkpoint: the backbone learnt, the reward head is the one it was built with.
    trained = JRM.from_pretrained(tmp_path / "full" / "final")
    built = JRM.build(cfg.model, seed=cfg.seed)
    assert torch.equal(trained.head.weight, built.head.weight)
    assert not torch.equal(trained.backbone.lm_head.weight, built.backbone.lm_head.weight)

    # evaluate.py's generative:PATH scores it by decoding, one score per candidate.
    judge = load_reward(f"generative:{tmp_path / 'full' / 'final'}")
    pairs = load_pairs(shapeedit / "val.json")[0][:3]
    candidates = candidates_of(pairs)[0]
    sources = [load_image(c.source) for c in candidates]
    edited = [load_image(c.edited) for c in candidates]
    scores = judge.score(sources, [c.instruction for c in candidates], edited)
    assert scores.shape == (len(candidates),) and judge.generated_tokens > 0
    assert json.loads((tmp_path / "full" / "eval.json").read_text()) == results
    assert results["eval/pairs"] == 3 and results["perf/pairs_per_s"] > 0
    assert 0 <= results["eval/parse_failures"] <= results["eval/candidates"]

    # Resume: checkpoint-2 continued with resume=auto ends where the uninterrupted run ends.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(load_config(GenerativeConfig, None, [f"output_dir={tmp_path / 'resumed'}"] + common))
    resumed = JRM.from_pretrained(tmp_path / "resumed" / "final")
    for (name, a), (_, b) in zip(trained.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_jrm_critique_is_the_judges_text_and_the_verdict_is_the_score(shapeedit):
    model = JRM.build(JRMArgs(**SMALL), seed=0)
    candidates = candidates_of(load_pairs(shapeedit / "train.json")[0][:2])[0]
    sources = [load_image(c.source) for c in candidates]
    edited = [load_image(c.edited) for c in candidates]
    instructions = [c.instruction for c in candidates]
    model.train()
    out = model.critique(sources, instructions, edited, max_new_tokens=5, min_new_tokens=5)
    assert model.training  # decoding leaves the mode it found
    assert out.num_tokens.tolist() == [5] * len(candidates)
    judge = GenerativeJudge(model, max_new_tokens=5, min_new_tokens=5)
    assert judge.critique(sources, instructions, edited) == out.texts and judge.generated_tokens == 5 * len(candidates)
    for candidate in candidates:  # the training critiques end with the verdict the judge learns to write
        assert parse_verdict(candidate.critique) is not None
    assert parse_verdict("Instruction following 3/4, consistency and quality 2.5/4, overall 5.5/8.") == pytest.approx(
        5.5 / 8
    )
    assert parse_verdict("Instruction following 3/4, consistency and quality 2/4") is None  # cut before the verdict


class TableJudge:
    """Scores looked up by the edited image's pixels: the part of GenerativeJudge that judge_pairs uses."""

    parse_failures = 0
    generated_tokens = 0

    def __init__(self, table: dict[bytes, float]):
        self.table = table
        self.scored = 0

    def score(self, source_images, instructions, edited_images, batch_size=16):
        self.scored += len(edited_images)
        return torch.tensor([self.table[image.tobytes()] for image in edited_images])


def test_pairwise_accuracy_counts_tied_verdicts_as_wrong(shapeedit):
    pairs = load_pairs(shapeedit / "val.json")[0]
    strict = sum(not p.tie for p in pairs)  # tie pairs are left out
    oracle = {}
    for row in json.loads((shapeedit / "val.json").read_text()):
        for slot in ("1", "2"):
            oracle[load_image(shapeedit / row[f"path{slot}"]).tobytes()] = row[f"oracle{slot}"]["overall"]

    right = TableJudge(oracle)
    result = judge_pairs(right, pairs, batch_size=4)
    assert result["eval/accuracy"] == 1.0 and result["eval/pairs"] == strict  # the oracle that labelled the pairs
    assert right.scored == result["eval/candidates"] < 2 * strict  # pairs share candidates: each is decoded once

    tied = TableJudge(dict.fromkeys(oracle, 0.5))
    result = judge_pairs(tied, pairs, batch_size=4)
    assert result["eval/accuracy"] == 0.0 and result["eval/score_ties"] == strict


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model loading or dataset preparation"):
        sft_config(load_config(GenerativeConfig, None, ["trainer.max_length=512"]))
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        sft_config(load_config(GenerativeConfig, None, ["trainer.gradient_checkpointing=true"]))
    with pytest.raises(ConfigError, match="trl.SFTConfig"):
        sft_config(load_config(GenerativeConfig, None, ["trainer.learning_rat=1e-4"]))
    with pytest.raises(ValueError, match="decode.max_new_tokens"):
        load_config(GenerativeConfig, None, ["decode.max_new_tokens=-1"])
    cfg = load_config(GenerativeConfig, None, ["model.backbone=runs/backbone", "trainer.loss_type=dft"])
    args = sft_config(cfg)
    assert cfg.data.max_eval_pairs == 100 and args.loss_type == "dft" and not args.activation_checkpointing
    assert args.learning_rate == 3e-4 and args.per_device_train_batch_size == 8 and args.max_steps == 1600


def test_bad_data_exits_2_and_leaves_an_existing_run_alone(shapeedit, tmp_path, capsys):
    """As reward/train.py: every row is checked before config.yaml is written; a bad one ends with exit 2."""
    from reward.train_generative import main

    rows = json.loads((shapeedit / "train.json").read_text())[:2]
    rows[1]["path1"] = "missing.png"
    bad = shapeedit / "bad_row.json"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("an earlier run's config\n")
    code = main(
        [
            f"output_dir={out}",
            f"data.train={bad}",
            "model.tiny_hidden=64",
            "model.tiny_layers=2",
            "trainer.report_to=[]",
        ]
    )
    assert code == 2 and "bad_row.json:row 1" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "an earlier run's config\n"
