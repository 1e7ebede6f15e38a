"""Write label-consistent critiques into EditReward-Data json with a teacher VLM (transformers `generate`).

    python reward/synthesize_critiques.py --data train.json --teacher /models/Qwen2.5-VL-72B-Instruct \
        --out train_critiques.json [--batch-size 4] [--max-new-tokens 384]

Real preference data has scores but no evaluation text; JRM's language-modelling loss needs one critique
per candidate (`rationale1`, `rationale2`). The teacher sees source, instruction, edit and the human
scores, and explains them; the verdict line is then rewritten from the labels, so a critique can never
contradict its label. Progress goes to OUT.partial.jsonl after every batch: rerun the same command to
resume; the final json is written once every row is done. With CUDA the teacher is loaded in bf16 and
spread over every visible GPU (CUDA_VISIBLE_DEVICES picks them), so a 72B teacher fits on several.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python reward/synthesize_critiques.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from tqdm import tqdm

from reward.backbone import load_backbone
from reward.config import HelpFormatter
from reward.data import DataError, field, load_image, read_rows

TEACHER_PROMPT = (
    "The first image is the source, the second is an edit of it made for the instruction: {instruction}\n"
    "Human raters scored the edit {following}/4 for instruction following and {quality}/4 for visual quality "
    "and preservation. Write a short step-by-step critique that explains these scores: what the instruction asks, "
    "what changed, what was preserved, and the image quality."
)


def verdict(following: float, quality: float) -> str:
    return (
        f"Verdict: instruction following {following:g}/4, consistency and quality {quality:g}/4, overall "
        f"{following + quality:g}/8."
    )


def enforce_verdict(text: str, following: float, quality: float) -> str:
    """Drop whatever verdict the teacher wrote and end with the one the labels say."""
    body = text.split("Verdict:")[0].strip()
    return f"{body}\n{verdict(following, quality)}" if body else verdict(following, quality)


class Teacher:
    def __init__(self, path: str, max_new_tokens: int, trust_remote_code: bool = False):
        gpu = torch.cuda.is_available()
        # device_map="auto": a teacher larger than one GPU (72B in bf16 is ~145 GB) loads straight onto all of them.
        self.model, self.processor = load_backbone(
            path, dtype=torch.bfloat16 if gpu else torch.float32, trust_remote_code=trust_remote_code,
            add_score_token=False, device_map="auto" if gpu else None,
        )  # fmt: skip
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def critique(self, jobs: list[tuple]) -> list[str]:
        """jobs: (source image, edited image, instruction, following, quality) -> critique bodies."""
        texts, images = [], []
        for source, edited, instruction, following, quality in jobs:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "image"},
                        {
                            "type": "text",
                            "text": TEACHER_PROMPT.format(
                                instruction=instruction, following=f"{following:g}", quality=f"{quality:g}"
                            ),
                        },
                    ],
                }
            ]
            texts.append(
                self.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
            images.append([source, edited])
        batch = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        tokenizer = self.processor.tokenizer
        out = self.model.generate(
            **batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def synthesize(
    data: Path, teacher: Teacher, out: Path, batch_size: int = 4, limit: int = 0, progress: bool = True
) -> int:
    """Fill rationale1/rationale2 of every row; returns how many rows were written in this call.

    `progress`: a progress bar over the rows (those written by earlier runs count as done), on stderr when it
    is a terminal.
    """
    rows = read_rows(data)
    partial = out.with_suffix(out.suffix + ".partial.jsonl")
    done: dict[int, dict] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["row"]] = record
    todo = [i for i in range(len(rows)) if i not in done]
    if limit:
        todo = todo[:limit]
    written = 0
    # rows done in earlier runs count from the start; None: the bar shows on a terminal only
    bar = tqdm(
        total=len(done) + len(todo), initial=len(done), desc="critiques", unit="row", disable=None if progress else True
    )
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        jobs = []
        for i in chunk:
            row, where = rows[i], f"{data}:row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            instruction = field(row, "prompt", str, where)
            source = load_image(data.parent / field(row, "path_src", str, where), where)
            for slot in ("1", "2"):
                following = field(row, f"model{slot}_dim1_score", float, where)
                quality = field(row, f"model{slot}_dim2_score", float, where)
                edited = load_image(data.parent / field(row, f"path{slot}", str, where), where)
                jobs.append((source, edited, instruction, following, quality))
        bodies = teacher.critique(jobs)
        with partial.open("a") as f:
            for k, i in enumerate(chunk):
                record = {"row": i}
                for j, slot in enumerate(("1", "2")):
                    _, _, _, following, quality = jobs[2 * k + j]
                    record[f"rationale{slot}"] = enforce_verdict(bodies[2 * k + j], following, quality)
                f.write(json.dumps(record) + "\n")
                done[i] = record
                written += 1
        bar.update(len(chunk))
    bar.close()
    if len(done) == len(rows):
        for i, row in enumerate(rows):
            row["rationale1"], row["rationale2"] = done[i]["rationale1"], done[i]["rationale2"]
        out.write_text(json.dumps(rows, indent=1))
        partial.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="EditReward-Data json (paths relative to its folder)")
    parser.add_argument("--teacher", required=True, help="local path (or hub id) of a Qwen-VL instruct model")
    parser.add_argument("--out", required=True, help="output json; write it beside --data so image paths still resolve")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per generate() call (two candidates each)")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="critique tokens the teacher may write")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many rows (resume later)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow code shipped with the teacher checkpoint to run"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows on stderr when that is a terminal)"
    )
    args = parser.parse_args(argv)
    try:
        teacher = Teacher(args.teacher, args.max_new_tokens, args.trust_remote_code)
        n = synthesize(
            Path(args.data), teacher, Path(args.out), args.batch_size, args.limit, progress=not args.no_progress
        )
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote critiques for {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
