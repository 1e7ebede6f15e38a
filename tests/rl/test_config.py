"""RL config: presets load, unknown keys and impossible combinations are refused with the key named."""

from pathlib import Path

import pytest

from launch.grpo_edit import main
from reward.config import ConfigError, load_config
from rl.config import RLConfig

PRESETS = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load(preset):
    cfg = load_config(RLConfig, preset)
    assert cfg.algo.prompts_per_step * cfg.algo.group_size % cfg.algo.micro_batch_size == 0


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['algo.lrr'\]; valid keys here: .*'algo.lr'"):
        load_config(RLConfig, None, ["algo.lrr=1"])
    with pytest.raises(ConfigError, match="algo.lr: expected float"):
        load_config(RLConfig, None, ["algo.lr=fast"])
    with pytest.raises(ValueError, match="must be divisible by micro_batch_size"):
        load_config(RLConfig, None, ["algo.micro_batch_size=7"])
    with pytest.raises(ValueError, match="cannot be shared evenly by 3 learners"):
        load_config(RLConfig, None, ["cluster.num_learners=3"])
    with pytest.raises(ValueError, match="whole micro-batches of 16 for each of the 3 rollout workers"):
        load_config(RLConfig, None, ["cluster.num_rollout_workers=3"])
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        load_config(RLConfig, None, ["keep_checkpoints=0"])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        load_config(RLConfig, None, ["algo.group_size=1"])
    with pytest.raises(ValueError, match="zero_stage 3 is not supported"):
        load_config(RLConfig, None, ["cluster.zero_stage=3"])
    with pytest.raises(ValueError, match="ShapeEdit policy is small and does not support it"):
        load_config(RLConfig, None, ["policy.gradient_checkpointing=true"])


def test_cli_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["algo.algo=dpo"])
    assert e.value.code == 2 and "algo.algo must be 'grpo' or 'ppo'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", "/nonexistent.yaml"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
