"""Deliberate copies stay copies. policies/ and reward/ are leaves that do not import each other, so where one
needs a piece of the other it keeps a copy, tagged as diffusers tags its copies:

    # Copied from reward.backbone.ImageOnlyProcessor
    class ImageOnlyProcessor(Qwen2VLProcessor):

This test finds every tag in the packages and checks that the top-level statement right after it (a class, a
function or an assignment) is the same code as its source's statement of that name: the same syntax tree,
docstrings and comments aside from the tree's view, names and values included.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policies", "reward", "rl", "launch")
TAG = re.compile(r"^# Copied from ([\w.]+)\s*$")


def statements(path: Path) -> dict[str, ast.stmt]:
    """A module's top-level classes, functions and assignments, by the name they define."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update({t.id: node for t in targets if isinstance(t, ast.Name)})
    return found


def tagged_copies() -> list[tuple[str, int, str]]:
    """(file, line of the copy, dotted source) for every tag in the packages."""
    copies = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                match = TAG.match(line)
                if match:
                    j = i + 1
                    while j < len(lines) and lines[j].startswith("#"):  # more comment lines before the copy
                        j += 1
                    copies.append((str(path.relative_to(ROOT)), j + 1, match.group(1)))
    return copies


def source_of(dotted: str) -> tuple[Path, str]:
    module, _, name = dotted.rpartition(".")
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert path.is_file(), f"{dotted}: no module file {path}"
    return path, name


COPIES = tagged_copies()


def test_the_copies_are_tagged():
    """The known copies carry their tags (a copy whose tag was lost would escape the check below)."""
    sources = {source for _, _, source in COPIES}
    assert {"reward.backbone.ImageOnlyProcessor", "reward.backbone._PRETOKENIZE", "reward.backbone._SPECIAL"} <= sources
    assert {"reward.shapeedit.world.SHAPE_COLOURS", "reward.shapeedit.world.BACKGROUND_COLOURS"} <= sources
    assert "reward.data.to_rgb" in sources


@pytest.mark.parametrize("where, line, source", COPIES, ids=[f"{f}:{n}" for f, n, _ in COPIES])
def test_a_tagged_copy_equals_its_source(where, line, source):
    path, name = source_of(source)
    original = statements(path).get(name)
    assert original is not None, f"{where}:{line}: the tag names {source}, which {path} does not define"
    copy = next((n for n in ast.parse((ROOT / where).read_text()).body if n.lineno == line), None)
    assert copy is not None, f"{where}:{line}: no top-level statement right after the tag"
    assert ast.dump(copy) == ast.dump(original), (
        f"{where}:{line} is no longer a copy of {source}: change both, or neither"
    )
