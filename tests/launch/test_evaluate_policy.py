"""launch/evaluate_policy.py, reward/viescore.py and launch/serve_judge.py: benchmarks read in their authors' formats
(written here as fixtures: GEdit-Bench's hub parquet, ImgEdit-Bench's basic_edit.json), the VIEScore arithmetic by
hand, tiny FLUX.1 Kontext and Qwen-Image-Edit policies judged by a tiny VLM behind a real chat-completions server on
127.0.0.1, and paired comparisons of checkpoints."""

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.evaluate_policy import load_benchmark, load_policy_checkpoint, main, summarise
from launch.serve_judge import make_server
from reward.config import load_config
from reward.data import DataError
from reward.viescore import ChatJudge, combine, parse_scores, pq_prompt, sc_prompt, viescore
from rl.config import RLConfig

ROOT = Path(__file__).resolve().parents[2]
GEDIT_ROWS = [  # key, task_type, language, intersection
    ("a1", "background_change", "en", True),
    ("a2", "background_change", "en", False),
    ("a3", "subject-add", "en", True),
    ("b1", "background_change", "cn", True),
    ("b2", "color_alter", "cn", False),
]


def picture(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_gedit(folder) -> None:
    """GEdit-Bench as the hub serves it: parquet under data/, an Image feature per image column."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "key": Value("string"),
            "task_type": Value("string"),
            "instruction": Value("string"),
            "instruction_language": Value("string"),
            "input_image": ImageFeature(),
            "input_image_raw": ImageFeature(),
            "Intersection_exist": Value("bool"),
        }
    )
    rows = {name: [] for name in features}
    for i, (key, task, language, intersection) in enumerate(GEDIT_ROWS):
        rows["key"].append(key)
        rows["task_type"].append(task)
        rows["instruction"].append(f"edit number {i}" if language == "en" else f"编辑 {i}")
        rows["instruction_language"].append(language)
        rows["input_image"].append(picture(i))
        rows["input_image_raw"].append(picture(i, (80, 96)))
        rows["Intersection_exist"].append(intersection)
    (folder / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(folder / "data" / "train-00000-of-00001.parquet")


def write_imgedit(folder) -> None:
    """ImgEdit-Bench's Benchmark/Basic/basic_edit.json, its images under their ids."""
    (folder / "animal").mkdir(parents=True)
    rows = {}
    for i, kind in enumerate(("add", "remove", "adjust")):
        picture(10 + i).save(folder / "animal" / f"00000{i}.jpg")
        rows[str(100 + i)] = {"id": f"animal/00000{i}.jpg", "prompt": f"{kind} something", "edit_type": kind}
    (folder / "basic_edit.json").write_text(json.dumps(rows))


class ScriptedJudge:
    """A judge whose answers are fixed by the question, for arithmetic checked by hand."""

    def __init__(self, sc: str, pq: str):
        self.sc, self.pq = sc, pq
        self.seen = []

    def ask(self, images, prompt):
        self.seen.append((len(images), prompt))
        return self.sc if "Editing instruction:" in prompt else self.pq


def test_viescore_arithmetic_by_hand():
    assert parse_scores('Sure. {"score": [7, 9], "reasoning": "the sky\nis blue"} done') == [7.0, 9.0]
    assert parse_scores("[3, 8]") == [3.0, 8.0]  # a bare list, as the published parser accepts
    for bad in ("no scores", '{"score": [7]}', '{"score": [11, 2]}', '{"score": [7, "x"]}', "{broken json}"):
        assert parse_scores(bad) is None, bad
    scores = combine([7, 9], [8, 6])
    assert scores["SC"] == 7 and scores["PQ"] == 6 and scores["O"] == pytest.approx(math.sqrt(42))
    assert combine(None, [8, 6]) == {"SC": None, "PQ": 6, "O": None}
    judge = ScriptedJudge('{"score": [4, 10], "reasoning": "r"}', '{"score": [9, 8], "reasoning": "q"}')
    source, edit = picture(0), picture(1, (20, 24))
    verdict = viescore(judge, source, "make it red", edit)
    assert (verdict.SC, verdict.PQ, verdict.O) == (4, 8, pytest.approx(math.sqrt(32)))
    # SC sees source and edit with the instruction last, PQ the edit alone
    assert judge.seen == [(2, sc_prompt("make it red")), (1, pq_prompt())]
    assert sc_prompt("make it red").endswith("Editing instruction: make it red")


def test_summary_averages_as_gedit_does_by_hand():
    """Per language: each task type's mean, then their mean (macro); the intersection subset the same way."""
    values = {"a1": 2.0, "a2": 4.0, "a3": 9.0, "b1": 5.0, "b2": None}  # b2: the judge's answer did not parse
    records = [
        {
            "key": key,
            "task_type": task,
            "language": language,
            "intersection": intersection,
            "scores": {"O": values[key]},
            "samples": [{"O": values[key]}],
        }
        for key, task, language, intersection in GEDIT_ROWS
    ]
    s = summarise(records, ["O"])["O"]
    assert s["mean"] == pytest.approx((2 + 4 + 9 + 5) / 4) and s["unparsed"] == 1
    en = s["by_language"]["en"]
    assert en["by_task"] == {"background_change": 3.0, "subject-add": 9.0} and en["macro"] == pytest.approx(6.0)
    assert s["by_language"]["cn"]["macro"] == pytest.approx(5.0)  # color_alter has no score
    assert s["intersection"]["en"]["macro"] == pytest.approx((2.0 + 9.0) / 2)


def test_benchmarks_load_in_their_authors_formats(tmp_path):
    write_gedit(tmp_path / "gedit")
    rows = load_benchmark(f"gedit:{tmp_path / 'gedit'}", None, 0)
    assert [(r.key, r.task_type, r.language, r.intersection) for r in rows] == GEDIT_ROWS
    assert rows[0].source.size == (40, 48) and rows[3].instruction == "编辑 3"
    write_imgedit(tmp_path / "imgedit")
    rows = load_benchmark(f"imgedit:{tmp_path / 'imgedit' / 'basic_edit.json'}", None, 2)
    assert [(r.key, r.task_type, r.instruction) for r in rows] == [
        ("100", "add", "add something"),
        ("101", "remove", "remove something"),
    ]
    with pytest.raises(DataError, match="no parquet files"):
        load_benchmark(f"gedit:{tmp_path}/nothing", None, 0)
    (tmp_path / "bad.json").write_text(json.dumps({"1": {"id": "x.jpg", "prompt": "p"}}))
    with pytest.raises(DataError, match="needs string fields id, prompt and edit_type"):
        load_benchmark(f"imgedit:{tmp_path / 'bad.json'}", None, 0)


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """A tiny Qwen2-VL judge saved as a model folder and served over chat completions on 127.0.0.1."""
    from reward.backbone import build_tiny
    from reward.viescore import LocalJudge

    folder = tmp_path_factory.mktemp("judge") / "tiny-vlm"
    model, processor = build_tiny(hidden=64, layers=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    server = make_server(LocalJudge(folder, max_new_tokens=8), "tiny-judge")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_the_server_speaks_chat_completions_and_refuses_bad_requests(judge_server):
    import urllib.error
    import urllib.request

    folder, url = judge_server
    client = ChatJudge(url, "tiny-judge")
    answer = client.ask([picture(0), picture(1)], "Describe")
    assert isinstance(answer, str) and answer == client.ask([picture(0), picture(1)], "Describe")  # greedy
    from reward.viescore import LocalJudge

    assert answer == LocalJudge(folder, max_new_tokens=8).ask([picture(0), picture(1)], "Describe")  # same judge
    for body, message in (
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, "serves model 'tiny-judge'"),
        ({"messages": []}, "non-empty list"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "no downloads",
        ),
    ):
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 400 and message in e.value.read().decode()


def save_tiny_pipeline(kind: str, folder) -> None:
    if kind == "flux_kontext":
        from diffusers import FluxKontextPipeline

        from policies.kontext import tiny_components

        FluxKontextPipeline(**tiny_components(seed=0)).save_pretrained(folder)
    else:
        from diffusers import QwenImageEditPipeline

        from policies.qwen_image_edit import tiny_components

        QwenImageEditPipeline(**tiny_components(seed=0)).save_pretrained(folder)
        # the released checkpoint names transformers' processor class; the tiny one is this project's subclass
        index = json.loads((folder / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["flux_kontext", "qwen_image_edit"])
def test_tiny_policies_on_gedit_judged_over_http_repeat_and_compare(kind, judge_server, tmp_path):
    _, url = judge_server
    write_gedit(tmp_path / "gedit")
    save_tiny_pipeline(kind, tmp_path / "policy")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"policy:\n  kind: {kind}\n  path: {tmp_path / 'policy'}\n  height: 32\n  width: 32\n"
        + "  eval_denoising_steps: 2\n"
        + ("  sampler:\n    guidance: 2.5\n" if kind == "flux_kontext" else "  options: {condition_area: 1024}\n")
    )
    args = ["--config", str(config), "--benchmark", f"gedit:{tmp_path / 'gedit'}", "--limit", "3", "--samples", "2"]
    args += ["--scorer", f"judge=viescore:{url}#tiny-judge", "--scorer", "preservation"]
    assert main([*args, "--checkpoint", "base", "--checkpoint", "base", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    first = json.loads((tmp_path / "a" / "base-a" / "results.json").read_text())
    again = json.loads((tmp_path / "b" / "base" / "results.json").read_text())
    assert first == {**again, "checkpoint": "base"}  # deterministic given seeds
    record = first["prompts"][0]
    assert record["seed"] == 0 and len(record["samples"]) == 2 and record["task_type"] == "background_change"
    assert isinstance(record["samples"][0]["judge/sc_text"], str) and 0 < record["scores"]["preservation"] <= 1
    summary = json.loads((tmp_path / "a" / "base-a" / "summary.json").read_text())["metrics"]
    assert set(summary) == {"judge/SC", "judge/PQ", "judge/O", "preservation"}
    assert summary["preservation"]["by_language"]["en"]["by_task"].keys() == {"background_change", "subject-add"}
    assert Image.open(tmp_path / "a" / "base-a" / "grid.png").size == (3 * 128, 3 * 128)  # source | 2 edits, 3 rows
    comparison = json.loads((tmp_path / "a" / "comparison.json").read_text())["metrics"]["preservation"]
    assert comparison["mean"] == 0.0 and "no difference resolved" in comparison["sentence"]  # one checkpoint twice


def test_shapeedit_checkpoints_with_the_oracle_and_bad_requests_refused_first(tmp_path, capsys):
    import dataclasses

    from policies.adapters import TrainableConfig
    from policies.shapeedit import ShapeEditPolicy
    from reward.shapeedit import GenerateConfig, generate
    from tests.policies.test_shapeedit_policy import TINY

    data = tmp_path / "data"
    generate(GenerateConfig(out=str(data), pairs=120, seed=0), progress=False)
    instructions = [
        r["instruction"]
        for s in ("train", "test_heldout")
        for r in json.loads((data / f"{s}_prompts.json").read_text())
    ]
    ShapeEditPolicy.build(dataclasses.replace(TINY, image_size=64), instructions, seed=0).save_pretrained(
        tmp_path / "policy"
    )
    # an RL checkpoint: the trainable weights moved, as a learner writes them
    trained = ShapeEditPolicy.from_pretrained(tmp_path / "policy", trainable=TrainableConfig(lora_rank=4, lora_alpha=8))
    state = {
        k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in trained.trainable_state().items()
    }
    from safetensors.torch import save_file

    step = tmp_path / "run" / "checkpoints" / "step-000005"
    step.mkdir(parents=True)
    save_file(state, str(step / "policy.safetensors"))
    (step / "state.json").write_text(json.dumps({"step": 5, "policy_version": 5}))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"policy:\n  path: {tmp_path / 'policy'}\n  eval_denoising_steps: 3\n"
        + "  trainable:\n    lora_rank: 4\n    lora_alpha: 8.0\n"
    )
    base = [
        "--config",
        str(config),
        "--benchmark",
        f"shapeedit:{data}@train",
        "--limit",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--scorer", f"oracle:{data}", "--checkpoint", "base", "--checkpoint", str(step)]) == 0
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert comparison["labels"] == ["base", "step-000005"] and comparison["metrics"]["oracle"]["prompts"] == 4
    before = json.loads((tmp_path / "out" / "base" / "results.json").read_text())["prompts"]
    assert before[0]["key"] == "train-000000" and before[0]["task_type"].split("+")[0] in {
        "recolour",
        "remove",
        "add",
        "move",
        "resize",
        "background",
        "swap",
    }
    cfg = load_config(RLConfig, config, [])
    loaded = load_policy_checkpoint(cfg, str(step)).trainable_state()  # the RL checkpoint's weights, as saved
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    capsys.readouterr()
    for extra, message in (
        (["--scorer", "nothing:here"], "not a reward spec"),
        (["--scorer", "viescore:ftp://x"], "viescore:JUDGE"),
        (["--scorer", "oracle:" + str(data), "--checkpoint", str(tmp_path / "none")], "no such folder"),
        (["--scorer", "preservation", "--samples", "0"], "--samples must be >= 1"),
        (["--scorer", "preservation", "--checkpoint", "base"] * 3, "one, or two for a comparison"),
    ):
        assert main([*base[:-2], "--out", str(tmp_path / "refused"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    gedit = ["--config", str(config), "--benchmark", f"gedit:{tmp_path}", "--out", str(tmp_path / "refused")]
    assert main([*gedit, "--scorer", f"oracle:{data}"]) == 2 and "ShapeEdit edits only" in capsys.readouterr().err


def test_an_rl_checkpoint_scores_exactly_as_its_runs_evaluation(tmp_path):
    """With --noise rl, the run's config and its eval prompts, evaluate_policy repeats the run's own evaluations:
    each prompt's gold at step 0 (base) and at the last step (its checkpoint) is the run's, so the paired difference
    is the run's gold gain."""
    import shutil

    from reward.shapeedit import GenerateConfig, generate
    from tests.rl.runs import assert_learned, run_in_process

    # the shipped policy, whose ODE edits depend on the noise (it draws a decision code per edit), on 64 px prompts
    root = tmp_path / "root"
    shutil.copytree(ROOT / "assets" / "shapeedit_policy", root / "policy")
    data = root / "data"
    generate(GenerateConfig(out=str(data), pairs=120, seed=0), progress=False)
    from rl.learner import DISTRIBUTED_ENV

    environ = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    run = run_in_process(
        root,
        tmp_path / "run",
        "policy.height=64",
        "policy.width=64",
        "policy.trainable.lora_rank=4",
        "policy.eval_samples=2",
        f"data.eval_prompts={data / 'train_prompts.json'}",
    )  # 4 prompts x 2 samples: two micro-batches of one generator
    assert_learned(run)
    # the in-process learner left the environment as it found it (a later Trainer would otherwise run DDP)
    assert {k: os.environ.get(k) for k in DISTRIBUTED_ENV} == environ
    args = ["--config", str(run / "config.yaml"), "--benchmark", f"shapeedit:{data}@train", "--limit", "4"]
    args += ["--noise", "rl", "--scorer", f"gold=oracle:{data}", "--out", str(tmp_path / "eval")]
    assert main([*args, "--checkpoint", "base", "--checkpoint", str(run / "checkpoints" / "step-000003")]) == 0
    for label, step in (("base", 0), ("step-000003", 3)):
        ours = json.loads((tmp_path / "eval" / label / "results.json").read_text())["prompts"]
        theirs = json.loads((run / "eval" / f"scores-step-{step:06d}.json").read_text())
        assert [r["instruction"] for r in ours] == theirs["instructions"]
        assert [r["scores"]["gold"] for r in ours] == pytest.approx(theirs["gold"], abs=1e-6)
        assert len(set(theirs["gold"])) > 1  # the edits differ by prompt: the noise and the weights matter
    gain = json.loads((tmp_path / "eval" / "comparison.json").read_text())["metrics"]["gold"]["mean"]
    first, last = (json.loads((run / "eval" / f"scores-step-{s:06d}.json").read_text())["gold"] for s in (0, 3))
    assert gain == pytest.approx(np.mean(last) - np.mean(first), abs=1e-6)
