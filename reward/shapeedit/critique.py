"""Step-by-step critiques of candidate edits, built from scene facts and the oracle's scores.

The critique is the chain-of-thought text that JRM's language-modelling loss learns from. Its facts
(what was asked, what changed, what stayed) come from comparing scenes object by object; its judgements
(done / partly done / not done, the scores) come from the oracle, so a critique never disagrees with the
label of its candidate.
"""

from __future__ import annotations

from reward.shapeedit.candidates import Candidate
from reward.shapeedit.edits import Edit, apply_edits
from reward.shapeedit.oracle import Judgement
from reward.shapeedit.world import Scene, Shape, region_name, size_name

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
            out[(s.id, "position")] = f"the {n} moved from the {a} to the {b}" if a != b else f"the {n} moved a little within the {a}"
        if t.size != s.size:
            out[(s.id, "size")] = f"the {n} got {'bigger' if t.size > s.size else 'smaller'}"
    source_ids = {s.id for s in source.shapes}
    for t in scene.shapes:
        if t.id not in source_ids:
            out[(t.id, "present")] = f"a {size_name(t.size)} {t.colour} {t.kind} was added in the {region_name(t.x, t.y)}"
    return out


def write_critique(source: Scene, edits: tuple[Edit, ...], instruction: str, candidate: Candidate, judgement: Judgement) -> str:
    """A four-step critique ending in a verdict whose scores are the oracle's (see `scores_1_to_4`)."""
    wanted = changes(source, apply_edits(source, edits))
    seen = changes(source, candidate.scene)

    asks = "; ".join(request(source, e) for e in edits)
    lines = [f'1. Request: "{instruction}" asks to {asks}.']
    observed = [seen[k] for k in seen]
    lines.append("2. Changes: " + ("; ".join(observed) + "." if observed else "nothing in the scene changed."))
    checks = [f"{request(source, e)}: {status(score)}" for e, score in zip(edits, judgement.following_per_edit)]
    extra = [seen[k] for k in seen if k not in wanted]
    wrong = [seen[k] for k in seen if k in wanted and seen[k] != wanted[k]]
    kept = "everything else is preserved" if not extra else "not requested: " + "; ".join(extra)
    detail = f" (differs from what was asked: {'; '.join(wrong)})" if wrong else ""
    lines.append("3. Check: " + "; ".join(checks) + detail + "; " + kept + ".")
    lines.append("4. Quality: " + ARTIFACT_SENTENCES[candidate.artifact])
    following, quality = scores_1_to_4(judgement)
    overall = following + quality
    word = "a good edit" if overall >= 7 else "a flawed edit" if overall >= 5 else "a failed edit"
    lines.append(f"Verdict: {word}. Instruction following {following}/4, consistency and quality {quality}/4, overall {overall}/8.")
    return "\n".join(lines)
