"""Bad input, end to end on real files: every image, text and data-file fault a user can hand us either
converts explicitly (image modes, EXIF rotation, 1x1, non-ASCII) or stops with a message naming the file,
row or key, or (where the user asked, skip_bad) is skipped and counted. docs/reliability.md's table lists these."""

import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward.config import load_config
from reward.data import MAX_IMAGE_PIXELS, DataError, load_image, load_pairs, to_rgb
from reward.model import JRM, JRMArgs
from reward.train import TrainConfig, prepare, usable_pairs
from reward.train import main as train_main
from rl.prompts import load_prompts


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR with a correct CRC) declaring a huge image: the shape of a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_broken_images_are_refused_naming_the_row_and_file(tmp_path):
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:300])
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))
    cases = {
        "missing.png": r"rows.json row 3: image file .*missing.png does not exist",
        "truncated.png": r"rows.json row 3: cannot read image .*truncated.png",
        "text.png": r"rows.json row 3: cannot read image .*text.png: cannot identify image file",
        "bomb.png": r"rows.json row 3: cannot read image .*bomb.png: .*decompression bomb",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_image(tmp_path / name, "rows.json row 3")


def test_bombs_are_refused_by_our_own_limit_and_pils_global_is_left_alone(tmp_path):
    side = 9000  # 81 megapixels: over our 64, under PIL's own default (about 89): only our check refuses it
    assert side * side > MAX_IMAGE_PIXELS and side * side < Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_declaring(side, side))
    with pytest.raises(
        DataError,
        match=r"rows.json row 3: cannot read image .*bomb.png: it declares 9000x9000 pixels.*decompression bomb",
    ):
        load_image(tmp_path / "bomb.png", "rows.json row 3")
    # importing the reward package changes no process-wide PIL setting
    probe = (
        "from PIL import Image; d = Image.MAX_IMAGE_PIXELS; import reward.data, reward.benchmarks; assert "
        "Image.MAX_IMAGE_PIXELS == d, Image.MAX_IMAGE_PIXELS"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("F", "TIFF"),
    ],
)
def test_every_pil_mode_becomes_rgb_of_the_same_size(tmp_path, mode, fmt):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).convert(
        mode if mode not in ("I;16", "F") else "L"
    )
    if mode == "I;16":
        image = Image.fromarray((rng.random((12, 20)) * 65535).astype(np.uint16))
    if mode == "F":
        image = Image.fromarray(rng.random((12, 20)).astype(np.float32) * 1e4)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt)
    loaded = load_image(path)
    assert (loaded.mode, loaded.size) == ("RGB", (20, 12))
    assert np.asarray(loaded).std() > 0  # the content survived the conversion


def test_one_picture_at_two_bit_depths_gives_the_same_pixels(tmp_path):
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 256, (12, 20)).astype(np.uint8)
    levels[0, :2] = (40, 90)  # the picture does not span 0-255: a min/max rescale would stretch it
    levels = np.clip(levels, 40, 90)
    Image.fromarray(levels, mode="L").save(tmp_path / "8bit.png")
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode in ("I;16", "I")
    eight, sixteen = np.asarray(load_image(tmp_path / "8bit.png")), np.asarray(load_image(tmp_path / "16bit.png"))
    assert np.array_equal(eight, sixteen) and eight[..., 0].min() == 40  # same pixels, not stretched
    as_int32 = Image.fromarray(levels.astype(np.int32) * 257)  # mode I: read as 16-bit
    assert np.array_equal(np.asarray(to_rgb(as_int32)), eight)
    unit = Image.fromarray(levels.astype(np.float32) / 255)  # mode F in [0, 1]: times 255
    assert np.array_equal(np.asarray(to_rgb(unit)), eight)
    byte_range = Image.fromarray(np.where(levels > 60, 300.0, levels).astype(np.float32))  # F beyond 1: 0-255, clipped
    assert np.array_equal(np.asarray(to_rgb(byte_range))[..., 0], np.where(levels > 60, 255, levels))


def test_exif_rotation_is_the_same_through_load_image_and_image_open(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    pixels = np.random.default_rng(3).integers(0, 255, (16, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)  # lossless, so pixels compare exactly
    loaded = load_image(tmp_path / "rotated.png")
    assert loaded.size == (16, 48)
    assert np.array_equal(np.asarray(to_rgb(Image.open(tmp_path / "rotated.png"))), np.asarray(loaded))
    assert np.array_equal(np.asarray(to_rgb(loaded)), np.asarray(loaded))  # applying it twice changes nothing
    model = JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2), seed=0)
    source = Image.new("RGB", (16, 48), "white")
    via_open = model.score([source], ["make it red"], [Image.open(tmp_path / "rotated.png")])
    assert torch.equal(via_open, model.score([source], ["make it red"], [loaded]))


def test_a_1x1_image_and_exif_rotation(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    assert np.asarray(load_image(tmp_path / "dot.png")).tolist() == [[[200, 10, 10]]]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 10), "white").save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 40)


def write_pairs(tmp_path, rows, name="pairs.json"):
    for level in (10, 200):
        Image.new("RGB", (8, 8), (level,) * 3).save(tmp_path / f"g{level}.png")
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def pair(**change):
    return {"prompt": "make it red", "path_src": "g10.png", "path1": "g200.png", "path2": "g10.png", **change}


def test_malformed_data_files_name_the_file_row_and_key_or_are_skipped_and_counted(tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "x",')
    with pytest.raises(DataError, match=r"broken.json: not valid json"):
        load_pairs(tmp_path / "broken.json")
    jsonl = write_pairs(tmp_path, [pair(), '{"prompt": oops}', pair()], "rows.jsonl")
    with pytest.raises(DataError, match=r"rows.jsonl:line 2: not valid json"):
        load_pairs(jsonl)
    (tmp_path / "truncated.png").write_bytes((tmp_path / "g200.png").read_bytes()[:40])
    Image.new("RGB", (3000, 5)).save(tmp_path / "sliver.png")
    bad_rows = [
        pair(),
        {k: v for k, v in pair().items() if k != "path2"},
        pair(prompt=7),
        pair(prompt="   "),
        pair(path1="nowhere.png"),
        pair(tie_case="false"),
        pair(path2="truncated.png"),
        pair(path_src="sliver.png"),
    ]
    for row, message in [
        (bad_rows[1], r"pairs.json:row 1: missing field 'path2'"),
        (bad_rows[2], r"pairs.json:row 1: field 'prompt' should be str, got int 7"),
        (bad_rows[3], r"pairs.json:row 1: field 'prompt' is empty"),
        (bad_rows[4], r"pairs.json:row 1: path1: image file .*nowhere.png does not exist"),
        (bad_rows[5], r"pairs.json:row 1: field 'tie_case' should be bool, got str 'false'"),
        (bad_rows[6], r"pairs.json:row 1: path2: cannot read image .*truncated.png"),
        (bad_rows[7], r"pairs.json:row 1: path_src: image .*sliver.png is 3000x5 pixels: an aspect ratio over 200"),
    ]:
        with pytest.raises(DataError, match=message):
            load_pairs(write_pairs(tmp_path, [bad_rows[0], row]))
    kept, skipped = load_pairs(write_pairs(tmp_path, bad_rows, "all.json"), skip_bad=True)
    assert len(kept) == 1
    assert skipped == {
        "missing field": 1,
        "wrong type": 2,
        "empty instruction": 1,
        "missing image": 1,
        "unreadable image": 1,
        "image geometry": 1,
    }


def test_bad_prompt_files_name_the_file_and_row(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "src.png")
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))
    cases = [
        ({"not": "a list"}, r"prompts.json: expected a non-empty list of prompts"),
        ([{"path_src": "src.png"}], r"prompts.json row 0: needs a non-empty 'instruction'"),
        (
            [{"path_src": "src.png", "instruction": "x"}, {"path_src": "bomb.png", "instruction": "y"}],
            r"prompts.json row 1: cannot read image .*decompression bomb",
        ),
    ]
    for rows, message in cases:
        (tmp_path / "prompts.json").write_text(json.dumps(rows))
        with pytest.raises(DataError, match=message):
            load_prompts(tmp_path / "prompts.json", 8, 8)
    with pytest.raises(DataError, match="prompt file .*missing.json does not exist"):
        load_prompts(tmp_path / "missing.json", 8, 8)
    rows = [
        {"path_src": "src.png", "instruction": "x"},
        {"path_src": "bomb.png", "instruction": "y"},
        {"path_src": "src.png"},
        {"path_src": "src.png", "instruction": "z"},
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(rows))
    prompts, skipped = load_prompts(tmp_path / "prompts.json", 8, 8, skip_bad=True)  # data.skip_bad=true
    assert ([p.instruction for p in prompts], skipped) == (["x", "z"], 2)
    (tmp_path / "prompts.json").write_text(json.dumps(rows[1:3]))
    with pytest.raises(DataError, match=r"no usable prompt \(2 bad rows skipped\)"):
        load_prompts(tmp_path / "prompts.json", 8, 8, skip_bad=True)


def test_text_empty_overlong_and_non_ascii(tmp_path):
    model = JRM.build(JRMArgs(tiny_hidden=64, tiny_layers=2, max_instruction_tokens=32), seed=0)
    image = Image.new("RGB", (32, 32), "red")
    scores = model.score(
        [image] * 3, ["把圆圈变成红色 🎨", "rendre le cercle bleu, s'il vous plaît", "make it red"], [image] * 3
    )
    assert np.isfinite(scores.numpy()).all()
    with pytest.raises(ValueError, match="instruction 1 is empty"):
        model.score([image] * 2, ["make it red", "  "], [image] * 2)
    with pytest.raises(
        ValueError, match=r"instruction 0 has \d+ tokens, more than model.max_instruction_tokens \(32\)"
    ):
        model.score([image], ["make the circle red " * 40], [image])
    # in training data the over-long instruction is found before training, with its file and row
    path = write_pairs(tmp_path, [pair(), pair(prompt="make the circle red " * 40)])
    pairs, _ = load_pairs(path)
    with pytest.raises(DataError, match=r"pairs.json.*1.*: the instruction has \d+ tokens"):
        usable_pairs(model, pairs, skip_bad=False, what="training")
    assert len(usable_pairs(model, pairs, skip_bad=True, what="training")) == 1


TINY = ["model.tiny_hidden=64", "model.tiny_layers=2", "loss.alpha=0", "trainer.report_to=[]", "trainer.max_steps=1"]


def test_train_checks_every_image_first_and_leaves_an_existing_run_alone(tmp_path, capsys):
    rows = [pair(), pair(path1="truncated.png"), pair(path_src="sliver.png"), pair()]
    data = write_pairs(tmp_path, rows)
    (tmp_path / "truncated.png").write_bytes((tmp_path / "g200.png").read_bytes()[:40])
    Image.new("RGB", (5, 3000)).save(tmp_path / "sliver.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("an earlier run's config")
    assert train_main([f"output_dir={run_dir}", f"data.train={data}", *TINY]) == 2
    err = capsys.readouterr().err
    assert (
        re.search(r"error: .*pairs.json:row 1: path1: cannot read image .*truncated.png", err)
        and "Traceback" not in err
    )
    assert (run_dir / "config.yaml").read_text() == "an earlier run's config"
    # data.skip_bad=true: both bad rows dropped before training (not inside the DataLoader), counted by kind
    cfg = load_config(TrainConfig, None, [f"output_dir={run_dir}", f"data.train={data}", "data.skip_bad=true", *TINY])
    run = prepare(cfg)
    assert len(run.train_pairs) == 2
    assert "skipped 2 bad training rows" in capsys.readouterr().out
    assert "skip_bad: true" in (run_dir / "config.yaml").read_text()  # written once everything passed


def test_train_config_errors_exit_2_naming_the_key(capsys):
    from reward.train import DataConfig, LossConfig

    for override, message in [
        ("loss.ties=sometimes", "loss.ties must be"),
        ("loss.ranking=uncertainty", "model.uncertainty=false"),
        ("data.max_eval_pairs=-1", "data.max_eval_pairs"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train_main([override])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="loss.alpha must be in"):  # checked when built, however built
        LossConfig(alpha=1.0)
    with pytest.raises(ValueError, match="data.shapeedit_pairs"):
        DataConfig(shapeedit_pairs=0)


def test_every_test_the_reliability_tables_cite_exists():
    root = Path(__file__).resolve().parents[1]
    defined = set(
        re.findall(
            r"^(?:async )?def (test_\w+)", "\n".join(p.read_text() for p in (root / "tests").rglob("test_*.py")), re.M
        )
    )
    cited = []
    for line in (root / "docs" / "reliability.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[2] not in ("test", "---"):
            cited += re.findall(r"`([^`]+)`", cells[2])
    assert len(cited) > 20
    for name in cited:
        if name.startswith(".."):  # "..[reward-actor]": another case of the test named just above
            continue
        test = name.split("[")[0]
        if "/" in name:
            assert (root / name).is_file(), f"docs/reliability.md cites {name}, which does not exist"
        elif test.endswith(".."):  # a shortened name: some test must start with it
            assert any(d.startswith(test[:-2]) for d in defined), (
                f"docs/reliability.md cites {name}, and no test starts so"
            )
        else:
            assert test in defined, f"docs/reliability.md cites {name}, which no test in tests/ defines"
