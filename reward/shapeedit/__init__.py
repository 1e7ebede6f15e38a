"""ShapeEdit: a procedural image-editing world with an exact oracle judge (see docs/shapeedit.md)."""

from reward.shapeedit.edits import Edit, apply_edits, sample_instruction
from reward.shapeedit.generate import SPLITS, GenerateConfig, Task, generate, sample_task
from reward.shapeedit.oracle import Judgement, Reference, build_reference, judge, judge_image
from reward.shapeedit.world import Scene, Shape, render, sample_scene

__all__ = [
    "SPLITS",
    "Edit",
    "GenerateConfig",
    "Judgement",
    "Reference",
    "Scene",
    "Shape",
    "Task",
    "apply_edits",
    "build_reference",
    "generate",
    "judge",
    "judge_image",
    "render",
    "sample_instruction",
    "sample_scene",
    "sample_task",
]
