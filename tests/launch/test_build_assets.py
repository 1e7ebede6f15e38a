"""launch/build_assets.py: each recipe's smoke version builds an asset that loads like the shipped one."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from launch.build_assets import (
    BACKBONE_ASSET,
    MAX_ASSET_BYTES,
    MAX_FILE_BYTES,
    POLICY_ASSET,
    ROOT,
    build_backbone,
    build_policy,
    load_asset,
    main,
)
from policies.sampling import SamplerConfig
from policies.shapeedit import ShapeEditPolicy
from reward.model import JRM, JRMArgs


def tensors(folder):
    """{file: {name: (shape, dtype)}} of every safetensors file of an asset."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out[str(path.relative_to(folder))] = {
                k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()
            }
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("asset") / "shapeedit_policy"
    work = tmp_path_factory.mktemp("work")
    manifest = build_policy(out, work, smoke=True, overrides=[])
    return out, manifest, work


def test_the_smoke_recipe_loads_like_the_shipped_policy(smoke):
    out, manifest, _ = smoke
    shipped = load_asset(POLICY_ASSET)  # every shipped file matches its sha256
    assert load_asset(out) == manifest
    assert set(manifest) == set(shipped)
    assert set(manifest["files"]) == set(shipped["files"])
    assert tensors(out) == tensors(POLICY_ASSET)
    assert json.loads((out / "policy.json").read_text()) == json.loads((POLICY_ASSET / "policy.json").read_text())
    assert shipped["data"] == manifest["data"]  # evaluated on the same prompts
    assert manifest["command"] == "python launch/build_assets.py --smoke"
    assert shipped["command"] == "python launch/build_assets.py"
    total = sum(p.stat().st_size for p in (ROOT / "assets").rglob("*") if p.is_file())
    assert total <= MAX_ASSET_BYTES
    assert max(f["bytes"] for f in shipped["files"].values()) <= MAX_FILE_BYTES  # sharded below the file limit
    # The shipped policy samples a batch of edits from different decision codes
    policy = ShapeEditPolicy.from_pretrained(POLICY_ASSET)
    source = Image.new("RGB", (64, 64), (245, 245, 245))
    sampler = SamplerConfig(num_steps=2, noise_level=0.0)
    rollout = policy.sample([source] * 4, ["remove the red circle"] * 4, sampler, torch.Generator().manual_seed(0))
    assert rollout.condition.codes.unique().numel() == 4


def test_the_smoke_backbone_recipe_loads_like_the_shipped_backbone(tmp_path):
    out = tmp_path / "reward_backbone"
    manifest = build_backbone(out, tmp_path / "work", smoke=True, overrides=[])
    shipped = load_asset(BACKBONE_ASSET)
    assert load_asset(out) == manifest
    assert set(manifest) == set(shipped)
    assert set(manifest["files"]) == set(shipped["files"])
    assert tensors(out) == tensors(BACKBONE_ASSET)

    def config(folder):
        return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "_name_or_path"}

    assert config(out) == config(BACKBONE_ASSET)
    assert manifest["command"] == "python launch/build_assets.py --asset backbone --smoke"
    assert shipped["command"] == "python launch/build_assets.py --asset backbone"
    # The manifest's figures are the pretraining's record; the shipped backbone answers every probe with a box
    assert manifest["measured"] == {
        k: v for k, v in json.loads((out / "pretrain.json").read_text()).items() if k != "settings"
    }
    assert shipped["measured"]["locate_unparsable"] == 0 and shipped["measured"]["locate_box_error"] is not None
    assert max(f["bytes"] for f in shipped["files"].values()) <= MAX_FILE_BYTES
    # A JRM starts from the shipped backbone like from any Qwen-VL checkpoint, and sees 4-pixel patches
    model = JRM.build(JRMArgs(backbone=str(BACKBONE_ASSET)), seed=0)
    assert model.processor.image_processor.patch_size == 4
    source, edited = Image.new("RGB", (64, 64), (245, 245, 245)), Image.new("RGB", (64, 64), (20, 20, 20))
    scores = model.score([source, source], ["paint the background black"] * 2, [edited, source])
    assert torch.isfinite(scores).all() and scores[0] != scores[1]


def test_a_finished_run_of_the_recipe_ships_as_built_and_another_is_refused(smoke, tmp_path):
    """--from-run packages the run the build trained into the same files; a run of other settings is refused."""
    out, manifest, work = smoke
    packaged = build_policy(tmp_path / "packaged", work, smoke=True, overrides=[], from_run=work / "policy")
    assert packaged["files"] == manifest["files"] and packaged["measured"] == manifest["measured"]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("results.json", "config.yaml"):
        (other / name).write_text((work / "policy" / name).read_text().replace("lr: 0.001", "lr: 0.002"))
    with pytest.raises(SystemExit, match="not trained by the recipe \\(lr differ\\)"):
        build_policy(tmp_path / "refused", work, smoke=True, overrides=[], from_run=other)
    with pytest.raises(SystemExit, match="no results.json"):
        build_policy(tmp_path / "refused", work, smoke=True, overrides=[], from_run=tmp_path / "missing")
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    with pytest.raises(SystemExit):  # the backbone's build has no --from-run: refused by the parser
        main(["--asset", "backbone", "--from-run", str(work / "policy"), "--out", str(tmp_path / "bb")])
    assert not (tmp_path / "bb").exists()


def test_a_changed_file_is_refused(smoke, tmp_path):
    out, _, _ = smoke
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (copy / "policy.json").write_text((copy / "policy.json").read_text() + " ")
    with pytest.raises(ValueError, match="differ from manifest.json.*policy.json"):
        load_asset(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="build_assets.py"):
        load_asset(copy)
