"""Reward scoring throughput: the JRM (one prefill, the score read at one token) against the generative judge
(the same prefill, then a critique of `--critique-tokens` tokens decoded greedily and parsed), on the same
backbone, weights, prompts and images, at batch sizes 1 to 64.

    python launch/bench_reward.py [--sizes small,medium] [--batches 1,4,16,64] [--critique-tokens 256]
                                  [--threads N] [--repeats 3] [--out runs/bench/reward.json] [--profile]

A "pair" is one (source image, instruction, edited image) candidate scored. Weights are random (a tiny
Qwen2-VL built from a config, as everywhere offline); the judge is forced to write exactly
`--critique-tokens` tokens (min = max new tokens), the length of the critiques the JRM is trained on. Both
models share every weight, so the ratio is the cost of decoding and nothing else. Prints one table and writes
JSON; `--profile` then prints where the time of one JRM and one generative batch goes (cProfile, at the largest
batch of the first size). Figures and their analysis: docs/performance.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/bench_reward.py`: import the packages, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from launch.benchmarking import comma_list, command_line, random_images, seconds, table, write_report  # noqa: E402
from reward.backbone import tiny_processor  # noqa: E402
from reward.config import HelpFormatter  # noqa: E402
from reward.generative import GenerativeJudge  # noqa: E402
from reward.model import JRM, JRMArgs  # noqa: E402

# Backbone sizes (language-model width and depth, image side in pixels). `small` is the demo's JRM;
# `medium` is 4x wider, 2x deeper and sees 4x the image tokens, where matrix multiplies dominate the time.
SIZES = {
    "tiny": dict(hidden=64, layers=2, image=32),
    "small": dict(hidden=128, layers=4, image=64),
    "medium": dict(hidden=512, layers=8, image=128),
}
INSTRUCTIONS = (
    "make the red circle blue",
    "move the square to the left",
    "remove the small triangle",
    "enlarge the green star",
)


def build_model(size: str, seed: int = 0) -> JRM:
    """A random-weight JRM of `size` (SIZES), its processor set to the size's images, in eval mode."""
    dims = SIZES[size]
    model = JRM.build(JRMArgs(tiny_hidden=dims["hidden"], tiny_layers=dims["layers"]), seed=seed)
    model.processor = tiny_processor(model.processor.tokenizer, patch=8, image_size=dims["image"])
    return model.eval()


def candidates(n: int, image: int, seed: int = 0) -> tuple[list[Image.Image], list[str], list[Image.Image]]:
    """n random (source, instruction, edit) candidates of `image` x `image` pixels."""
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)]
    return random_images(n, image, seed), instructions, random_images(n, image, seed + 1)


def bench_size(size: str, batches: list[int], critique_tokens: int, repeats: int, min_pairs: int) -> list[dict]:
    """One table row per batch size: JRM and generative pairs/s on the same candidates, their ratio, tokens/s."""
    model = build_model(size)
    judge = GenerativeJudge(model, max_new_tokens=critique_tokens, min_new_tokens=critique_tokens)
    sources, instructions, edits = candidates(max(*batches, min_pairs), SIZES[size]["image"])
    sequence = model.encode(sources[:1], instructions[:1], edits[:1])["input_ids"].shape[1]
    rows = []
    for b in batches:
        n = max(b, min_pairs)  # at least min_pairs per timing, in batches of b
        batch = dict(source_images=sources[:n], instructions=instructions[:n], edited_images=edits[:n], batch_size=b)
        jrm_s = seconds(lambda: model.score(**batch), "cpu", repeats)
        judge.generated_tokens = 0
        gen_s = seconds(lambda: judge.score(**batch), "cpu", repeats)
        tokens_per_run = judge.generated_tokens / (repeats + 1)
        assert tokens_per_run == n * critique_tokens, (
            f"judge wrote {tokens_per_run} tokens per run, expected {n * critique_tokens}"
        )
        rows.append(
            {
                "size": size,
                "batch": b,
                "pairs": n,
                "prompt_tokens": sequence,
                "jrm_pairs_s": n / jrm_s,
                "gen_pairs_s": n / gen_s,
                "ratio": gen_s / jrm_s,
                "gen_tokens_s": tokens_per_run / gen_s,
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def profile(size: str, batch: int, critique_tokens: int, lines: int = 25) -> None:
    """cProfile of one JRM and one generative scoring call of `batch` pairs, top `lines` by cumulative time."""
    model = build_model(size)
    judge = GenerativeJudge(model, max_new_tokens=critique_tokens, min_new_tokens=critique_tokens)
    sources, instructions, edits = candidates(batch, SIZES[size]["image"])
    for name, score in (("JRM", model.score), ("generative", judge.score)):
        score(sources, instructions, edits, batch_size=batch)  # warm-up
        profiler = cProfile.Profile()
        profiler.runcall(score, sources, instructions, edits, batch_size=batch)
        print(f"\n=== {name}, {size}, batch {batch}: top {lines} by cumulative time")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (pairs per forward)")
    parser.add_argument("--critique-tokens", type=int, default=256, help="tokens per generated critique")
    parser.add_argument("--repeats", type=int, default=3, help="timings per cell (the median is reported)")
    parser.add_argument(
        "--min-pairs", type=int, default=8, help="pairs per timing at least (batch 1 scores this many one by one)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument(
        "--out", default="runs/bench/reward.json", help="where the JSON report goes (settings, machine, results)"
    )
    parser.add_argument("--profile", action="store_true", help="then profile the largest batch of the first size")
    args = parser.parse_args(argv)
    sizes = comma_list(parser, "--sizes", args.sizes, SIZES)
    batches = comma_list(parser, "--batches", args.batches)
    if min(args.critique_tokens, args.repeats, args.min_pairs) < 1:
        parser.error("--critique-tokens, --repeats and --min-pairs must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        row for size in sizes for row in bench_size(size, batches, args.critique_tokens, args.repeats, args.min_pairs)
    ]
    columns = ["size", "batch", "prompt_tokens", "jrm_pairs_s", "gen_pairs_s", "ratio", "gen_tokens_s"]
    print(
        "\n"
        + table(
            rows,
            columns,
            f"JRM vs generative judge ({args.critique_tokens}-token critiques), {torch.get_num_threads()} threads",
        )
    )
    path = write_report(args.out, "reward", command_line(__file__, argv), vars(args), {"rows": rows})
    print(f"wrote {path}")
    if args.profile:
        profile(sizes[0], max(batches), args.critique_tokens)
    return rows


if __name__ == "__main__":
    main()
