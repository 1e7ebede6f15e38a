"""Editing reward benchmarks: loaders for local copies (json/jsonl, or the hub's parquet/arrow) and their metrics,
each scored the way its authors' evaluation scores it.

Formats and protocols, as implemented:
- `tiger`     TIGER-Lab EditReward-Bench, in either of its authors' layouts:
              hub parquet, one row per compared pair: id, instruction, source_image, candidate_1, candidate_2,
              ranking over the two letters of comparison_type ("AvsC": "A>C", "C>A", "A<C", "A=C"), dataset
              ("2pair"/"3pair"/"4pair"); the pairs of a 3/4-way item share the id before "_";
              json, one row per item: prompt, path_src, paths_generated (2-4 images), human_vote.ranking, a full
              ranking ("C>A>B") or a 2-way tie ("A=B=Good" / "A=B=Bad").
              Per file (2-Pair, 3-Pair, 4-Pair): pairwise_accuracy (2-Pair: tie-calibrated, a tie predicted when
              |score gap| <= the threshold that maximises accuracy, tie_eps; 3/4-Pair: tie labels left out, a score
              tie wrong) and strict_ranking_accuracy (an item right when its whole ranking is: every pair ordered
              right; a 2-Pair tie item right when its gap is within the 2-Pair tie_eps). overall/pairwise_accuracy
              is tie-calibrated over the union of all pairs, overall/strict_ranking_accuracy the micro-average over
              items. An exact score tie breaks no ranking here (the authors' argsort would order tied candidates
              by position); an item with a pair missing (skipped, or cut by --limit) is left out of the ranking
              figures and counted in incomplete_items.
- `editscore` EditScore's EditReward-Bench: key ([key1, key2]), instruction, input_image, output_images (2, first
              preferred), task_type, dimension. Right iff score(first) > score(second) (ties wrong);
              accuracy per task type, macro-averaged, per dimension.
- `mmrb2`     Multimodal RewardBench 2, image editing: {"pairs": [{id, prompt_content, response_a,
              response_b, chosen}]}; prompt_content interleaves ["text", ...] and ["image", ...] items, and every
              prompt image is a source image (one, or two to three in 178 of the 1,000 pairs), scored together.
              Each pair judged in both orders, the reverse verdict flipped (the authors' compute_accuracy);
              accuracy over both trials, overall (the authors' figure) and split by the prompt's image count
              (single-image / multi-image, with their pair counts). A pointwise reward gives the same verdict in
              both orders, so a score tie is wrong twice.
- `genai`     GenAI-Bench image_edition: instruct_prompt, source_image, left_output_image,
              right_output_image, vote_type (leftvote/rightvote/tievote/bothbad_vote). Accuracy on
              left/right votes, and tie-calibrated accuracy with tievote and bothbad_vote as ties.
- `shapeedit` ShapeEdit / EditReward-Data pairs json (the training loader's rule, reward/data.py:parse_pair):
              accuracy on strict (non-tie) pairs, overall and by the rejected candidate's failure mode
              (`model2`); `accuracy_ties_half` counts a score tie as one half (fairer to judges with discrete scores).
Image fields may be paths (relative to the file), {"bytes"|"path"} dicts, or decoded PIL images. Every row is
checked completely while loading (fields, labels, every image decoded, its geometry, the instruction) so that
nothing fails once scoring has started. A figure with no usable comparison is NaN (None in results.json),
never a sentinel.
"""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from reward.data import (
    DataError,
    check_geometry,
    check_once,
    decode_image,
    load_image,
    parse_pair,
    parse_rows,
    read_rows,
    text_field,
    to_rgb,
)

BENCHMARKS = ("tiger", "editscore", "mmrb2", "genai", "shapeedit")
TIGER_FILES = {2: "2-Pair", 3: "3-Pair", 4: "4-Pair"}  # the authors' names for the three files


@dataclass
class Comparison:
    """Two edits of one source; `label` +1 when `a` is preferred, -1 for `b`, 0 for a tie."""

    group: str  # the item this pair belongs to (tiger: all pairs of one ranked item)
    subset: str  # reporting bucket: "2-Pair", a task type, a vote kind, ...
    instruction: str
    source: object  # image reference: path str, {"bytes"/"path"} dict, or PIL image; mmrb2: a list of them
    a: object
    b: object
    label: int
    where: str  # "file:row" for error messages
    keys: tuple[str, str, str, str] = ("instruction", "source", "a", "b")  # the row keys of instruction, source, a, b
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
    for name, feature in table.features.items():
        if isinstance(
            feature, datasets.Image
        ):  # keep the encoded bytes: decoding every image at once would fill memory
            table = table.cast_column(name, datasets.Image(decode=False))
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
    raise DataError(f"{where}: cannot read an image from {type(ref).__name__} {str(ref)[:80]!r}", "wrong type")


def open_source(ref: object, base: Path, where: str) -> Image.Image | list[Image.Image]:
    """A comparison's source: one image, or a list of them (mmrb2 prompts with several images)."""
    if isinstance(ref, list):
        return [open_image(r, base, f"{where}[{i}]") for i, r in enumerate(ref)]
    return open_image(ref, base, where)


def image_key(ref: object) -> str:
    """A stable identity for caching scores of the same image (or list of images)."""
    if isinstance(ref, list):
        return "[" + ",".join(image_key(r) for r in ref) + "]"
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return f"bytes:{hash(bytes(ref['bytes']))}"
        return str(ref.get("path"))
    return f"object:{id(ref)}"


def _need(row: dict, key: str, where: str):
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})", "missing field")
    return row[key]


def parse_ranking(text: object, letters: str, where: str, key: str = "ranking") -> list[str] | None:
    """A TIGER label as the candidates' letters, best first; None for a tie.

    Accepted: a tie of two letters ("A=B", "A=B=Good", "A=B=Bad"), or a ranking whose every comparison
    points one way ("C>A>B", "A<C"). The ranking must name exactly `letters` (the candidates compared).
    """
    if not isinstance(text, str):
        raise DataError(
            f"{where}: {key} should be a string like 'A>B', got {type(text).__name__} {text!r}", "bad label"
        )
    label = text.replace(" ", "")
    tie = re.fullmatch(r"([A-Z])=([A-Z])(?:=(?:Good|Bad))?", label)
    if tie:
        if len(letters) != 2 or {tie.group(1), tie.group(2)} != set(letters):
            raise DataError(f"{where}: {key} {text!r} is a tie, which only a pair of {letters} can be", "bad label")
        return None
    parts = re.split(r"([<>])", label)
    order, ops = parts[0::2], set(parts[1::2])
    if len(ops) != 1 or not all(re.fullmatch(r"[A-Z]", p) for p in order) or sorted(order) != sorted(letters):
        raise DataError(
            f"{where}: {key} {text!r} does not rank {', '.join(letters)} (expected e.g. '{'>'.join(letters)}')",
            "bad label",
        )
    return order if ops == {">"} else order[::-1]


def load_benchmark(
    kind: str,
    path: str | Path,
    skip_bad: bool = False,
    check_instruction: Callable[[str, str], None] | None = None,
    limit: int = 0,
    progress: bool = True,
) -> tuple[list[Comparison], Counter]:
    """Comparisons of one benchmark file, every row checked completely (fields, labels, every image decoded,
    image geometry, the instruction: non-empty, and `check_instruction(text, where)` when given, e.g.
    JRM.check_instruction for its token limit).

    Args:
        skip_bad: skip and count bad rows instead of raising DataError.
        limit: read only the first `limit` good rows (0: all).

    Returns:
        (comparisons, skipped rows by kind of fault)
    """
    if kind not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {kind!r}; expected one of {BENCHMARKS}")
    path = Path(path)
    base = path.parent if path.is_file() else path
    checked: dict[str, DataError | None] = {}

    def parse(row: dict, where: str) -> list[Comparison]:
        comparisons = _parse_row(kind, row, where, base)
        for c in comparisons:
            _check_comparison(c, check_instruction, checked)
        return comparisons

    return parse_rows(path, read_table(path), parse, skip_bad, limit=limit, progress=progress)


def _check_comparison(
    c: Comparison, check_instruction: Callable[[str, str], None] | None, checked: dict[str, DataError | None]
) -> None:
    """Everything that would otherwise fail once scoring started, named by row and key."""
    instruction_key, *image_keys = c.keys
    if not c.instruction.strip():
        raise DataError(f"{c.where}: {instruction_key} is empty", "empty instruction")
    if check_instruction is not None:
        try:
            check_instruction(c.instruction, f"{c.where}: {instruction_key}")
        except ValueError as e:
            raise DataError(str(e), "instruction refused by the model") from e
    refs = [*(c.source if isinstance(c.source, list) else [c.source]), c.a, c.b]
    keys = [image_keys[0]] * (len(refs) - 2) + image_keys[1:]
    for key, ref in zip(keys, refs):
        fault = check_once(
            checked,
            f"{c.base}|{image_key(ref)}",
            lambda ref=ref: check_geometry(open_image(ref, c.base, ""), "the image"),
        )
        if fault is not None:
            raise DataError(f"{c.where}: {key}: {str(fault).removeprefix(': ')}", fault.kind)


def _parse_row(kind: str, row: dict, where: str, base: Path) -> list[Comparison]:
    def cmp(**kw) -> Comparison:
        return Comparison(where=where, base=base, **kw)

    if kind == "tiger":
        if "paths_generated" in row:  # the authors' json: one row per ranked item
            paths = _need(row, "paths_generated", where)
            if not isinstance(paths, list) or len(paths) not in TIGER_FILES:
                raise DataError(f"{where}: paths_generated must list 2 to 4 images, got {paths!r}"[:300], "wrong type")
            vote = _need(row, "human_vote", where)
            if not isinstance(vote, dict):
                raise DataError(
                    f"{where}: human_vote should be an object with a 'ranking', got {vote!r}"[:300], "wrong type"
                )
            letters = "ABCD"[: len(paths)]
            order = parse_ranking(_need(vote, "ranking", where), letters, where, "human_vote.ranking")
            rank = {letter: order.index(letter) for letter in letters} if order else None
            instruction = text_field(row, "prompt", where)
            source = _need(row, "path_src", where)
            return [
                cmp(
                    group=where,
                    subset=TIGER_FILES[len(paths)],
                    instruction=instruction,
                    source=source,
                    a=paths[i],
                    b=paths[j],
                    label=0 if rank is None else (1 if rank[letters[i]] < rank[letters[j]] else -1),
                    keys=("prompt", "path_src", f"paths_generated[{i}]", f"paths_generated[{j}]"),
                )
                for i, j in itertools.combinations(range(len(paths)), 2)
            ]
        # the hub's parquet: one row per compared pair
        dataset = str(_need(row, "dataset", where))
        size = re.fullmatch(r"([234])pair", dataset)
        if size is None:
            raise DataError(f"{where}: dataset {dataset!r} should be 2pair, 3pair or 4pair", "bad label")
        ctype = re.fullmatch(r"([A-D])vs([A-D])", str(_need(row, "comparison_type", where)))
        if ctype is None or ctype.group(1) == ctype.group(2):
            raise DataError(f"{where}: comparison_type {row['comparison_type']!r} should look like 'AvsC'", "bad label")
        left, right = ctype.groups()
        order = parse_ranking(_need(row, "ranking", where), left + right, where)
        rid = str(_need(row, "id", where))
        return [
            cmp(
                group=rid if size.group(1) == "2" else rid.split("_")[0],
                subset=TIGER_FILES[int(size.group(1))],
                instruction=text_field(row, "instruction", where),
                source=_need(row, "source_image", where),
                a=_need(row, "candidate_1", where),
                b=_need(row, "candidate_2", where),
                label=0 if order is None else (1 if order[0] == left else -1),
                keys=("instruction", "source_image", "candidate_1", "candidate_2"),
            )
        ]
    if kind == "editscore":
        outputs = _need(row, "output_images", where)
        if not isinstance(outputs, list) or len(outputs) != 2:
            raise DataError(f"{where}: output_images must hold exactly 2 images, got {outputs!r}"[:300], "wrong type")
        return [
            cmp(
                group=str(row.get("key", where)),
                subset=str(_need(row, "task_type", where)),
                dimension=str(_need(row, "dimension", where)),
                instruction=text_field(row, "instruction", where),
                source=_need(row, "input_image", where),
                a=outputs[0],
                b=outputs[1],
                label=1,
                keys=("instruction", "input_image", "output_images[0]", "output_images[1]"),
            )
        ]
    if kind == "mmrb2":
        texts, images = [], []
        for item in _need(row, "prompt_content", where):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in ("text", "image")):
                raise DataError(
                    f"{where}: prompt_content items must be ['text' or 'image', value], got {item!r}"[:300],
                    "wrong type",
                )
            (texts if item[0] == "text" else images).append(item[1])
        if not images:
            raise DataError(f"{where}: the prompt has no source image (not an editing pair)", "missing image")

        def response_image(key: str):
            content = _need(_need(row, key, where), "response_content", where)
            if isinstance(content, list):
                if not all(isinstance(item, (list, tuple)) and len(item) == 2 for item in content):
                    raise DataError(f"{where}: {key}.response_content items must be [type, value]", "wrong type")
                found = [v for t, v in content if t == "image"]
                if not found:
                    raise DataError(f"{where}: {key} has no image", "missing image")
                return found[0]
            return content

        chosen = str(_need(row, "chosen", where)).upper()
        if chosen not in ("A", "B"):
            raise DataError(f"{where}: chosen must be 'A' or 'B', got {chosen!r}", "bad label")
        return [
            cmp(
                group=str(row.get("id", where)),
                subset="single-image" if len(images) == 1 else "multi-image",
                instruction=" ".join(t for t in texts if isinstance(t, str)).strip(),
                source=images if len(images) > 1 else images[0],
                a=response_image("response_a"),
                b=response_image("response_b"),
                label=1 if chosen == "A" else -1,
                keys=("prompt_content text", "prompt_content image", "response_a", "response_b"),
            )
        ]
    if kind == "genai":
        vote = str(_need(row, "vote_type", where))
        labels = {"leftvote": 1, "rightvote": -1, "tievote": 0, "bothbad_vote": 0}
        if vote not in labels:
            raise DataError(f"{where}: vote_type {vote!r} is not one of {sorted(labels)}", "bad label")
        return [
            cmp(
                group=where,
                subset=vote,
                instruction=text_field(row, "instruct_prompt", where),
                source=_need(row, "source_image", where),
                a=_need(row, "left_output_image", where),
                b=_need(row, "right_output_image", where),
                label=labels[vote],
                keys=("instruct_prompt", "source_image", "left_output_image", "right_output_image"),
            )
        ]
    # shapeedit / EditReward-Data: the training loader's rule (path1 preferred)
    pair = parse_pair(row, where, base)
    return [
        cmp(
            group=str(row.get("prompt_id", where)),
            subset=str(row.get("model2", "?")),  # the rejected candidate's failure mode
            instruction=pair.instruction,
            source=pair.source,
            a=pair.chosen,
            b=pair.rejected,
            label=0 if pair.tie else 1,
            keys=("prompt", "path_src", "path1", "path2"),
        )
    ]


# --- metrics -------------------------------------------------------------------------------------------


def tie_calibrated_accuracy(diffs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best accuracy over thresholds eps in {0} and every |score gap|: predict a tie when |score_a - score_b| <= eps,
    else the sign (Deutsch et al. 2023, as EditReward-Bench and GenAI-Bench use it). The smallest best eps wins.

    Args:
        diffs: (N,) score_a - score_b.
        labels: (N,) +1, -1 or 0 (tie).

    Returns:
        (accuracy, the eps that reaches it); (NaN, NaN) when N = 0.
    """
    if len(diffs) == 0:
        return float("nan"), float("nan")
    best = (-np.inf, 0.0)
    for eps in np.concatenate([[0.0], np.unique(np.abs(diffs))]):
        predicted = np.where(np.abs(diffs) <= eps, 0, np.sign(diffs))
        accuracy = float((predicted == labels).mean())
        if accuracy > best[0]:
            best = (accuracy, float(eps))
    return best


def strict_accuracy(diffs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on non-tie labels; a score tie is wrong. NaN without any non-tie label."""
    strict = labels != 0
    if not strict.any():
        return float("nan")
    return float((np.sign(diffs[strict]) == labels[strict]).mean())


def _mean(values: list) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def summarise(kind: str, comparisons: list[Comparison], diffs: np.ndarray) -> dict:
    """The benchmark's metrics from score differences (score(a) - score(b), one per comparison)."""
    labels = np.array([c.label for c in comparisons], dtype=int)
    diffs = np.asarray(diffs, dtype=float)
    by_subset: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(comparisons):
        by_subset[c.subset].append(i)
    result: dict = {"benchmark": kind, "comparisons": len(comparisons)}
    if kind == "tiger":
        result.update(_tiger(comparisons, diffs, labels, by_subset))
    elif kind == "editscore":
        dims: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for i, c in enumerate(comparisons):
            dims[c.dimension][c.subset].append(bool(diffs[i] > 0))
        for dim, tasks in sorted(dims.items()):
            per_task = {t: _mean(v) for t, v in sorted(tasks.items())}
            result[f"{dim}/macro_accuracy"] = _mean(list(per_task.values()))
            result.update({f"{dim}/{t}": a for t, a in per_task.items()})
    elif kind == "mmrb2":
        # Both orders: verdict "a" when score(a) > score(b); flipped order gives the mirrored verdict.
        forward = np.sign(diffs) == labels
        backward = np.sign(-diffs) == -labels
        result["accuracy"] = _mean(np.concatenate([forward, backward]))
        for subset in ("single-image", "multi-image"):
            idx = by_subset.get(subset, [])
            result[f"{subset}/accuracy"] = _mean(np.concatenate([forward[idx], backward[idx]]))
            result[f"{subset}/pairs"] = len(idx)
    elif kind == "genai":
        result["accuracy_no_ties"] = strict_accuracy(diffs, labels)
        acc, eps = tie_calibrated_accuracy(diffs, labels)
        result["accuracy_tie_calibrated"] = acc
        result["tie_eps"] = eps
    else:
        strict = labels != 0
        result["strict_pairs"] = int(strict.sum())
        result["accuracy"] = strict_accuracy(diffs, labels)
        # Judges with discrete scores (the generative baseline) tie often; count a tie as a coin flip.
        result["accuracy_ties_half"] = _mean((np.sign(diffs[strict]) == labels[strict]) + 0.5 * (diffs[strict] == 0))
        result["score_ties"] = int((diffs[strict] == 0).sum())
        for subset, idx in sorted(by_subset.items()):
            result[f"vs_{subset}/accuracy"] = strict_accuracy(diffs[idx], labels[idx])
    return result


def _tiger(
    comparisons: list[Comparison], diffs: np.ndarray, labels: np.ndarray, by_subset: dict[str, list[int]]
) -> dict:
    """EditReward-Bench's figures per file and overall, under its authors' names."""
    result: dict = {}
    correct_total = items_total = 0
    for subset in TIGER_FILES.values():
        idx = np.array(by_subset.get(subset, []), dtype=int)
        if subset == "2-Pair":
            accuracy, eps = tie_calibrated_accuracy(diffs[idx], labels[idx])
            result["2-Pair/tie_eps"] = eps
        else:
            accuracy, eps = strict_accuracy(diffs[idx], labels[idx]), 0.0
        items: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            items[comparisons[i].group].append(i)
        size = next(n for n, name in TIGER_FILES.items() if name == subset)
        complete = {g: members for g, members in items.items() if len(members) == size * (size - 1) // 2}
        correct = sum(_ranked_right(diffs[m], labels[m], eps) for m in complete.values())
        result[f"{subset}/pairwise_accuracy"] = accuracy
        result[f"{subset}/strict_ranking_accuracy"] = correct / len(complete) if complete else float("nan")
        result[f"{subset}/strict_correct_count"] = correct
        result[f"{subset}/strict_total_samples"] = len(complete)
        result[f"{subset}/pair_count"] = len(idx)
        result[f"{subset}/incomplete_items"] = len(items) - len(complete)
        correct_total += correct
        items_total += len(complete)
    result["overall/pairwise_accuracy"] = tie_calibrated_accuracy(diffs, labels)[0]
    result["overall/strict_ranking_accuracy"] = correct_total / items_total if items_total else float("nan")
    result["overall/strict_correct_count"] = correct_total
    result["overall/strict_total_samples"] = items_total
    result["overall/total_pair_count"] = len(diffs)
    return result


def _ranked_right(diffs: np.ndarray, labels: np.ndarray, eps: float) -> bool:
    """One item's strict ranking: a 2-way tie within eps, else every pair strictly in the labelled order (an
    N-way item with a tie label is never right, as the authors' parser refuses ties beyond two candidates)."""
    if len(labels) == 1 and labels[0] == 0:
        return bool(abs(diffs[0]) <= eps)
    return bool((labels != 0).all() and (np.sign(diffs) == labels).all())
