"""launch/backbone_probe.py: both localisation probes for each backbone, with how it was trained, and the docs'
table is the committed JSON."""

import json
from pathlib import Path

import pytest

from launch.backbone_probe import main, markdown
from reward.model import JRMArgs
from reward.pretrain_backbone import PretrainConfig, pretrain


def test_a_pretrained_backbone_is_probed_with_its_settings(tmp_path, capsys):
    out = tmp_path / "backbone"
    record = pretrain(
        PretrainConfig(
            output_dir=str(out),
            tasks=["locate"],
            model=JRMArgs(tiny_hidden=64, tiny_layers=2),
            trainer={
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "report_to": [],
                "save_strategy": "no",
                "disable_tqdm": True,
                "logging_steps": 1,
            },
        )
    )
    main(["--backbone", f"tiny={out}", "--out", str(tmp_path / "probe.json")])
    report = json.loads((tmp_path / "probe.json").read_text())
    row = report["backbones"]["tiny"]
    assert (row["family"], row["patch"], row["steps"], row["tasks"]) == ("qwen2_vl", 8, 2, "locate")
    assert row["final_loss"] == record["final_loss"]
    for key in ("locate_edge_error", "locate_edge_errors", "constant_edge_error", "constant_box_error"):
        assert row[key] == pytest.approx(record[key])  # measured again, on the same questions: the same figures
    assert markdown(report) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--backbone", str(out)])  # no NAME=
    with pytest.raises(SystemExit):
        main(["--backbone", f"none={tmp_path}"])  # not a pretrained backbone


def test_the_docs_table_is_the_committed_json():
    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / "docs" / "results" / "backbone_probe.json").read_text())
    assert markdown(report) in (root / "docs" / "reward.md").read_text(), (
        "docs/reward.md's probe table differs from docs/results/backbone_probe.json: paste `markdown` of it"
    )
