"""Real sizes on one GPU with random weights (nothing downloaded): does the code run, how fast, in how much memory.

    python launch/gpu_check.py [--out runs/bench/gpu_check.json] [--peak-tflops F] [--steps 8] [--batch 32]
                               [--only jrm,generative,kontext_rollout,kontext_learner] [--no-gradient-checkpointing]
    python launch/gpu_check.py --tiny                  # the same code path at tiny sizes, CPU, seconds (tested)
    python launch/gpu_check.py --tiny --device cuda    # a seconds-long smoke test of the device code first

Under 8 minutes on one H100/H200, bf16 weights (LoRA weights and SDE math float32). Rows of the table:
- jrm: the JRM on a Qwen2.5-VL-7B-sized backbone scores `--batch` pairs of 512x512 source and edit: pairs/s of
  JRM.score (CPU preprocessing included); MFU of its forward alone (target 40%+), and of vision tower and LM apart.
- generative: the generative judge on the same weights, critiques of exactly `--critique-tokens`: tokens/s, pairs/s.
- kontext_rollout: FLUX.1 Kontext at full size (12B transformer with the RL preset's LoRA, T5-XXL, CLIP-L, the
  16-channel VAE) edits one 512x512 image in `--steps` steps: seconds per image.
- kontext_learner: rl/learner.py's DeepSpeed ZeRO-2 learner (one rank) takes one optimizer step on that rollout
  with launch/configs/flux_kontext_jrm.yaml's algorithm (SDE window, KL term): seconds per step.
peak_gib: the most GPU memory allocated during the row, weights included; planned_gib: what launch/plan.py (the
`--plan` preflight, meta device) plans for the same work, so the first GPU run checks the plan. A row that fails (out of
memory, say) is printed as FAILED, the others are still measured and written, and the command then exits with an error.

MFU = FLOPs / (seconds x peak FLOP/s), forward FLOPs of a batch (P = parameters of the named modules):
    vision   = 2 (P_blocks + P_patch_embed) patches + 2 P_merger patches / 4
               + 4 d_vision (sum over full-attention layers of n_image^2 + over window layers of sum n_window^2)
    language = 2 P_decoder_layers tokens + 2 layers d_model sum_seq L^2     (causal: half of QK^T and AV)
Embedding lookups, elementwise work and the reward head are left out. Peak: the card's dense bf16 spec (H100/H200
SXM 989, H100 PCIe 756, A100 312 TFLOP/s) or --peak-tflops; no MFU on CPU. With sdpa, transformers runs the vision
tower's window attention as one kernel call per window; flash_attention_2 (--attn, if flash-attn is installed)
runs them as one. Tokenizers are the offline tiny ones (their ids are valid in the real vocabularies), so text
token counts differ a little from the real tokenizers'. Figures and their analysis: docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/gpu_check.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from launch.benchmarking import PeakMemory, command_line, random_images, seconds, sync, table, write_report  # noqa: E402
from launch.presets import REAL, TINY, Preset, building_on, kontext_components  # noqa: E402
from policies.adapters import TrainableConfig  # noqa: E402
from policies.kontext import FluxKontextPolicy  # noqa: E402
from policies.rollout import Rollout  # noqa: E402
from reward.backbone import ImageOnlyProcessor, build_tiny_tokenizer  # noqa: E402
from reward.config import HelpFormatter, load_config  # noqa: E402
from reward.generative import GenerativeJudge  # noqa: E402
from reward.model import DTYPES, JRM, JRMArgs  # noqa: E402
from rl.actors import free_port  # noqa: E402
from rl.algorithms import (
    MicroTargets,  # noqa: E402
    build_algorithm,  # noqa: E402
)
from rl.config import RLConfig  # noqa: E402
from rl.learner import Learner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KONTEXT_PRESET = ROOT / "launch" / "configs" / "flux_kontext_jrm.yaml"
ROWS = ("jrm", "generative", "kontext_rollout", "kontext_learner")
COLUMNS = ["check", "value", "unit", "mfu", "seconds", "peak_gib", "planned_gib", "detail"]
# Dense bf16 TFLOP/s from the spec sheets, matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
INSTRUCTION = "make the sky purple and add a small red boat"


def free_memory(device: str) -> None:
    """Give back what the finished row held, so the next row's peak memory is its own."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the names of JRMArgs.dtype and policy.dtype)."""
    return str(dtype).removeprefix("torch.")


def num_params(module: nn.Module) -> int:
    """Parameters of `module`, all of them (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def peak_flops(device: str, given_tflops: float | None) -> tuple[float | None, str]:
    """Peak dense bf16 FLOP/s of the device (None where unknown) and where the figure comes from."""
    if given_tflops is not None:
        return given_tflops * 1e12, f"--peak-tflops {given_tflops}"
    if torch.device(device).type != "cuda":
        return None, "no MFU on CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops} TFLOP/s (spec sheet, dense bf16)"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def mfu(flops: float, secs: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak; None without a peak."""
    return None if peak is None else flops / secs / peak


# ---------------------------------------------------------------------- the JRM and the generative judge


def build_jrm(preset: Preset, device: str | torch.device, attn: str) -> JRM:
    """A JRM on a random-weight Qwen2.5-VL backbone of the preset's size, built on `device` in the preset's dtype.

    Special-token ids come from the offline tiny tokenizer (all below the vocabulary size)."""
    tokenizer = build_tiny_tokenizer()
    if preset.text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {preset.text['vocab_size']} is below the tokenizer's {len(tokenizer)} tokens")
    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{token}|>")
        for name, token in (
            ("image_token_id", "image_pad"),
            ("video_token_id", "video_pad"),
            ("vision_start_token_id", "vision_start"),
            ("vision_end_token_id", "vision_end"),
        )
    }
    text = dict(
        preset.text,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=preset.vision, tie_word_embeddings=False, **ids)
    with building_on(device, preset.dtype):
        torch.manual_seed(0)
        backbone = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=preset.dtype, attn_implementation=attn)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=preset.vision["patch_size"],
        merge_size=preset.vision["spatial_merge_size"],
        temporal_patch_size=preset.vision["temporal_patch_size"],
        min_pixels=preset.min_pixels,
        max_pixels=preset.max_pixels,
    )
    processor = ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    jrm = JRM.from_backbone(
        JRMArgs(family="qwen2_5_vl", dtype=dtype_name(preset.dtype), attn_implementation=attn), backbone, processor
    )
    return jrm.to(device).eval()  # the backbone is there already; this moves the float32 reward head


def jrm_flops(
    backbone: Qwen2_5_VLForConditionalGeneration, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor
) -> tuple[float, float]:
    """(vision, language) FLOPs of one JRM forward over a batch (formula: module docstring).

    Args:
        attention_mask: (N, L) of the batch; padding is not counted.
        image_grid_thw: (images, 3) patch grid (frames, height, width) of every image.
    """
    visual, language = backbone.model.visual, backbone.model.language_model
    vision_cfg, text_cfg = backbone.config.vision_config, backbone.config.text_config
    merge = vision_cfg.spatial_merge_size
    side = vision_cfg.window_size // merge // vision_cfg.patch_size  # merged tokens along a window's side
    full_layers = len(vision_cfg.fullatt_block_indexes)
    window_layers = vision_cfg.depth - full_layers
    per_patch = (
        2 * (num_params(visual.blocks) + num_params(visual.patch_embed)) + 2 * num_params(visual.merger) / merge**2
    )
    vision = 0.0
    for frames, h, w in image_grid_thw.tolist():
        patches = frames * h * w
        rows, cols = _chunks(h // merge, side), _chunks(w // merge, side)
        windowed = frames * merge**4 * sum(r * r for r in rows) * sum(c * c for c in cols)  # sum of window lengths^2
        attention = 4 * vision_cfg.hidden_size * (full_layers * frames * (h * w) ** 2 + window_layers * windowed)
        vision += per_patch * patches + attention
    lengths = attention_mask.sum(1).double()
    language = 2 * num_params(language.layers) * lengths.sum().item()
    language += 2 * text_cfg.num_hidden_layers * text_cfg.hidden_size * (lengths**2).sum().item()
    return vision, language


def _chunks(length: int, size: int) -> list[int]:
    """Lengths of the windows along one axis (the last one shorter), as Qwen2.5-VL's get_window_index cuts them."""
    return [size] * (length // size) + ([length % size] if length % size else [])


def check_jrm(jrm: JRM, preset: Preset, device: str, batch: int, peak: float | None) -> dict:
    """pairs/s of JRM.score end to end; seconds and MFU of its forward, its vision tower and its language model."""
    sources, edits = random_images(batch, preset.image_size, 0), random_images(batch, preset.image_size, 1)
    instructions = [INSTRUCTION] * batch  # one length: no padding
    backbone = jrm.backbone
    with PeakMemory(device) as memory:
        score_s = seconds(lambda: jrm.score(sources, instructions, edits, batch_size=batch), device, preset.repeats)
        inputs = {k: v.to(device) for k, v in jrm.encode(sources, instructions, edits).items()}
        with torch.inference_mode():
            forward_s = seconds(lambda: jrm(**inputs), device, preset.repeats)
            pixels = inputs["pixel_values"].to(backbone.model.visual.dtype)
            vision_s = seconds(
                lambda: backbone.model.visual(pixels, grid_thw=inputs["image_grid_thw"]), device, preset.repeats
            )
    vision_flops, language_flops = jrm_flops(backbone, inputs["attention_mask"], inputs["image_grid_thw"])
    tokens = inputs["attention_mask"].sum(1).float().mean().item()
    image_tokens = (inputs["image_grid_thw"].prod(-1) // backbone.config.vision_config.spatial_merge_size**2).tolist()
    language_s = forward_s - vision_s  # timed apart: noise can make it <= 0 at tiny sizes, then no MFU
    return {
        "pairs_per_s": batch / score_s,
        "score_s": score_s,
        "forward_s": forward_s,
        "forward_pairs_per_s": batch / forward_s,
        "vision_s": vision_s,
        "language_s": language_s,
        "flops_per_pair": (vision_flops + language_flops) / batch,
        "mfu": mfu(vision_flops + language_flops, forward_s, peak),
        "mfu_score": mfu(vision_flops + language_flops, score_s, peak),
        "mfu_vision": mfu(vision_flops, vision_s, peak),
        "mfu_language": mfu(language_flops, language_s, peak) if language_s > 0 else None,
        "tokens_per_sequence": tokens,
        "image_tokens": image_tokens[:2],
        "batch": batch,
        "peak_gib": memory.peak_gib,
    }


def check_generative(jrm: JRM, preset: Preset, device: str, batch: int, critique_tokens: int) -> dict:
    """tokens/s and pairs/s of the generative judge writing critiques of exactly `critique_tokens` tokens."""
    sources, edits = random_images(batch, preset.image_size, 2), random_images(batch, preset.image_size, 3)
    instructions = [INSTRUCTION] * batch
    GenerativeJudge(jrm, max_new_tokens=2, min_new_tokens=2).score(
        sources, instructions, edits, batch_size=batch
    )  # warm-up
    judge = GenerativeJudge(jrm, max_new_tokens=critique_tokens, min_new_tokens=critique_tokens)
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        judge.score(sources, instructions, edits, batch_size=batch)
        sync(device)
        elapsed = time.perf_counter() - start
    if judge.generated_tokens != batch * critique_tokens:
        raise RuntimeError(f"the judge wrote {judge.generated_tokens} tokens, expected {batch} x {critique_tokens}")
    return {
        "tokens_per_s": judge.generated_tokens / elapsed,
        "pairs_per_s": batch / elapsed,
        "generated_tokens": judge.generated_tokens,
        "seconds": elapsed,
        "batch": batch,
        "critique_tokens": critique_tokens,
        "peak_gib": memory.peak_gib,
    }


# ---------------------------------------------------------------------- FLUX.1 Kontext: rollout and learner step


def learner_config(preset: Preset, device: str, steps: int) -> RLConfig:
    """The FLUX.1 Kontext RL preset's algorithm (LoRA, SDE window, KL), shaped for one rollout of one image on one
    rank."""
    return load_config(
        RLConfig,
        KONTEXT_PRESET,
        [
            f"cluster.device={device}",
            "cluster.num_rollout_workers=1",
            "cluster.num_learners=1",
            "cluster.gpus_per_node=1",
            "cluster.reward_gpu=0",
            f"policy.dtype={dtype_name(preset.dtype)}",
            f"policy.height={preset.edit_size}",
            f"policy.width={preset.edit_size}",
            f"policy.sampler.num_steps={steps}",
            # the preset's window of 3, fewer if the steps are fewer
            f"policy.sampler.sde_window_size={min(3, steps - 1)}",
            # 1 prompt x 2 edits in micro-batches of 1 and 2 updates: each optimizer step is one 1-image micro-batch
            "algo.prompts_per_step=1",
            "algo.group_size=2",
            "algo.micro_batch_size=1",
            "algo.updates_per_step=2",
            "wandb=false",
        ],
    )


def build_kontext(preset: Preset, device: str | torch.device, trainable: TrainableConfig) -> FluxKontextPolicy:
    """The FLUX.1 Kontext policy on kontext_components(preset, device), with fresh LoRA adapters."""
    return FluxKontextPolicy(
        kontext_components(preset, device),
        trainable,
        preset.edit_size,
        preset.edit_size,
        preset.max_sequence_length,
        seed=0,
    )


def check_rollout(policy: FluxKontextPolicy, cfg: RLConfig, device: str) -> tuple[dict, Rollout]:
    """Seconds to edit one image (text encoders, VAE and every denoising step), after a 2-step warm-up rollout."""
    source = random_images(1, policy.height, 4)
    sampler = cfg.policy.sampler
    warm_up = replace(sampler, num_steps=2, sde_window_size=1, sde_window_max_start=-1)
    policy.sample(source, [INSTRUCTION], warm_up, torch.Generator(device).manual_seed(1))
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        rollout = policy.sample(source, [INSTRUCTION], sampler, torch.Generator(device).manual_seed(0))
        sync(device)
        elapsed = time.perf_counter() - start
    condition = rollout.condition
    return {
        "seconds_per_image": elapsed,
        "steps": sampler.num_steps,
        "trained_steps": int(rollout.stochastic.sum()),
        "finite_log_probs": bool(torch.isfinite(rollout.log_probs).all()),
        "tokens_per_forward": rollout.latents.shape[2]
        + condition.image_latents.shape[1]
        + condition.prompt_embeds.shape[1],
        "transformer_params": num_params(policy.pipe.transformer),
        "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
        "peak_gib": memory.peak_gib,
    }, rollout


def check_learner(policy: FluxKontextPolicy, cfg: RLConfig, rollout: Rollout, device: str) -> dict:
    """Seconds of one optimizer step of the DeepSpeed ZeRO-2 learner on the rollout (the second of two steps)."""
    before = policy.trainable_state()
    with PeakMemory(device) as memory:
        # The process group stays up for later learners of this process: DeepSpeed caches its groups, so a
        # learner made after destroy_process_group() fails. The command line destroys it at exit.
        learner = Learner(
            cfg,
            build_algorithm(cfg.algo, cfg.seed),
            rank=0,
            world_size=1,
            master_addr="127.0.0.1",
            master_port=free_port(),
            policy=policy,
        )
        times, stats = [], []
        for _ in range(2):  # the first step also pays for allocations and DeepSpeed's first-step set-up
            sync(device)
            start = time.perf_counter()
            stats.append(learner.update([rollout], [MicroTargets(torch.ones(1), seed=0)]))
            sync(device)
            times.append(time.perf_counter() - start)
    after = policy.trainable_state()
    return {
        "seconds_per_step": times[1],
        "first_step_s": times[0],
        "backward_passes_per_step": learner.terms_per_micro_batch,
        "gradient_checkpointing": policy.pipe.transformer.is_gradient_checkpointing,
        "loss": stats[1]["train/loss"],
        "grad_norm": stats[1]["train/grad_norm"],
        "nonfinite_losses": stats[0]["train/nonfinite_losses"] + stats[1]["train/nonfinite_losses"],
        "max_weight_change": max((after[k].float() - before[k].float()).abs().max().item() for k in before),
        "peak_gib": memory.peak_gib,
    }


# ---------------------------------------------------------------------- the check


def attempt(results: dict, names: tuple[str, ...], device: str, fn, memory_hint: str) -> None:
    """results.update(fn()), or each of `names` set to the error fn raised (traceback printed): a failing check
    (out of memory, say: then `memory_hint` says what to try) leaves the other rows' figures, and main() fails
    after writing them."""
    try:
        results.update(fn())
    except Exception as error:  # noqa: BLE001 - one GPU run reports every row it can
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        if isinstance(error, torch.OutOfMemoryError):
            message += f" ({memory_hint})"
        results.update({name: {"error": message} for name in names})
    free_memory(device)


def run_reward(preset: Preset, device: str, args: argparse.Namespace, peak: float | None) -> dict:
    """Build the JRM once; the jrm and generative rows (as --only asks) on it."""
    start = time.perf_counter()
    jrm = build_jrm(preset, device, args.attn)
    sync(device)
    results = {"jrm_build": {"seconds": time.perf_counter() - start, "backbone_params": num_params(jrm.backbone)}}
    if "jrm" in args.only:
        attempt(
            results,
            ("jrm",),
            device,
            lambda: {"jrm": check_jrm(jrm, preset, device, args.batch, peak)},
            "try a smaller --batch",
        )
    if "generative" in args.only:
        attempt(
            results,
            ("generative",),
            device,
            lambda: {"generative": check_generative(jrm, preset, device, args.generative_batch, args.critique_tokens)},
            "try a smaller --generative-batch",
        )
    return results


def run_kontext(preset: Preset, device: str, args: argparse.Namespace) -> dict:
    """Build FLUX.1 Kontext once; the rollout row, then the learner row on that rollout (as --only asks)."""
    cfg = learner_config(preset, device, args.steps)
    start = time.perf_counter()
    trainable = replace(cfg.policy.trainable, gradient_checkpointing=args.gradient_checkpointing)
    policy = build_kontext(preset, device, trainable)
    sync(device)
    results = {"kontext_build": {"seconds": time.perf_counter() - start}}
    row, rollout = check_rollout(policy, cfg, device)  # the learner trains on this rollout
    if "kontext_rollout" in args.only:
        results["kontext_rollout"] = row
    if "kontext_learner" in args.only:
        hint = (
            "a card with more memory"
            if args.gradient_checkpointing
            else "the learner step needs less memory with --gradient-checkpointing"
        )
        attempt(
            results,
            ("kontext_learner",),
            device,
            lambda: {"kontext_learner": check_learner(policy, cfg, rollout, device)},
            hint,
        )
    if preset is REAL:  # the preflight plan's figures for the same work, beside the measured peaks
        for name, gib in planned_peaks(cfg, args.gradient_checkpointing).items():
            if name in results and "error" not in results[name]:
                results[name]["planned_gib"] = gib
    return results


def planned_peaks(cfg: RLConfig, gradient_checkpointing: bool) -> dict[str, float]:
    """launch/plan.py's GiB for the two Kontext rows at real size (no CUDA context: torch's peak does not count
    it): the rollout row holds every component and samples one image; the learner row's process holds the same
    components (the policy is shared, nothing dropped) plus the trained state and one image's activations."""
    from launch.plan import policy_roles

    rollout, learner, _ = policy_roles(
        replace(
            cfg,
            policy=replace(
                cfg.policy, trainable=replace(cfg.policy.trainable, gradient_checkpointing=gradient_checkpointing)
            ),
        )
    )
    return {
        "kontext_rollout": rollout.weights + rollout.activations,
        "kontext_learner": rollout.weights + learner.trainable + learner.activations,
    }


def table_rows(results: dict, names: list[str]) -> list[dict]:
    """One table row per check in `names`: its headline figure, MFU, seconds, peak memory and a short detail."""
    rows = []
    for name in names:
        r = results[name]
        if "error" in r:
            rows.append({"check": name, "detail": f"FAILED {r['error']}"})
        elif name == "jrm":
            rows.append(
                {
                    "check": name,
                    "value": r["pairs_per_s"],
                    "unit": "pairs/s",
                    "mfu": r["mfu"],
                    "seconds": r["score_s"],
                    "peak_gib": r["peak_gib"],
                    "detail": (
                        f"batch {r['batch']}, {r['tokens_per_sequence']:.0f} tokens/seq; forward {r['forward_s']:.3g} "
                        f"s, MFU vision {_percent(r['mfu_vision'])} language {_percent(r['mfu_language'])}"
                    ),
                }
            )
        elif name == "generative":
            jrm = results.get("jrm", {})
            ratio = (
                f"; JRM at batch {jrm['batch']}: {jrm['pairs_per_s'] / r['pairs_per_s']:.3g}x the pairs/s"
                if "pairs_per_s" in jrm
                else ""
            )
            rows.append(
                {
                    "check": name,
                    "value": r["tokens_per_s"],
                    "unit": "tokens/s",
                    "seconds": r["seconds"],
                    "peak_gib": r["peak_gib"],
                    "detail": (
                        f"batch {r['batch']} x {r['critique_tokens']} tokens, {r['pairs_per_s']:.3g} pairs/s{ratio}"
                    ),
                }
            )
        elif name == "kontext_rollout":
            rows.append(
                {
                    "check": name,
                    "value": r["seconds_per_image"],
                    "unit": "s/image",
                    "seconds": r["seconds_per_image"],
                    "peak_gib": r["peak_gib"],
                    "planned_gib": r.get("planned_gib"),
                    "detail": (
                        f"{r['steps']} steps, {r['tokens_per_forward']} tokens/forward, "
                        f"{r['transformer_params'] / 1e9:.3g}B params"
                    )
                    + ("" if r["finite_log_probs"] else ", NON-FINITE log-probs"),
                }
            )
        else:
            rows.append(
                {
                    "check": name,
                    "value": r["seconds_per_step"],
                    "unit": "s/step",
                    "seconds": r["seconds_per_step"],
                    "peak_gib": r["peak_gib"],
                    "planned_gib": r.get("planned_gib"),
                    "detail": (
                        f"ZeRO-2, {r['backward_passes_per_step']} backward "
                        f"passes{', checkpointing' if r['gradient_checkpointing'] else ''}, loss {r['loss']:.3g}, "
                        f"first step {r['first_step_s']:.3g} s"
                    ),
                }
            )
    return rows


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def failures(results: dict, names: list[str]) -> list[str]:
    """What is wrong with the measured rows, one line each (empty when all is well)."""
    problems = [f"{name}: {results[name]['error']}" for name in names if "error" in results[name]]
    for row in table_rows(results, names):
        if "error" not in results[row["check"]] and not (math.isfinite(row["value"]) and row["value"] > 0):
            problems.append(f"{row['check']}: value {row['value']} is not a positive number")
    rollout, learner = results.get("kontext_rollout", {}), results.get("kontext_learner", {})  # when measured
    if rollout.get("finite_log_probs") is False:
        problems.append("kontext_rollout: non-finite log-probs")
    if learner.get("nonfinite_losses"):
        problems.append(f"kontext_learner: {learner['nonfinite_losses']} non-finite losses")
    if learner.get("max_weight_change") == 0:
        problems.append("kontext_learner: the optimizer step changed no LoRA weight")
    return problems


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Preset]:
    """The options with their size-dependent defaults filled in, and the preset; a usage error for bad ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes, float32, CPU by default: the code path in seconds"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda for real sizes, cpu with --tiny)")
    parser.add_argument(
        "--out", default="runs/bench/gpu_check.json", help="where the JSON report goes (settings, machine, results)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s for MFU (default: from the card's name)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="rollout denoising steps, 6-12 (default 8; 3 with --tiny)"
    )
    parser.add_argument("--batch", type=int, default=None, help="JRM pairs per forward (default 32; 4 with --tiny)")
    parser.add_argument(
        "--generative-batch", type=int, default=None, help="pairs per generative call (default 8; 4 with --tiny)"
    )
    parser.add_argument(
        "--critique-tokens", type=int, default=None, help="tokens per generated critique (default 256; 8 with --tiny)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="weights (default: bfloat16; float32 with --tiny)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=("sdpa", "flash_attention_2", "eager"),
        help="the JRM backbone's attention kernel",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "the learner step recomputes the transformer's activations (default: on at real sizes, as the RL presets; "
            "off with --tiny)"
        ),
    )
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows, of {','.join(ROWS)}")
    args = parser.parse_args(argv)
    preset = TINY if args.tiny else REAL
    if args.dtype is not None:
        preset = replace(preset, dtype=DTYPES[args.dtype])
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = not args.tiny
    args.steps = args.steps or preset.steps
    args.batch = args.batch or preset.batch
    args.generative_batch = args.generative_batch or preset.generative_batch
    args.critique_tokens = args.critique_tokens or preset.critique_tokens
    args.only = args.only.split(",")
    unknown = sorted(set(args.only) - set(ROWS))
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {','.join(ROWS)}")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (a CPU build of torch, or no driver); run with --tiny on a CPU")
    if not args.tiny and args.device == "cpu":
        parser.error(
            "real sizes (an 8.3B JRM, a 12B FLUX transformer and 4.8B T5, in bf16) need a GPU; on a CPU run with --tiny"
        )
    if not args.tiny and not 6 <= args.steps <= 12:
        parser.error(f"--steps must be in 6..12 at real sizes, got {args.steps}")
    if args.steps < 2 or min(args.batch, args.generative_batch, args.critique_tokens) < 1:
        parser.error("--steps must be >= 2 and --batch, --generative-batch, --critique-tokens positive")
    if args.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        parser.error("--attn flash_attention_2 needs the flash-attn package; use sdpa")
    return args, preset


def main(argv: list[str] | None = None) -> dict:
    """Run the checks; returns the results written to --out, or raises after writing them if a check failed."""
    args, preset = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    peak, peak_source = peak_flops(device, args.peak_tflops)
    names = [name for name in ROWS if name in args.only]
    start = time.perf_counter()
    results: dict = {}
    if {"jrm", "generative"} & set(names):
        attempt(
            results,
            tuple(n for n in names if n in ("jrm", "generative")),
            device,
            lambda: run_reward(preset, device, args, peak),
            "building the 8.3B JRM needs about 17 GB",
        )
    if {"kontext_rollout", "kontext_learner"} & set(names):
        attempt(
            results,
            tuple(n for n in names if n.startswith("kontext")),
            device,
            lambda: run_kontext(preset, device, args),
            "FLUX.1 Kontext's weights need about 34 GB",
        )
    results["total_s"] = time.perf_counter() - start
    results["rows"] = table_rows(results, names)
    title = (
        f"gpu_check ({'tiny' if args.tiny else 'real'} sizes, {dtype_name(preset.dtype)}, {device}; MFU: "
        f"{peak_source}), {results['total_s']:.0f} s"
    )
    print("\n" + table(results["rows"], COLUMNS, title))
    settings = dict(
        vars(args),
        preset="tiny" if args.tiny else "real",
        dtype=dtype_name(preset.dtype),
        peak_flops=peak,
        peak_source=peak_source,
    )
    path = write_report(args.out, "gpu_check", command_line(__file__, argv), settings, results)
    print(f"wrote {path}")
    problems = failures(results, names)
    if problems:
        raise RuntimeError(f"gpu_check failed ({path} has the figures that were measured):\n  " + "\n  ".join(problems))
    return results


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():  # the learner's group: NCCL complains at exit when it is left up
            torch.distributed.destroy_process_group()
