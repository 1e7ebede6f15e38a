"""launch/pretrain_policy.py's demonstrators: the answer is a function of the decision code."""

from statistics import NormalDist

import numpy as np
import pytest

from launch.pretrain_policy import PolicyPretrainConfig, demonstration, draw_batch
from reward.shapeedit import apply_edits, render, sample_task
from reward.shapeedit.candidates import make_candidate


def tasks(n: int, seed: int = 0) -> list:
    rng, found = np.random.default_rng(seed), []
    while len(found) < n:
        task = sample_task(rng, 64)
        if task is not None and not task.heldout:
            found.append(task)
    return found


def test_the_decision_code_picks_the_demonstrators_answer():
    """'decisions': codes whose normal quantile is below correct_probability get the correct target; the rest
    of the quantiles are split among failure_modes in order; 'exact' always answers correctly."""
    cfg = PolicyPretrainConfig(demonstrator="decisions", correct_probability=0.6, failure_modes=["not_applied"])
    below, above = NormalDist().inv_cdf(0.59), NormalDist().inv_cdf(0.61)
    for task in tasks(20):
        correct = render(apply_edits(task.scene, task.edits), 64)
        assert np.array_equal(demonstration(task, below, cfg), correct)
        wrong = demonstration(task, above, cfg)
        assert np.array_equal(
            wrong, render(make_candidate(np.random.default_rng(0), task.scene, task.edits, "not_applied").scene, 64)
        )
        assert not np.array_equal(wrong, correct)
        assert np.array_equal(demonstration(task, above, PolicyPretrainConfig()), correct)


def test_a_failures_details_are_a_function_of_the_task_and_the_code():
    """Which edit of a composition goes wrong and with which value is fixed for a (task, code): a drawn detail
    would give the policy a mixture of answers to imitate, which it can only average."""
    cfg = PolicyPretrainConfig(
        demonstrator="decisions", correct_probability=0.4, failure_modes=["wrong_object", "wrong_attribute"]
    )
    wrong_object, wrong_attribute = NormalDist().inv_cdf(0.5), NormalDist().inv_cdf(0.9)
    differs = 0
    for task in tasks(30, seed=1):
        correct = render(apply_edits(task.scene, task.edits), 64)
        for code in (wrong_object, wrong_attribute):
            first = demonstration(task, code, cfg)
            assert np.array_equal(first, demonstration(task, code, cfg))
            differs += not np.array_equal(first, correct)
    assert differs >= 30  # most tasks have both failures


def test_the_exact_demonstrator_draws_no_codes_and_bad_settings_are_refused():
    _, _, _, codes = draw_batch(np.random.default_rng(0), PolicyPretrainConfig(batch_size=4))
    assert codes.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="demonstrator must be"):
        PolicyPretrainConfig(demonstrator="random")
    with pytest.raises(ValueError, match="failure_modes must be"):
        PolicyPretrainConfig(demonstrator="decisions", failure_modes=["blur"])
    with pytest.raises(ValueError, match="correct_probability"):
        PolicyPretrainConfig(correct_probability=0)
    with pytest.raises(ValueError, match="eval_code_means needs a policy with a decision code"):
        PolicyPretrainConfig(eval_code_means=[-2.0])


def test_gold_by_code_mean_fixes_every_instructions_mean_and_puts_it_back():
    """The demo's decision ceiling: held-out gold with the code mean fixed at each value, on the same noise; the
    mean's weights come back afterwards, and at the pretrained mean (0) it is the policy's own evaluation."""
    import dataclasses

    import torch
    from PIL import Image

    from launch.pretrain_policy import evaluate, gold_by_code_mean
    from policies.shapeedit import TINY, TINY_INSTRUCTIONS, ShapeEditPolicy

    policy = ShapeEditPolicy.build(dataclasses.replace(TINY, decision_code=True), TINY_INSTRUCTIONS, 0)
    prompts = [
        {
            "source": Image.fromarray(render(t.scene, 32)),
            "instruction": t.instruction,
            "scene": t.scene,
            "edits": t.edits,
        }
        for t in tasks(3)
    ]
    gold = gold_by_code_mean(policy, prompts, num_steps=2, samples=2, means=(-1.0, 0.0, 3.0))
    assert list(gold) == ["-1", "+0", "+3"]
    assert gold["+0"] == round(evaluate(policy, prompts, 2, samples=2)["overall"], 4)
    layer = policy.transformer.code_mean
    with torch.no_grad():
        layer.weight.normal_()
    before = layer.weight.clone(), layer.bias.clone()
    _, pooled = policy.encode_instructions(["a", "b", "c"])
    with policy.code_mean_fixed(-1.5):
        assert torch.allclose(policy._code_means(pooled), torch.full((3,), -1.5), atol=1e-5)
    with policy.code_mean_fixed(3.0):  # beyond the bound: just inside it
        assert torch.allclose(policy._code_means(pooled), torch.full((3,), 2.0), atol=1e-4)
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.bias, before[1])
    with pytest.raises(ValueError, match="decision code"):
        with ShapeEditPolicy.build(TINY, TINY_INSTRUCTIONS, 0).code_mean_fixed(0.0):
            pass


def test_init_from_starts_from_a_saved_policys_weights_and_refuses_another_architecture(tmp_path):
    """Longer pretraining in several runs: init_from loads the saved weights and vocabulary; a saved policy of another
    architecture, or one holding RL adapters, is refused before training."""
    import dataclasses

    import torch

    from launch.pretrain_policy import start_policy
    from policies.adapters import TrainableConfig
    from policies.shapeedit import TINY, TINY_INSTRUCTIONS, ShapeEditPolicy

    saved = ShapeEditPolicy.build(TINY, TINY_INSTRUCTIONS, seed=3)
    saved.save_pretrained(tmp_path / "saved")
    cfg = PolicyPretrainConfig(policy=TINY, init_from=str(tmp_path / "saved"), vocab_instructions=50)
    loaded = start_policy(cfg)
    assert loaded.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    want = saved.transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.transformer.state_dict().items())
    fresh = start_policy(dataclasses.replace(cfg, init_from=""))
    assert not torch.equal(fresh.transformer.proj_out.weight, saved.transformer.proj_out.weight)
    with pytest.raises(ValueError, match="another architecture.*num_layers.*set policy"):
        start_policy(dataclasses.replace(cfg, policy=dataclasses.replace(TINY, num_layers=TINY.num_layers + 1)))
    ShapeEditPolicy.build(TINY, TINY_INSTRUCTIONS, 0, TrainableConfig(lora_rank=2)).save_pretrained(tmp_path / "rl")
    with pytest.raises(ValueError, match="RL adapters"):
        start_policy(dataclasses.replace(cfg, init_from=str(tmp_path / "rl")))


def test_pretraining_evaluates_with_the_code_mean_fixed_where_asked(tmp_path):
    """eval_code_means: each evaluation also scores the policy with every instruction's code mean fixed; the
    pretrained mean is 0, so at 0 it is the plain evaluation."""
    import dataclasses

    from launch.pretrain_policy import pretrain
    from policies.shapeedit import TINY
    from reward.shapeedit import GenerateConfig, generate

    generate(GenerateConfig(out=str(tmp_path / "data"), pairs=80, size=32), progress=False)
    cfg = PolicyPretrainConfig(
        output_dir=str(tmp_path / "policy"),
        data_dir=str(tmp_path / "data"),
        policy=dataclasses.replace(TINY, decision_code=True),
        demonstrator="decisions",
        failure_modes=["not_applied"],
        max_steps=2,
        max_minutes=0,
        num_eval=3,
        eval_samples=2,
        eval_denoising_steps=2,
        eval_code_means=[-2.0, 0.0],
        spread_prompts=0,
        vocab_instructions=200,
        progress=False,
    )
    result = pretrain(cfg)
    for split in ("val", "test_heldout"):
        assert result[f"eval/{split}/overall@+0"] == result[f"eval/{split}/overall"]
        assert 0 <= result[f"eval/{split}/overall@-2"] <= 1
