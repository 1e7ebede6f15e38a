"""Package boundaries (README, layout): policies/ and reward/ are leaves, rl/ uses both, nothing imports launch/."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"policies": set(), "reward": set(), "rl": {"policies", "reward"}, "launch": {"policies", "reward", "rl"}}


def forbidden_imports(root: Path) -> list[str]:
    """Every import in root/{policies,reward,rl,launch} that crosses a boundary, as 'file:line imports x'."""
    found = []
    for package, ok in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in ALLOWED and top != package and top not in ok:
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return found


def test_repository_respects_boundaries():
    assert forbidden_imports(ROOT) == []


def test_checker_flags_a_forbidden_import(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "reward" / "probe.py").write_text("import torch\nfrom rl.learner import step\n")
    (tmp_path / "policies" / "probe.py").write_text("import reward\n")
    (tmp_path / "rl" / "probe.py").write_text("from reward import JRM\nimport launch.grpo_edit\n")
    (tmp_path / "launch" / "probe.py").write_text("import rl, reward, policies\n")
    assert forbidden_imports(tmp_path) == [
        "policies/probe.py:1 imports reward",
        "reward/probe.py:2 imports rl.learner",
        "rl/probe.py:2 imports launch.grpo_edit",
    ]


def test_only_the_ray_actor_set_imports_ray():
    """rl/ray_actors.py is the one module of policies/, reward/ and rl/ that imports Ray; the driver (rl/loop.py)
    and the in-process actor set load without it."""
    importers = []
    for package in ("policies", "reward", "rl"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n.split(".")[0] == "ray" for n in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert sorted(set(importers)) == ["rl/ray_actors.py"]
    probe = "import sys, rl.loop, rl.actors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
