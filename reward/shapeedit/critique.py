"""Grounded critiques of candidate edits, built from scene facts and the oracle's scores.

The critique is the text that JRM's language-modelling loss learns from, in the structured, spatially
grounded form of arXiv 2602.07533: first the boxes of the regions the instruction concerns and of the
regions that changed (four location tokens, `ymin xmin ymax xmax`, see `box_text`), then one statement per
region under its tag (`<|bbox_0|>`, `<|bbox_1|>`, ...), then `<|global|>` (background, untouched
objects, artifacts), then the verdict with the scores. Its facts come from comparing scenes object by
object; its judgements (done / partly done / not done, the scores) come from the oracle, so a critique
never disagrees with the label of its candidate.
"""

from __future__ import annotations

import re

from reward.shapeedit.candidates import Candidate
from reward.shapeedit.edits import ADDED_ID, Edit, apply_edits
from reward.shapeedit.oracle import Judgement
from reward.shapeedit.world import Scene, Shape, region_name, size_name

REGION_TAGS = tuple(f"<|bbox_{i}|>" for i in range(8))
"""Region tags, in the order the critique lists its regions; special tokens of the JRM's tokenizer."""
GLOBAL_TAG = "<|global|>"
"""Introduces the critique's statement on the whole image."""
LOC_BINS = 32
LOC_TOKENS = tuple(f"<|loc_{i}|>" for i in range(LOC_BINS))
"""Location tokens: bin k of the 0-1000 scale covers [1000 k / 32, 1000 (k + 1) / 32); special tokens."""
_LOC = re.compile(r"<\|loc_(\d+)\|>")

ARTIFACT_SENTENCES = {
    None: "The image is clean and sharp.",
    "noise": "The image is covered in grainy noise.",
    "blur": "The image is blurred and its edges are soft.",
    "colour_shift": "The colours are off: the whole image has a colour cast.",
}


def scores_1_to_4(judgement: Judgement) -> tuple[int, int]:
    """EditReward-style integer scores: (instruction following, consistency-and-quality), each 1-4."""
    following = 1 + round(3 * judgement.following)
    quality = 1 + round(3 * (judgement.consistency + judgement.quality) / 2)
    return following, quality


def status(score: float) -> str:
    """The word for how much of one atomic edit the oracle saw done."""
    if score >= 0.8:
        return "done"
    if score > 0.2:
        return "partly done"
    return "not done"


def name(scene: Scene, shape: Shape) -> str:
    """Deterministic words for a shape: kind, then colour, then size, as needed to be unique."""
    others = [o for o in scene.shapes if o.id != shape.id]
    if not any(o.kind == shape.kind for o in others):
        return shape.kind
    if not any((o.kind, o.colour) == (shape.kind, shape.colour) for o in others):
        return f"{shape.colour} {shape.kind}"
    return f"{size_name(shape.size)} {shape.colour} {shape.kind} near the {region_name(shape.x, shape.y)}"


def request(source: Scene, edit: Edit) -> str:
    """Plain words for what one atomic edit asks."""
    f = edit.family
    if f == "recolour":
        return f"recolour the {name(source, source.shape(edit.target))} to {edit.colour}"
    if f == "remove":
        return f"remove the {name(source, source.shape(edit.target))}"
    if f == "add":
        return f"add a {size_name(edit.size)} {edit.colour} {edit.kind} in the {edit.region}"
    if f == "move":
        return f"move the {name(source, source.shape(edit.target))} to the {edit.region}"
    if f == "resize":
        s = source.shape(edit.target)
        return f"make the {name(source, s)} {'bigger' if edit.size > s.size else 'smaller'}"
    if f == "background":
        return f"change the background to {edit.colour}"
    if f == "swap":
        a, b = source.shape(edit.target), source.shape(edit.other)
        return f"swap the {name(source, a)} and the {name(source, b)}"
    raise ValueError(f"unknown edit family {f!r}")


def changes(source: Scene, scene: Scene) -> dict[tuple[int, str], str]:
    """What differs from `source`, keyed by (shape id or -1 for the background, attribute)."""
    out: dict[tuple[int, str], str] = {}
    if scene.background != source.background:
        out[(-1, "background")] = f"the background changed from {source.background} to {scene.background}"
    after = {s.id: s for s in scene.shapes}
    for s in source.shapes:
        n = name(source, s)
        t = after.get(s.id)
        if t is None:
            out[(s.id, "present")] = f"the {n} was removed"
            continue
        if t.colour != s.colour:
            out[(s.id, "colour")] = f"the {n} is now {t.colour}"
        if (t.x, t.y) != (s.x, s.y):
            a, b = region_name(s.x, s.y), region_name(t.x, t.y)
            out[(s.id, "position")] = (
                f"the {n} moved from the {a} to the {b}" if a != b else f"the {n} moved a little within the {a}"
            )
        if t.size != s.size:
            out[(s.id, "size")] = f"the {n} got {'bigger' if t.size > s.size else 'smaller'}"
    source_ids = {s.id for s in source.shapes}
    for t in scene.shapes:
        if t.id not in source_ids:
            out[(t.id, "present")] = (
                f"a {size_name(t.size)} {t.colour} {t.kind} was added in the {region_name(t.x, t.y)}"
            )
    return out


def box(shape: Shape) -> tuple[int, int, int, int]:
    """The shape's bounding box as (ymin, xmin, ymax, xmax) on a 0-1000 scale (Qwen-VL's grounding convention)."""
    edges = (shape.y - shape.size, shape.x - shape.size, shape.y + shape.size, shape.x + shape.size)
    return tuple(min(1000, max(0, round(1000 * v))) for v in edges)


def box_text(b: tuple[int, int, int, int]) -> str:
    """A box (ymin, xmin, ymax, xmax on the 0-1000 scale) as four location tokens, as PaliGemma and Kosmos-2
    write boxes, not as the digit strings of Qwen-VL's "[ymin, xmin, ymax, xmax]".

    Why: a backbone spelling digits must get each number's length right before its value, and the tiny
    backbones' greedy boxes collapsed onto a few digit strings (docs/reward.md); a location token is one
    choice among 32 places per edge. 32 bins are two pixels of a 64x64 ShapeEdit image (31.25 on the scale),
    finer than any object's edge needs. A real backbone gets the tokens added to its vocabulary with the
    region tags (`reward.backbone.ADDED_TOKENS`)."""
    return "".join(LOC_TOKENS[min(LOC_BINS - 1, max(0, v * LOC_BINS // 1000))] for v in b)


def parse_locations(text: str) -> list[float]:
    """The location tokens of `text` in order, each as its bin's centre on the 0-1000 scale."""
    return [(int(k) + 0.5) * 1000 / LOC_BINS for k in _LOC.findall(text)]


def regions(source: Scene, wanted: Scene, seen: Scene, edits: tuple[Edit, ...]) -> list[tuple[int, Shape]]:
    """The critique's regions as (shape id, the shape whose box is shown): first every object an edit names
    or creates, in the instruction's order, then every other object that changed, by id.

    The box is where the object is in the source; an object the source lacks (added) is shown where the
    instruction puts it, or, when only the candidate has it, where the candidate put it.
    """
    ids: list[int] = []
    for e in edits:
        named = [e.target, e.other] if e.family != "add" else [ADDED_ID]
        ids += [i for i in named if i is not None and i not in ids]
    diff = changes(source, seen)
    ids += sorted({i for i, _ in diff if i >= 0 and i not in ids})
    out = []
    for i in ids:
        for scene in (source, wanted, seen):
            if any(s.id == i for s in scene.shapes):
                out.append((i, scene.shape(i)))
                break
    if len(out) > len(REGION_TAGS):
        raise ValueError(f"a critique can show at most {len(REGION_TAGS)} regions, this one has {len(out)}")
    return out


def write_critique(source: Scene, edits: tuple[Edit, ...], candidate: Candidate, judgement: Judgement) -> str:
    """A grounded critique (see the module docstring) ending in a verdict whose scores are the oracle's
    (see `scores_1_to_4`)."""
    wanted_scene = apply_edits(source, edits)
    wanted = changes(source, wanted_scene)
    seen = changes(source, candidate.scene)
    shown = regions(source, wanted_scene, candidate.scene, edits)
    tags = {i: REGION_TAGS[k] for k, (i, _) in enumerate(shown)}

    lines = ["Regions: " + (" ".join(f"{tags[i]} {box_text(box(s))}" for i, s in shown) if shown else "none") + "."]
    statuses: dict[int, list[str]] = {i: [] for i, _ in shown}
    for e, score in zip(edits, judgement.following_per_edit):
        for i in [ADDED_ID] if e.family == "add" else [e.target, e.other]:
            if i is not None:
                statuses[i].append(f"asked to {request(source, e)}: {status(score)}")
    after = {s.id: s for s in candidate.scene.shapes}
    for i, s in shown:
        words = name(source, s) if any(t.id == i for t in source.shapes) else f"{size_name(s.size)} {s.colour} {s.kind}"
        facts = [seen[k] for k in seen if k[0] == i]
        extra = [seen[k] for k in seen if k[0] == i and k not in wanted]
        missed = [wanted[k] for k in wanted if k[0] == i and seen.get(k) != wanted[k]]
        parts = statuses[i] or ["not asked"]
        parts.append("changes: " + "; ".join(facts) if facts else "unchanged")
        if i in after and facts and box(after[i]) != box(s):
            parts.append(f"now at {box_text(box(after[i]))}")
        if missed:
            parts.append("expected: " + "; ".join(missed))
        if extra and statuses[i]:
            parts.append("not requested: " + "; ".join(extra))
        lines.append(f"{tags[i]} the {words}: " + "; ".join(parts) + ".")
    background = [e for e in edits if e.family == "background"]
    glob = []
    for e, score in zip(edits, judgement.following_per_edit):
        if e.family == "background":
            glob.append(f"asked to {request(source, e)}: {status(score)}")
    if (-1, "background") in seen:
        glob.append(seen[(-1, "background")] + ("" if background else " (not requested)"))
    else:
        glob.append(f"the background is still {source.background}")
    untouched = [s for s in source.shapes if s.id not in tags]
    if untouched:
        glob.append(
            "the other shapes are unchanged" if len(untouched) > 1 else f"the {name(source, untouched[0])} is unchanged"
        )
    lines.append(f"{GLOBAL_TAG} " + "; ".join(glob) + ". " + ARTIFACT_SENTENCES[candidate.artifact])
    lines.append(verdict(judgement))
    return "\n".join(lines)


def verdict(judgement: Judgement) -> str:
    """A critique's last line: a word for the edit and the oracle's scores (`scores_1_to_4`)."""
    following, quality = scores_1_to_4(judgement)
    overall = following + quality
    word = "a good edit" if overall >= 7 else "a flawed edit" if overall >= 5 else "a failed edit"
    return (
        f"Verdict: {word}. Instruction following {following}/4, consistency and quality {quality}/4, overall "
        f"{overall}/8."
    )
