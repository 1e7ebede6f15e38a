"""launch/gpu_check.py: the --tiny run on CPU end to end (the GPU run's code path), and its real sizes on `meta`.

The tiny runs are subprocesses: the learner's DeepSpeed state (process group, cached groups, environment
variables) must not meet another in-process learner's (launch/bench_rl_step.py's test destroys its group,
after which DeepSpeed's cached groups refuse a new engine in that process).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from launch import gpu_check
from launch.benchmarking import random_images
from launch.gpu_check import ROWS, build_jrm, jrm_flops, main, num_params
from launch.presets import REAL, TINY, kontext_components

ROOT = Path(__file__).resolve().parents[2]


def run_tiny(out: Path, *extra: str) -> dict:
    """`python launch/gpu_check.py --tiny ...` on one thread; its JSON report."""
    command = [
        sys.executable,
        str(ROOT / "launch" / "gpu_check.py"),
        "--tiny",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check (tiny sizes, float32, cpu" in done.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One --tiny run with a made-up peak of 1 TFLOP/s, so that MFU is computed: the report's results."""
    report = run_tiny(tmp_path_factory.mktemp("gpu_check") / "gpu_check.json", "--peak-tflops", "1")
    assert report["benchmark"] == "gpu_check" and report["settings"]["preset"] == "tiny"
    return report["results"]


def test_tiny_run_reports_every_row_with_positive_figures(tiny_run):
    rows = {row["check"]: row for row in tiny_run["rows"]}
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        assert "FAILED" not in row["detail"], row
        for key in ("value", "seconds", "peak_gib"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])


def test_tiny_jrm_figures_are_consistent(tiny_run):
    jrm = tiny_run["jrm"]
    assert jrm["batch"] == TINY.batch
    assert 0 < jrm["mfu"] < 1 and 0 < jrm["mfu_vision"] and 0 < jrm["mfu_language"]
    # 64x64 images in 8-pixel patches merged 2x2: 16 tokens each; the sequence holds both images and the text
    assert jrm["image_tokens"] == [16, 16] and jrm["tokens_per_sequence"] > 32


def test_tiny_generative_writes_exactly_the_critique_tokens(tiny_run):
    generative = tiny_run["generative"]
    assert generative["generated_tokens"] == TINY.generative_batch * TINY.critique_tokens


def test_tiny_learner_step_trains_the_lora_weights(tiny_run):
    rollout, learner = tiny_run["kontext_rollout"], tiny_run["kontext_learner"]
    assert rollout["finite_log_probs"] and rollout["steps"] == TINY.steps and rollout["trained_steps"] == TINY.steps - 1
    assert learner["backward_passes_per_step"] == rollout["trained_steps"]
    assert math.isfinite(learner["loss"]) and learner["nonfinite_losses"] == 0
    assert learner["grad_norm"] > 0 and learner["max_weight_change"] > 0


def test_a_failing_row_leaves_the_others_then_fails(tmp_path, monkeypatch):
    """Out of memory in the learner step: the rollout's figures are still written, the run raises, the row says what to
    try."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check, "check_learner", out_of_memory)
    out = tmp_path / "failed.json"
    with pytest.raises(RuntimeError, match="kontext_learner: OutOfMemoryError"):
        main(["--tiny", "--only", "kontext_rollout,kontext_learner", "--out", str(out)])
    rollout, learner = json.loads(out.read_text())["results"]["rows"]
    assert rollout["check"] == "kontext_rollout" and rollout["value"] > 0
    assert learner["detail"].startswith("FAILED OutOfMemoryError") and "--gradient-checkpointing" in learner["detail"]


@pytest.mark.parametrize("argv", [[], ["--device", "cpu"]])
def test_real_sizes_on_a_cpu_are_refused(argv, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "--tiny" in capsys.readouterr().err


def test_no_mfu_on_a_cpu_without_a_peak():
    assert gpu_check.peak_flops("cpu", None) == (None, "no MFU on CPU")
    assert gpu_check.peak_flops("cpu", 2.0)[0] == 2e12


@pytest.fixture(scope="module")
def real_jrm():
    """The real-size JRM on `meta`: shapes and dtypes, no memory."""
    return build_jrm(REAL, "meta", "sdpa")


def test_real_sizes_are_the_published_models(real_jrm):
    """Qwen2.5-VL-7B (8.29B parameters) and FLUX.1 Kontext (11.9B transformer, T5-XXL encoder, CLIP-L, VAE) built on
    `meta` in bf16: the preset's numbers, no memory used. 512x512 images become 36x36 patches, 324 tokens each."""
    jrm = real_jrm
    assert num_params(jrm.backbone) == pytest.approx(8.29e9, rel=2e-3)
    assert {p.dtype for p in jrm.backbone.parameters()} == {torch.bfloat16}
    images = random_images(2, REAL.image_size, 0)
    batch = jrm.encode(images[:1], ["make the sky purple"], images[1:])
    assert batch["image_grid_thw"].tolist() == [[1, 36, 36], [1, 36, 36]]
    assert (batch["input_ids"] == jrm.backbone.config.image_token_id).sum() == 2 * 324

    components = kontext_components(REAL, "meta")
    expected = {"transformer": 11.90e9, "text_encoder_2": 4.76e9, "text_encoder": 0.123e9, "vae": 0.0838e9}
    for name, count in expected.items():
        assert num_params(components[name]) == pytest.approx(count, rel=2e-3), name
        assert {p.dtype for p in components[name].parameters()} == {torch.bfloat16}, name


def test_flop_count_of_a_real_sized_pair(real_jrm):
    """Matrix multiplies dominate: the forward FLOPs are 2 x parameters x tokens plus a few percent of attention; the
    windowed-attention term uses the window lengths transformers cuts (get_vision_window_index)."""
    jrm = real_jrm
    grid = torch.tensor([[1, 36, 36], [1, 36, 36]])
    tokens = 722
    vision, language = jrm_flops(jrm.backbone, torch.ones(1, tokens, dtype=torch.long), grid)
    layers = num_params(jrm.backbone.model.language_model.layers)
    assert 1.0 < language / (2 * layers * tokens) < 1.05
    visual = jrm.backbone.model.visual
    assert 1.0 < vision / (2 * num_params(visual.blocks) * 2 * 36 * 36) < 1.1
    _, cu = get_vision_window_index(grid[:1], spatial_merge_size=2, window_size=112, patch_size=14)
    lengths = torch.as_tensor(cu).diff().long()
    chunks = gpu_check._chunks(18, 4)
    assert (lengths**2).sum() == 16 * sum(c * c for c in chunks) ** 2


def test_the_plan_of_the_real_kontext_rows_is_set_beside_their_peaks():
    """At real size the check writes launch/plan.py's figures next to the measured peaks (planned_gib): the rollout
    row's components and one image's sampling, and the learner row's on top of them (the same process)."""
    cfg = gpu_check.learner_config(REAL, "cpu", REAL.steps)
    plans = gpu_check.planned_peaks(cfg, gradient_checkpointing=True)
    assert 31 < plans["kontext_rollout"] < plans["kontext_learner"] < 60  # 31.8 GiB of bf16 weights, then activations
    assert gpu_check.planned_peaks(cfg, gradient_checkpointing=False)["kontext_learner"] > plans["kontext_learner"] + 20
