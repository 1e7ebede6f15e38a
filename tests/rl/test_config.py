"""RL config: presets load, unknown keys and impossible combinations are refused with the key named."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from launch.grpo_edit import main
from policies.adapters import TrainableConfig
from policies.registry import QwenImageEditOptions
from reward.config import ConfigError, load_config
from reward.pretrain_backbone import PretrainConfig
from reward.shapeedit import GenerateConfig
from reward.train_generative import DecodeConfig
from rl.config import AlgoConfig, RewardConfig, RewardTerm, RLConfig

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
REWARD_PRESETS = sorted((ROOT / "reward" / "configs").glob("*.yaml"))
DEMO_JRM = "runs/demo/jrm/final"  # trained by `make demo` (launch/demo.py --out runs/demo)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load(preset):
    cfg = load_config(RLConfig, preset)
    assert cfg.algo.prompts_per_step * cfg.algo.group_size % cfg.algo.micro_batch_size == 0


@pytest.mark.parametrize("preset", [*PRESETS, None], ids=lambda p: p.stem if p else "defaults")
def test_jrm_paths_are_where_reward_training_writes(preset):
    """A `jrm:runs/...` reward term reads the final model of a reward/configs preset (<output_dir>/final) or
    the demo's, not a folder nothing writes."""
    written = {f"{yaml.safe_load(p.read_text())['output_dir']}/final" for p in REWARD_PRESETS} | {DEMO_JRM}
    specs = [term.spec for term in load_config(RLConfig, preset).reward.terms]
    paths = [spec.removeprefix("jrm:") for spec in specs if spec.startswith("jrm:runs/")]
    assert paths, f"no jrm:runs/... reward term in {specs}"
    for path in paths:
        assert path in written, f"jrm:{path} is written by nothing; reward training writes {sorted(written)}"


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['algo.lrr'\]; valid keys here: .*'algo.lr'"):
        load_config(RLConfig, None, ["algo.lrr=1"])
    with pytest.raises(ConfigError, match="algo.lr: expected float"):
        load_config(RLConfig, None, ["algo.lr=fast"])
    with pytest.raises(ValueError, match="must be divisible by micro_batch_size"):
        load_config(RLConfig, None, ["algo.micro_batch_size=7"])
    with pytest.raises(ValueError, match="cannot be shared evenly by 3 learners"):
        load_config(RLConfig, None, ["cluster.num_learners=3"])
    with pytest.raises(ValueError, match="flux_kontext ends in a Gaussian step"):
        load_config(RLConfig, None, ["policy.kind=flux_kontext", "policy.sampler.sample_last_step=true"])
    with pytest.raises(ValueError, match="whole micro-batches of 16 for each of the 3 rollout workers"):
        load_config(RLConfig, None, ["cluster.num_rollout_workers=3"])
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        load_config(RLConfig, None, ["keep_checkpoints=0"])
    with pytest.raises(ValueError, match="decision_lr must be > 0"):
        load_config(RLConfig, None, ["algo.decision_lr=0"])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        load_config(RLConfig, None, ["algo.group_size=1"])
    with pytest.raises(ValueError, match="zero_stage must be 2 or 3"):
        load_config(RLConfig, None, ["cluster.zero_stage=1"])
    with pytest.raises(ValueError, match="4 rollout workers \\(2 node"):
        load_config(
            RLConfig,
            None,
            [
                "cluster.num_nodes=2",
                "cluster.num_rollout_workers=2",
                "algo.prompts_per_step=2",
                "algo.group_size=4",
                "algo.micro_batch_size=4",
            ],
        )
    with pytest.raises(ValueError, match="reward_gpu 8 is not a GPU"):
        load_config(RLConfig, None, ["cluster.gpus_per_node=8", "cluster.reward_gpu=8"])
    with pytest.raises(ValueError, match="the shapeedit policy does not support it"):
        load_config(RLConfig, None, ["policy.trainable.gradient_checkpointing=true"])


def test_configs_built_in_code_are_checked_too():
    """Checks live in __post_init__: a config made directly or with dataclasses.replace is refused like one
    loaded from YAML."""
    with pytest.raises(ValueError, match="cannot be shared evenly by 3 learners"):
        dataclasses.replace(RLConfig(), cluster=dataclasses.replace(RLConfig().cluster, num_learners=3))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        AlgoConfig(group_size=1)
    with pytest.raises(ValueError, match="distinct names"):
        RewardConfig(terms=[RewardTerm("a"), RewardTerm("a")])
    with pytest.raises(ValueError, match="micro_batch_size >= 1"):
        RewardTerm(micro_batch_size=0)
    with pytest.raises(ValueError, match="lora_targets must be a regex string"):
        TrainableConfig(lora_targets=["to_q"])
    with pytest.raises(ValueError, match="is not a regex"):
        TrainableConfig(lora_targets="(to_q")
    with pytest.raises(ValueError, match="pairs must be at least 1"):
        GenerateConfig(out="unused", pairs=0)
    with pytest.raises(ValueError, match="decode.batch_size"):
        DecodeConfig(batch_size=0)
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        PretrainConfig(tasks=["juggle"])


def test_cli_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["algo.name=dpo"])
    assert e.value.code == 2 and "algo.name must be 'grpo', 'ppo' or 'nft'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", "/nonexistent.yaml"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_renamed_keys_name_the_new_key():
    for old, new in [
        ("algo.algo=ppo", "algo.algo is now algo.name"),
        ("num_steps=3", "num_steps is now num_rl_steps"),
        ("policy.lora_rank=4", "policy.lora_rank is now policy.trainable.lora_rank"),
        ("policy.gradient_checkpointing=true", "policy.gradient_checkpointing is now policy.trainable.gradient"),
        ("policy.eval_steps=3", "policy.eval_steps is now policy.eval_denoising_steps"),
    ]:
        with pytest.raises(ConfigError, match=new):
            load_config(RLConfig, None, [old])


def test_each_policy_kind_takes_its_own_options_from_the_registry():
    plus = load_config(RLConfig, None, ["policy.kind=qwen_image_edit", "policy.options={plus: true}"])
    assert plus.policy.kind_options() == QwenImageEditOptions(plus=True)
    assert load_config(RLConfig, None, ["policy.kind=qwen_image_edit"]).policy.kind_options().plus is False
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['policy.options.plus'\].*max_sequence_length"):
        load_config(RLConfig, None, ["policy.kind=flux_kontext", "policy.options={plus: true}"])
    with pytest.raises(ValueError, match="policy.kind must be one of"):
        load_config(RLConfig, None, ["policy.kind=sdxl"])
