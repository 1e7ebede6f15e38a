"""Label-free grounding tasks on ShapeEdit scenes, for pretraining a reward model's backbone.

Each task is a question about two images (a source scene and a second image) with an exact answer in
the grounded critiques' vocabulary (boxes as location tokens, region tags), and carries no preference
label: describe the scene with boxes, say what differs between the two images, find a named object,
and point at the objects an instruction names. A backbone that has learnt them sees shapes, reads the
words that name them and binds the two, before it ever sees a ranked pair (reward/pretrain_backbone.py).
Instructions with a held-out composition are never drawn, so test_heldout stays held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reward.shapeedit.candidates import MODES, make_candidate, render_candidate
from reward.shapeedit.critique import ARTIFACT_SENTENCES, GLOBAL_TAG, REGION_TAGS, box, box_text, changes
from reward.shapeedit.edits import ADDED_ID, apply_edits, composition_keys, is_heldout, refer, sample_instruction
from reward.shapeedit.world import Scene, render, sample_scene

TASKS = ("describe", "differences", "locate", "instruction_regions")


@dataclass
class GroundingExample:
    source: np.ndarray  # uint8 (H, W, 3)
    second: np.ndarray  # uint8 (H, W, 3): the source itself, or an edit of it
    question: str
    answer: str
    task: str  # one of TASKS


def describe(scene: Scene) -> str:
    """Every shape with its box, in reading order (top to bottom, then left to right), then the background."""
    shapes = sorted(scene.shapes, key=box)
    parts = [f"{REGION_TAGS[k]} {box_text(box(s))} {s.colour} {s.kind}" for k, s in enumerate(shapes)]
    return "; ".join(parts) + f"; {GLOBAL_TAG} background {scene.background}."


def differences(source: Scene, edited: Scene, artifact: str | None) -> str:
    """What changed from `source` to `edited`, object by object with boxes, then the image as a whole."""
    diff = changes(source, edited)
    ids = sorted({i for i, _ in diff if i >= 0})
    both = {s.id: s for s in source.shapes} | {
        s.id: s for s in edited.shapes if s.id not in {t.id for t in source.shapes}
    }
    parts = [
        f"{REGION_TAGS[k]} {box_text(box(both[i]))} " + "; ".join(diff[key] for key in diff if key[0] == i)
        for k, i in enumerate(ids)
    ]
    whole = [diff[(-1, "background")]] if (-1, "background") in diff else []
    text = "; ".join(parts + [f"{GLOBAL_TAG} " + "; ".join(whole + [ARTIFACT_SENTENCES[artifact]])])
    return text if ids or whole else f"nothing changed; {text}"


def sample_example(rng: np.random.Generator, size: int = 64, task: str | None = None) -> GroundingExample | None:
    """One example of `task` (uniform over TASKS when None), or None when the draw does not fit (draw again)."""
    task = task or TASKS[int(rng.integers(len(TASKS)))]
    scene = sample_scene(rng)
    image = render(scene, size)
    if task == "describe":
        return GroundingExample(image, image, "Describe the first image with boxes.", describe(scene), task)
    if task == "locate":
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        words = refer(scene, shape.id, rng)
        if words is None:
            return None
        return GroundingExample(image, image, f"Where is the {words}?", box_text(box(shape)), task)
    drawn = sample_instruction(rng, scene)
    if drawn is None:
        return None
    edits, instruction = drawn
    if any(is_heldout(k) for e in edits for k in composition_keys(scene, e)):
        return None
    if task == "instruction_regions":
        wanted = apply_edits(scene, edits)
        ids = [i for e in edits for i in ([ADDED_ID] if e.family == "add" else [e.target, e.other]) if i is not None]
        boxes = [box_text(box((wanted if i == ADDED_ID else scene).shape(i))) for i in ids]
        answer = " ".join(boxes) if boxes else f"{GLOBAL_TAG} the background"
        return GroundingExample(
            image, image, f"Which regions does this instruction concern? {instruction}", answer, task
        )
    if task == "differences":
        mode = MODES[int(rng.integers(len(MODES)))]
        candidate = make_candidate(rng, scene, edits, mode)
        if candidate is None:
            return None
        edited = render_candidate(candidate, rng, size)
        return GroundingExample(
            image,
            edited,
            "What differs between the two images?",
            differences(scene, candidate.scene, candidate.artifact),
            task,
        )
    raise ValueError(f"unknown grounding task {task!r}; expected one of {TASKS}")
