"""launch/grpo_edit.py: what every Ray actor's environment takes from the user's, and the preflight plan of GPU runs."""

import json
from pathlib import Path

import pytest
import ray

from launch.grpo_edit import main, runtime_env
from reward.config import load_config
from rl.config import RLConfig


def test_hub_access_follows_the_users_environment():
    """HF_HUB_OFFLINE reaches the actors as the user set it, and is not set when the user did not set it (a hub
    id in policy.path then downloads or uses the cache, as it would in the user's shell)."""
    assert "HF_HUB_OFFLINE" not in runtime_env({})["env_vars"]
    assert runtime_env({"HF_HUB_OFFLINE": "1"})["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env({"HF_HUB_OFFLINE": "0"})["env_vars"]["HF_HUB_OFFLINE"] == "0"


def test_runtime_env_forwards_no_secrets():
    env = runtime_env({"HF_TOKEN": "hf_x", "HF_HOME": "/cache", "WANDB_API_KEY": "x", "WANDB_MODE": "online"})[
        "env_vars"
    ]
    assert sorted(env) == ["PYTHONPATH", "WANDB_MODE"] and env["WANDB_MODE"] == "online"
    assert runtime_env({})["env_vars"]["WANDB_MODE"] == "offline"
    assert (Path(env["PYTHONPATH"]) / "rl" / "loop.py").is_file()  # the actors import this repository's packages


# ---- the preflight plan (launch/plan.py) -----------------------------------------------------------------------------

PRESETS = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", [p for p in PRESETS if "gpus_per_node: 8" in p.read_text()], ids=lambda p: p.stem)
def test_every_shipped_gpu_preset_passes_its_plan(preset, capsys):
    assert main(["--config", str(preset), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "fits: the busiest GPU" in out and "GPU 7:" in out


def test_a_config_that_does_not_fit_is_refused_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for a config that does not fit"))
    kontext = [p for p in PRESETS if p.stem == "flux_kontext_jrm"][0]
    # every learner on the rollout workers' GPUs, with 4-image micro-batches: GPU 0 holds too much
    assert main(["--config", str(kontext), "algo.micro_batch_size=4", "algo.prompts_per_step=28"]) == 2
    err = capsys.readouterr().err
    assert (
        "DOES NOT FIT: GPU 0 (rollout 0, learner 0)" in err
        and "algo.micro_batch_size" in err
        and "nothing was started" in err
    )
    # without gradient checkpointing the learner's activations alone exceed a GPU: the plan names the switch
    assert main(["--config", str(kontext), "--plan", "policy.trainable.gradient_checkpointing=false"]) == 2
    assert "policy.trainable.gradient_checkpointing=true" in capsys.readouterr().err


def test_the_plan_follows_the_layout_and_zero_stage():
    from launch.plan import make_plan

    kontext = [p for p in PRESETS if p.stem == "flux_kontext_jrm"][0]
    cfg = load_config(RLConfig, kontext, [])
    plan = make_plan(cfg)
    assert [g["actors"] for g in plan["gpus"]][6:] == [["rollout 6", "learner 6"], ["learner 7", "reward 0"]]
    roles = plan["roles"]
    assert roles["rollout"]["weights"] > roles["learner"]["weights"] + 8  # the learner drops T5, CLIP and the VAE
    full = make_plan(load_config(RLConfig, kontext, ["policy.trainable.lora_rank=0", "cluster.zero_stage=2"]))
    sharded = make_plan(load_config(RLConfig, kontext, ["policy.trainable.lora_rank=0", "cluster.zero_stage=3"]))
    assert not full["fits"]  # a full fine-tune of 12B with AdamW on every rank: far over
    assert (
        sharded["roles"]["learner"]["weights"] < full["roles"]["learner"]["weights"] / 1.7
    )  # the trained copy sharded, the reference not
    assert sharded["roles"]["learner"]["trainable"] < full["roles"]["learner"]["trainable"] / 2
    assert main(["--config", str(kontext.with_name("shapeedit.yaml")), "--plan"]) == 0  # a CPU run: nothing to plan


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("lora_rank", [32, 0], ids=["lora", "full"])
def test_the_plan_holds_what_the_learner_partitions(lora_rank, stage):
    """The learner's weights in the plan are the denoiser as the learner holds it: its trained modules under
    ZeRO-3 partitioned over the ranks (rl/learner.py zero3_modules, applied here to the real-size denoiser on
    the meta device with the run's adapters), everything else whole, plus a full fine-tune's reference copy."""
    from launch.plan import DTYPE_BYTES, GIB, _flux, make_plan
    from policies.adapters import Trainable, TrainableConfig
    from policies.kontext import LORA_TARGETS
    from rl.learner import zero3_modules

    kontext = [p for p in PRESETS if p.stem == "flux_kontext_jrm"][0]
    cfg = load_config(RLConfig, kontext, [f"policy.trainable.lora_rank={lora_rank}", f"cluster.zero_stage={stage}"])
    net = _flux(cfg).denoiser
    trainable = Trainable(
        net, TrainableConfig(lora_rank=lora_rank, lora_targets=cfg.policy.trainable.lora_targets), LORA_TARGETS
    )
    partitioned = {id(p) for m in zero3_modules(net) for p in m.parameters(recurse=False)} if stage == 3 else set()
    world = cfg.cluster.learners
    held = sum(
        p.numel() / (world if id(p) in partitioned else 1) for n, p in net.named_parameters() if "lora_" not in n
    )
    held += sum(p.numel() for p in trainable.frozen.parameters()) if trainable.frozen is not None else 0
    planned = make_plan(cfg)["roles"]["learner"]["weights"]
    assert planned == pytest.approx(held * DTYPE_BYTES[cfg.policy.dtype] / GIB, abs=0.01)


def test_the_plan_table_in_the_docs_is_the_committed_json():
    from launch.plan import markdown

    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / "docs" / "bench" / "plans.json").read_text())["results"]
    assert markdown(report) in (root / "docs" / "performance.md").read_text(), (
        "docs/performance.md's plan table differs: rerun python launch/plan.py and paste its table"
    )
    assert set(report["presets"]) == {p.stem for p in PRESETS if "gpus_per_node: 8" in p.read_text()}
    assert all(plan["fits"] for plan in report["presets"].values())
