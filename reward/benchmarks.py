"""Editing reward benchmarks: loaders for local copies (json/jsonl, or the hub's parquet/arrow) and their metrics.

Formats and protocols, as each benchmark's release and its authors' evaluation script define them:
- `tiger`     TIGER-Lab EditReward-Bench: rows id, instruction, source_image, candidate_1, candidate_2,
              ranking ("A>B", "B>A", "A=B", or "A>C"... in 3/4-way groups), comparison_type ("AvsC"),
              dataset ("2pair"/"3pair"/"4pair"). 2-pair: accuracy with tie calibration; 3/4-pair:
              accuracy without ties and group accuracy (every pair of a group right; group = id before "_").
- `editscore` EditScore's EditReward-Bench: key, instruction, input_image, output_images (2, first
              preferred), task_type, dimension. Right iff score(first) > score(second) (ties wrong);
              accuracy per task type, macro-averaged, per dimension.
- `mmrb2`     Multimodal RewardBench 2, image editing: {"pairs": [{id, prompt_content, response_a,
              response_b, chosen}]}. Each pair judged in both orders, the reverse verdict flipped; accuracy
              over both trials. A pointwise reward gives the same verdict in both orders, so a score tie
              is wrong twice.
- `genai`     GenAI-Bench image_edition: instruct_prompt, source_image, left_output_image,
              right_output_image, vote_type (leftvote/rightvote/tievote/bothbad_vote). Accuracy on
              left/right votes, and tie-calibrated accuracy with tievote and bothbad_vote as ties.
- `shapeedit` ShapeEdit / EditReward-Data pairs json: accuracy on strict (non-tie) pairs, overall and by
              the rejected candidate's failure mode (`model2`); `accuracy_ties_half` counts a score tie
              as one half (fairer to judges with discrete scores).
Image fields may be paths (relative to the file), {"bytes"|"path"} dicts, or decoded PIL images.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from reward.data import DataError, decode_image, load_image, parse_rows, read_rows, to_rgb

BENCHMARKS = ("tiger", "editscore", "mmrb2", "genai", "shapeedit")


@dataclass
class Comparison:
    """Two edits of one source; `label` +1 when `a` is preferred, -1 for `b`, 0 for a tie."""

    group: str  # comparisons of one group (tiger 3/4-way) must all be right for group accuracy
    subset: str  # reporting bucket: "2pair", a task type, a vote kind, ...
    instruction: str
    source: object  # image reference: path str, {"bytes"/"path"} dict, or PIL image
    a: object
    b: object
    label: int
    where: str  # "file:row" for error messages
    dimension: str = ""  # editscore: prompt_following / consistency / overall
    base: Path = field(default_factory=Path)  # folder that relative image paths start from


def read_table(path: str | Path) -> list[dict]:
    """Rows of a json list, jsonl, parquet file, folder of parquet files, or `datasets` save_to_disk folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"benchmark path {path} does not exist")
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return read_rows(path)
    import datasets  # only for the hub layouts

    if path.is_dir() and (path / "dataset_info.json").exists():
        table = datasets.load_from_disk(str(path))
    else:
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no json, jsonl or parquet data found")
        table = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(table, datasets.DatasetDict):
        table = next(iter(table.values()))
    return [dict(row) for row in table]


def open_image(ref: object, base: Path, where: str) -> Image.Image:
    """Decode an image reference from a benchmark row."""
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return decode_image(io.BytesIO(ref["bytes"]), f"{where}: cannot decode embedded image bytes")
        if ref.get("path"):
            return load_image(base / ref["path"], where)
    if isinstance(ref, str):
        return load_image(base / ref, where)
    raise DataError(f"{where}: cannot read an image from {type(ref).__name__} {str(ref)[:80]!r}")


def image_key(ref: object) -> str:
    """A stable identity for caching scores of the same image."""
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return f"bytes:{hash(bytes(ref['bytes']))}"
        return str(ref.get("path"))
    return f"object:{id(ref)}"


def _need(row: dict, key: str, where: str):
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    return row[key]


def _ranking_label(ranking: str, left: str, right: str, where: str) -> int:
    m = re.fullmatch(r"\s*([A-Z])\s*(>|<|=)\s*([A-Z])\s*", ranking)
    if not m or {m.group(1), m.group(3)} != {left, right}:
        raise DataError(f"{where}: ranking {ranking!r} does not compare {left} and {right}")
    first, op, _ = m.groups()
    if op == "=":
        return 0
    better_first = op == ">"
    return 1 if (first == left) == better_first else -1


def load_benchmark(kind: str, path: str | Path, skip_bad: bool = False) -> tuple[list[Comparison], int]:
    """Comparisons of one benchmark file; returns (comparisons, skipped rows)."""
    if kind not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {kind!r}; expected one of {BENCHMARKS}")
    path = Path(path)
    base = path.parent if path.is_file() else path
    return parse_rows(path, read_table(path), lambda row, where: _parse_row(kind, row, where, base), skip_bad)


def _parse_row(kind: str, row: dict, where: str, base: Path) -> list[Comparison]:
    def cmp(**kw) -> Comparison:
        return Comparison(where=where, base=base, **kw)

    if kind == "tiger":
        ctype = re.fullmatch(r"([A-Z])vs([A-Z])", str(row.get("comparison_type") or "AvsB"))
        if ctype is None:
            raise DataError(f"{where}: comparison_type {row.get('comparison_type')!r} should look like 'AvsC'")
        left, right = ctype.groups()
        label = _ranking_label(str(_need(row, "ranking", where)), left, right, where)
        rid = str(_need(row, "id", where))
        return [
            cmp(
                group=rid.split("_")[0],
                subset=str(row.get("dataset") or "2pair"),
                instruction=str(_need(row, "instruction", where)),
                source=_need(row, "source_image", where),
                a=_need(row, "candidate_1", where),
                b=_need(row, "candidate_2", where),
                label=label,
            )
        ]
    if kind == "editscore":
        outputs = _need(row, "output_images", where)
        if not isinstance(outputs, list) or len(outputs) != 2:
            raise DataError(f"{where}: output_images must hold exactly 2 images, got {outputs!r}"[:300])
        return [
            cmp(
                group=str(row.get("key", where)),
                subset=str(_need(row, "task_type", where)),
                dimension=str(_need(row, "dimension", where)),
                instruction=str(_need(row, "instruction", where)),
                source=_need(row, "input_image", where),
                a=outputs[0],
                b=outputs[1],
                label=1,
            )
        ]
    if kind == "mmrb2":
        texts, images = [], []
        for item in _need(row, "prompt_content", where):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise DataError(f"{where}: prompt_content items must be [type, value], got {item!r}"[:300])
            (texts if item[0] == "text" else images).append(item[1])
        if not images:
            raise DataError(f"{where}: the prompt has no source image (not an editing pair)")

        def response_image(key: str):
            content = _need(_need(row, key, where), "response_content", where)
            if isinstance(content, list):
                if not all(isinstance(item, (list, tuple)) and len(item) == 2 for item in content):
                    raise DataError(f"{where}: {key}.response_content items must be [type, value]")
                found = [v for t, v in content if t == "image"]
                if not found:
                    raise DataError(f"{where}: {key} has no image")
                return found[0]
            return content

        chosen = str(_need(row, "chosen", where)).upper()
        if chosen not in ("A", "B"):
            raise DataError(f"{where}: chosen must be 'A' or 'B', got {chosen!r}")
        return [
            cmp(
                group=str(row.get("id", where)),
                subset="single-image" if len(images) == 1 else "multi-image",
                instruction=" ".join(texts).strip(),
                source=images[0],
                a=response_image("response_a"),
                b=response_image("response_b"),
                label=1 if chosen == "A" else -1,
            )
        ]
    if kind == "genai":
        vote = str(_need(row, "vote_type", where))
        labels = {"leftvote": 1, "rightvote": -1, "tievote": 0, "bothbad_vote": 0}
        if vote not in labels:
            raise DataError(f"{where}: vote_type {vote!r} is not one of {sorted(labels)}")
        return [
            cmp(
                group=where,
                subset=vote,
                instruction=str(_need(row, "instruct_prompt", where)),
                source=_need(row, "source_image", where),
                a=_need(row, "left_output_image", where),
                b=_need(row, "right_output_image", where),
                label=labels[vote],
            )
        ]
    # shapeedit / EditReward-Data: path1 preferred
    return [
        cmp(
            group=str(row.get("prompt_id", where)),
            subset=str(row.get("model2", "?")),  # the rejected candidate's failure mode
            instruction=str(_need(row, "prompt", where)),
            source=_need(row, "path_src", where),
            a=_need(row, "path1", where),
            b=_need(row, "path2", where),
            label=0 if row.get("tie_case") else 1,
        )
    ]


# --- metrics -------------------------------------------------------------------------------------------


def tie_calibrated_accuracy(diffs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best accuracy over thresholds eps: predict a tie when |score_a - score_b| <= eps, else the sign.

    Args:
        diffs: (N,) score_a - score_b.
        labels: (N,) +1, -1 or 0 (tie).

    Returns:
        (accuracy, the eps that reaches it). eps = -1 means "never predict a tie".
    """
    candidates = np.concatenate([[-1.0], np.unique(np.abs(diffs))])
    best = (-1.0, -1.0)
    for eps in candidates:
        predicted = np.where(np.abs(diffs) <= eps, 0, np.sign(diffs))
        accuracy = float((predicted == labels).mean())
        if accuracy > best[0]:
            best = (accuracy, float(eps))
    return best


def strict_accuracy(diffs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on non-tie labels; a score tie is wrong."""
    strict = labels != 0
    if not strict.any():
        return float("nan")
    return float((np.sign(diffs[strict]) == labels[strict]).mean())


def summarise(kind: str, comparisons: list[Comparison], diffs: np.ndarray) -> dict:
    """The benchmark's metrics from score differences (score(a) - score(b), one per comparison)."""
    labels = np.array([c.label for c in comparisons])
    right = np.sign(diffs) == labels
    by_subset: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(comparisons):
        by_subset[c.subset].append(i)
    result: dict = {"benchmark": kind, "comparisons": len(comparisons)}
    if kind == "tiger":
        for subset, idx in sorted(by_subset.items()):
            idx = np.array(idx)
            if subset == "2pair":
                acc, eps = tie_calibrated_accuracy(diffs[idx], labels[idx])
                result[f"{subset}/accuracy_tie_calibrated"] = acc
                result[f"{subset}/tie_eps"] = eps
            else:
                result[f"{subset}/accuracy"] = strict_accuracy(diffs[idx], labels[idx])
                groups: dict[str, list[bool]] = defaultdict(list)
                for i in idx:
                    if labels[i] != 0:
                        groups[comparisons[i].group].append(bool(right[i]))
                result[f"{subset}/group_accuracy"] = float(np.mean([all(g) for g in groups.values()])) if groups else float("nan")
        # Pair-level accuracy over every subset; the published "Overall" may aggregate differently.
        result["all_pairs/accuracy_no_ties"] = strict_accuracy(diffs, labels)
    elif kind == "editscore":
        dims: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for i, c in enumerate(comparisons):
            dims[c.dimension][c.subset].append(bool(diffs[i] > 0))
        for dim, tasks in sorted(dims.items()):
            per_task = {t: float(np.mean(v)) for t, v in sorted(tasks.items())}
            result[f"{dim}/macro_accuracy"] = float(np.mean(list(per_task.values())))
            result.update({f"{dim}/{t}": a for t, a in per_task.items()})
    elif kind == "mmrb2":
        # Both orders: verdict "a" when score(a) > score(b); flipped order gives the mirrored verdict.
        forward = np.sign(diffs) == labels
        backward = np.sign(-diffs) == -labels
        result["accuracy"] = float(np.concatenate([forward, backward]).mean())
        for subset, idx in sorted(by_subset.items()):
            result[f"{subset}/accuracy"] = float(np.concatenate([forward[idx], backward[idx]]).mean())
    elif kind == "genai":
        result["accuracy_no_ties"] = strict_accuracy(diffs, labels)
        acc, eps = tie_calibrated_accuracy(diffs, labels)
        result["accuracy_tie_calibrated"] = acc
        result["tie_eps"] = eps
    else:
        result["accuracy"] = strict_accuracy(diffs, labels)
        # Judges with discrete scores (the generative baseline) tie often; count a tie as a coin flip.
        strict = labels != 0
        result["accuracy_ties_half"] = float(((np.sign(diffs[strict]) == labels[strict]) + 0.5 * (diffs[strict] == 0)).mean()) if strict.any() else float("nan")
        result["score_ties"] = int((diffs[strict] == 0).sum())
        for subset, idx in sorted(by_subset.items()):
            result[f"vs_{subset}/accuracy"] = strict_accuracy(diffs[idx], labels[idx])
    return result
