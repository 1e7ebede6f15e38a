"""launch/grpo_edit.py: what every Ray actor's environment takes from the user's."""

from pathlib import Path

from launch.grpo_edit import runtime_env


def test_hub_access_follows_the_users_environment():
    """HF_HUB_OFFLINE reaches the actors as the user set it, and is not set when the user did not set it (a hub
    id in policy.path then downloads or uses the cache, as it would in the user's shell)."""
    assert "HF_HUB_OFFLINE" not in runtime_env({})["env_vars"]
    assert runtime_env({"HF_HUB_OFFLINE": "1"})["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env({"HF_HUB_OFFLINE": "0"})["env_vars"]["HF_HUB_OFFLINE"] == "0"


def test_runtime_env_forwards_no_secrets():
    env = runtime_env({"HF_TOKEN": "hf_x", "HF_HOME": "/cache", "WANDB_API_KEY": "x", "WANDB_MODE": "online"})["env_vars"]
    assert sorted(env) == ["PYTHONPATH", "WANDB_MODE"] and env["WANDB_MODE"] == "online"
    assert runtime_env({})["env_vars"]["WANDB_MODE"] == "offline"
    assert (Path(env["PYTHONPATH"]) / "rl" / "loop.py").is_file()  # the actors import this repository's packages
