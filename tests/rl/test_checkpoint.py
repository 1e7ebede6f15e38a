"""rl/checkpoint.py: atomic writes, newest complete checkpoint found, pruning, half-written ones ignored."""

import pytest
import torch

from rl import checkpoint


def _write(run, step, keep=2, state=None, value=None):
    """What a save does: the learners write into the staging folder, the driver commits it."""
    staging = checkpoint.staging_dir(run, step)
    (staging / "deepspeed").mkdir()
    checkpoint.write_weights(staging, {"w": torch.full((3,), float(step if value is None else value))})
    return checkpoint.commit(staging, state or {"step": step}, keep)


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    assert checkpoint.find_resume(tmp_path, "auto") is None
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    half = checkpoint.staging_dir(tmp_path, 3)  # a run killed while writing step 3
    (half / "policy.safetensors").write_bytes(b"partial")
    found = checkpoint.find_resume(tmp_path, "auto")
    assert found.name == "step-000002"
    state, weights = checkpoint.load(found)
    assert state == {"step": 2} and weights["w"].tolist() == [2, 2, 2]
    _write(tmp_path, 10)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-000002",
        "step-000010",
    ]  # keep 2, numeric order
    assert checkpoint.find_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.find_resume(tmp_path, str(half))
    _write(tmp_path, 11)  # the staging folder of step 3 is gone once rewritten; stale ones never count
    assert checkpoint.find_resume(tmp_path, "auto").name == "step-000011"
    again = _write(tmp_path, 11, state={"step": 11, "again": True}, value=0)  # re-saving a step replaces it whole
    assert checkpoint.load(again)[0] == {"step": 11, "again": True}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".tmp-step-000003",
        "step-000010",
        "step-000011",
    ]


def test_a_checkpoint_without_its_weights_is_never_committed(tmp_path):
    staging = checkpoint.staging_dir(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="did not write the checkpoint's weights"):
        checkpoint.commit(staging, {"step": 1}, 2)
    assert checkpoint.find_resume(tmp_path, "auto") is None


def test_a_checkpoint_whose_decision_mean_was_trained_otherwise_is_refused(tmp_path):
    """resume with policy.trainable.decision_mean other than the checkpoint's: refused before any actor starts,
    naming the setting; a policy without a decision code is not concerned."""
    from safetensors.torch import save_file

    bias, weight = {"code_mean.bias": torch.zeros(1)}, {"code_mean.weight": torch.zeros(1, 4)}
    for name, tensors in {
        "shared": bias,
        "instruction": {**bias, **weight},
        "plain": {"lora.A": torch.zeros(2)},
    }.items():
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "policy.safetensors"))
    checkpoint.check_decision_weights(tmp_path / "shared", "shared")
    checkpoint.check_decision_weights(tmp_path / "instruction", "instruction")
    checkpoint.check_decision_weights(tmp_path / "plain", "shared")
    with pytest.raises(ValueError, match="decision_mean=instruction, this config says shared"):
        checkpoint.check_decision_weights(tmp_path / "instruction", "shared")
    with pytest.raises(ValueError, match="decision_mean=shared, this config says instruction"):
        checkpoint.check_decision_weights(tmp_path / "shared", "instruction")
