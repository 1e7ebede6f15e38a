"""launch/two_node_job.py: refuses missing inputs before any Ray node starts, and docs/rl.md's figures are its JSON's.
(The job itself, 2 simulated nodes through `ray job submit`, takes minutes; tests/rl/test_multinode.py runs the
same topology through `train`.)"""

import json
from pathlib import Path

import pytest

from launch import two_node_job

ROOT = Path(__file__).resolve().parents[2]


def test_missing_inputs_are_refused_before_any_node_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(two_node_job, "Cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    with pytest.raises(SystemExit) as e:
        two_node_job.main(["--data", str(tmp_path), "--policy", str(tmp_path), "--jrm", str(tmp_path)])
    assert e.value.code == 2 and "train_prompts.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        two_node_job.main(["--data", str(tmp_path), "--policy", str(tmp_path), "--jrm", str(tmp_path), "--nodes", "0"])


def test_the_docs_figures_are_the_committed_json():
    report = json.loads((ROOT / "docs" / "bench" / "two_node_job.json").read_text())["results"]
    doc = (ROOT / "docs" / "rl.md").read_text()
    assert f"**{report['perf/driver_bytes']:,} bytes per step**" in doc
    assert (
        f"**{report['perf/rollout_bytes'] / 1e6:.1f} MB**" in doc and f"{report['perf/step_s']:.1f} s per step" in doc
    )
    assert report["nodes"] == 2 and report["reward/node_0/batch_mean"] > 0 and report["reward/node_1/batch_mean"] > 0
