"""Online reward refresh: a JRM term keeps learning from labelled pairs of the policy's current samples.

Every `reward.refresh.every` RL steps the driver picks pairs of the step's rollouts (`select_pairs`), and the
reward trainer (`RewardTrainer`, a Ray actor beside node 0's reward actor, or a plain object in process):
    labels them (`Labeller`: the ShapeEdit oracle, a judge model, or a file queue for people)
    -> measures the current reward's accuracy on the new labels, before it trains on them
    -> adds them to the replay buffer (run_dir/refresh/pairs.jsonl and their images)
    -> trains the JRM for `steps` steps on the buffer mixed with its original data, with reward/train.py's loss
    -> hands back the new weights, which every reward actor loads as the next version between RL steps.
The buffer, the optimizer and the version go into every checkpoint, so resume=auto continues a refreshed run
exactly (labels from people excepted: they arrive when they arrive).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from policies.images import tensor_to_images
from reward.config import build, parse_yaml
from reward.data import DataError, PairCollator, PreferencePair, load_pairs, parse_pair
from reward.evaluate import OracleReward
from reward.generative import GenerativeJudge, parse_verdict
from reward.losses import LossConfig, joint_loss, pairwise_accuracy
from reward.model import JRM
from reward.shapeedit.samples import label_samples
from rl.config import RLConfig
from rl.prompts import Prompt

LATEST = "latest"
"""run_dir/refresh/latest names the folder of the trainer's state after its last refresh (what a restarted actor
takes back)."""


# ---- which pairs ----------------------------------------------------------------------------------------------------


def select_pairs(scores: list[float], group_ids: Tensor, n: int, rule: str, seed: int) -> list[tuple[int, int]]:
    """Up to n pairs of rows of one group each, taken round-robin over the groups (so a cut keeps every group).

    'top': in each group, the row the reward ranks first against rows spread evenly over the rest of its ranking,
    lowest first: the edits RL is about to reinforce, checked where a reward that is wrong does the most harm. Rows
    scored alike (to float precision) count once: one edit sampled twice.
    'random': distinct pairs drawn uniformly in each group (seeded).

    Args:
        scores: (B,) the refreshed term's score of each row.
        group_ids: (B,) rows with one id are samples of one prompt.
    Returns:
        (i, j) row pairs, i != j.
    """
    groups = [torch.nonzero(group_ids == g).flatten().tolist() for g in torch.unique(group_ids).tolist()]
    per_group = math.ceil(n / max(len(groups), 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for rows in groups:
        if len(rows) < 2:
            chosen.append([])
            continue
        k = min(per_group, len(rows) - 1)
        if rule == "top":
            ranked = sorted(rows, key=lambda r: (-scores[r], r))
            # rows the reward scores alike are one edit sampled twice (a pair of them compares nothing): one each
            top, *rest = [
                r for i, r in enumerate(ranked) if not i or not math.isclose(scores[r], scores[ranked[i - 1]])
            ]
            picks = sorted({int(round(x)) for x in np.linspace(len(rest) - 1, 0, min(k, len(rest)))}, reverse=True)
            chosen.append([(top, rest[p]) for p in picks])
        else:
            every = [(a, b) for x, a in enumerate(rows) for b in rows[x + 1 :]]
            chosen.append([every[p] for p in rng.choice(len(every), size=k, replace=False)])
    return [pairs[k] for k in range(per_group) for pairs in chosen if k < len(pairs)][:n]


# ---- labellers ------------------------------------------------------------------------------------------------------


@dataclass
class PairToLabel:
    """One pair of samples of one prompt, as the labeller sees it."""

    source: Image.Image
    instruction: str
    a: Image.Image
    b: Image.Image
    proxy: tuple[float, float]  # the refreshed reward's scores of a and b when they were sampled


def save_png(image: Image.Image, path: Path) -> str:
    """Save; returns the absolute path (rows are read back from any working directory)."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def pair_row(
    key: str, pair: PairToLabel, paths: tuple[str, str, str], scores, critiques, origin: str, tie_eps: float
) -> dict:
    """An EditReward-Data row of a judged pair, the better first (`tie_case` within tie_eps), carrying the
    reward's scores of each side as proxy1/proxy2 (the on-policy accuracy is read off them)."""
    first = 0 if scores[0] >= scores[1] else 1
    order = (first, 1 - first)
    row = {"id": key, "origin": origin, "prompt": pair.instruction, "path_src": paths[0]}
    for slot, i in zip(("1", "2"), order):
        row[f"path{slot}"] = paths[1 + i]
        row[f"rationale{slot}"] = critiques[i]
        row[f"proxy{slot}"] = pair.proxy[i]
        row[f"label{slot}_score"] = scores[i]
    row["tie_case"] = bool(abs(scores[0] - scores[1]) < tie_eps)
    return row


class OracleLabeller:
    """The exact ShapeEdit judge, with the grounded critique of each sample (reward/shapeedit/samples.py)."""

    def __init__(self, data_dir: str, tie_eps: float):
        self.oracle = OracleReward(data_dir)
        self.tie_eps = tie_eps

    def label(self, pairs: list[PairToLabel], out: Path, key: str, known: set[str]) -> tuple[list[dict], int]:
        """(the labelled rows, labels asked); `known` (the buffer's ids) matters only to the queue."""
        rows, asked = [], 0
        for k, pair in enumerate(pairs):
            prompt = self.oracle.prompt_row(pair.source, pair.instruction)
            stem = f"images/{key}/p{k:03d}"
            labelled, _ = label_samples(prompt, [pair.a, pair.b], out, stem, "refresh", self.tie_eps)
            if not labelled:  # the trainer sends no pair of one edit twice, so every pair gives a row
                raise RuntimeError(f"the oracle gave no row for pair {k} of {key}")
            asked += 1
            row = labelled[0]
            flipped = row["path1"].endswith("_s1.png")
            row["id"] = f"{key}-p{k:03d}"
            row["proxy1"], row["proxy2"] = pair.proxy[::-1] if flipped else pair.proxy
            rows.append(row)
        return rows, asked


class JudgeLabeller:
    """A judge model (`generative:PATH`, reward/generative.py) decodes a critique of each side; its verdicts
    decide the pair and its critiques become the JRM's targets. A pair with a verdict missing is not labelled."""

    def __init__(self, path: str, device: str, tie_eps: float):
        self.judge = GenerativeJudge(JRM.from_pretrained(path).to(device).eval())
        self.tie_eps = tie_eps

    def label(self, pairs: list[PairToLabel], out: Path, key: str, known: set[str]) -> tuple[list[dict], int]:
        rows = []
        for k, pair in enumerate(pairs):
            critiques = self.judge.critique([pair.source] * 2, [pair.instruction] * 2, [pair.a, pair.b])
            scores = [parse_verdict(c) for c in critiques]
            if None in scores:
                continue
            stem = out / "images" / key / f"p{k:03d}"
            paths = tuple(save_png(im, Path(f"{stem}_{s}.png")) for s, im in zip("sab", (pair.source, pair.a, pair.b)))
            rows.append(pair_row(f"{key}-p{k:03d}", pair, paths, scores, critiques, "judge", self.tie_eps))
        return rows, len(pairs)


class QueueLabeller:
    """Pairs for people. Each pair asked goes to DIR/pending/ID.json with its three PNGs (ID names the run, the step
    and the pair, so runs sharing DIR never mix); a label is DIR/labels/ID.json, {"preferred": "a" | "b" | "tie",
    "critique_a": "...", "critique_b": "..."} (critiques optional). Every refresh collects, in the order of their
    ids, the labels of this run's pairs that its buffer does not hold yet: the run never waits, and a resume that
    cut the buffer back collects them again. Files are never moved or deleted. A label file that cannot be read is
    reported once and left for a person to mend."""

    def __init__(self, folder: str):
        self.folder = Path(folder).resolve()
        for sub in ("pending", "labels"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.bad: set[str] = set()

    def label(self, pairs: list[PairToLabel], out: Path, key: str, known: set[str]) -> tuple[list[dict], int]:
        for k, pair in enumerate(pairs):
            pid = f"{key}-p{k:03d}"
            stem = self.folder / "pending" / pid
            paths = [save_png(im, Path(f"{stem}_{s}.png")) for s, im in zip("sab", (pair.source, pair.a, pair.b))]
            entry = {"id": pid, "instruction": pair.instruction, "source": paths[0], "a": paths[1], "b": paths[2]}
            entry["proxy"] = list(pair.proxy)
            (self.folder / "pending" / f"{pid}.json").write_text(json.dumps(entry, indent=1))
        return self.collect(key.split("-step-")[0], known), len(pairs)

    def collect(self, run: str, known: set[str]) -> list[dict]:
        """The readable labels of run `run`'s pairs whose ids are not in `known` (the buffer's)."""
        rows = []
        for label_file in sorted((self.folder / "labels").glob(f"{run}-*.json")):
            pending = self.folder / "pending" / label_file.name
            if label_file.stem in known or not pending.is_file():
                continue
            entry = json.loads(pending.read_text())
            try:
                label = json.loads(label_file.read_text())
                choice = label["preferred"]
                if choice not in ("a", "b", "tie"):
                    raise ValueError(f"preferred must be a, b or tie, got {choice!r}")
                critiques = [label.get("critique_a"), label.get("critique_b")]
            except (ValueError, KeyError, TypeError) as e:
                if label_file.name not in self.bad:
                    print(f"refresh: {label_file}: {type(e).__name__}: {e} (left unread)", flush=True)
                    self.bad.add(label_file.name)
                continue
            scores = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}[choice]
            pair = PairToLabel(None, entry["instruction"], None, None, tuple(entry["proxy"]))
            paths = (entry["source"], entry["a"], entry["b"])
            rows.append(pair_row(entry["id"], pair, paths, scores, critiques, "human", 0.0))
            rows[-1]["tie_case"] = choice == "tie"
        return rows


def build_labeller(spec: str, device: str, tie_eps: float):
    """reward.refresh.labeller -> a labeller (the config checked its form); people's "tie" is their own."""
    kind, _, path = spec.partition(":")
    if kind == "oracle":
        return OracleLabeller(path, tie_eps)
    if kind == "generative":
        return JudgeLabeller(path, device, tie_eps)
    return QueueLabeller(path)


# ---- the reward trainer ---------------------------------------------------------------------------------------------


@dataclass
class RefreshRequest:
    """What the driver sends at a refresh: the chosen pairs, located in the step's micro-batches."""

    step: int  # the RL steps done
    prompts: list[Prompt]  # one per pair
    rows: list[tuple[tuple[int, int], tuple[int, int]]]  # per pair, (micro-batch, row in it) of its two samples
    proxy: list[tuple[float, float]]  # per pair, the refreshed term's scores of its two samples
    micro: list  # the micro-batches the pairs point into: rollouts, or references to them
    train: bool = True  # False after the last RL step: label and measure, no training nothing would use


def refresh_loss(model_path: str, alpha: float | None) -> LossConfig:
    """The loss the model was trained with (the config.yaml of its reward/train.py run: the model's folder or the
    one above), alpha replaced when given; without that file, reward/train.py's defaults with `alpha`, which must
    then be given."""
    for folder in (Path(model_path), Path(model_path).parent):
        if (folder / "config.yaml").is_file():
            run_config = parse_yaml((folder / "config.yaml").read_text())
            if "loss" not in run_config:
                if alpha is None:
                    raise ValueError(
                        f"reward.refresh: {folder / 'config.yaml'} is not a reward/train.py config (it has no loss "
                        f"section), so the loss the model was trained with is unknown; set reward.refresh.alpha"
                    )
                return LossConfig(alpha=alpha)
            loss = build(LossConfig, run_config["loss"], "loss.")
            return loss if alpha is None else dataclasses.replace(loss, alpha=alpha)
    if alpha is None:
        raise ValueError(
            f"reward.refresh: no config.yaml of a reward/train.py run at {model_path} or above it, so the loss the "
            f"model was trained with is unknown; set reward.refresh.alpha"
        )
    return LossConfig(alpha=alpha)


class RewardTrainer:
    """Labels, remembers and trains (module docstring). A plain class: Ray wraps it in rl/ray_actors.py."""

    def __init__(
        self,
        cfg: RLConfig,
        device: str = "cpu",
        threads: int = 0,
        fetch: Callable | None = None,
        restarted: Callable[[], bool] | None = None,
    ):
        """`fetch`: how to read the request's micro-batches when they are references (Ray's object store).
        `restarted`: tells a trainer that Ray restarted after a crash, which takes back its state as of its last
        refresh (run_dir/refresh/latest) so the driver can ask again for the refresh it was doing."""
        if threads:
            torch.set_num_threads(threads)
        r = cfg.reward.refresh
        self.cfg, self.seed, self.device, self.fetch = r, cfg.seed, device, fetch
        path = next(t.spec for t in cfg.reward.terms if t.name == r.term).removeprefix("jrm:")
        self.loss = refresh_loss(path, r.alpha)
        self.model = JRM.from_pretrained(path).to(device).train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=r.lr, weight_decay=0.0)
        self.collate = PairCollator(self.model, self.loss.alpha > 0)
        self.labeller = build_labeller(r.labeller, device, r.tie_eps)
        self.dir = Path(cfg.output_dir) / "refresh"
        self.original = load_pairs(r.original_data, progress=False)[0] if r.original_data else []
        self.rows: list[dict] = []  # the replay buffer, in the order labelled
        self.strict: list[PreferencePair] = []  # its strict pairs, parsed: what training draws from
        self.version = 0
        self.labels_asked = 0
        self.run = uuid.uuid4().hex[:8]  # names this run's pairs (a queue folder may serve several runs)
        self.last: tuple[int, dict] = (-1, {})  # the step and metrics of the last refresh done
        if restarted is not None and restarted():
            latest = latest_folder(self.dir)
            if latest is not None:
                self.load(latest)
            else:  # died in the run's first refresh: what it had labelled is labelled again
                (self.dir / "pairs.jsonl").unlink(missing_ok=True)

    # ---- a refresh ----------------------------------------------------------------------------------------------

    def refresh(self, request: RefreshRequest) -> dict:
        """Label the request's pairs (within the budget), measure, remember, train; returns the refresh/* metrics
        (the reward actors load `trainable_state()` as `version` when `refresh/trained` is 1)."""
        if request.step == self.last[0]:  # done before a crash took the answer: asked again after the restart
            return self.last[1]
        start = time.perf_counter()
        take = min(len(request.prompts), self.cfg.budget - self.labels_asked)
        micro = request.micro
        if self.fetch is not None and take > 0:
            micro, lost, _ = self.fetch(micro)
            if lost:
                raise RuntimeError(f"refresh at step {request.step}: the rollouts were lost ({lost})")
        pairs = [
            PairToLabel(p.source, p.instruction, *(sample(micro, m, i) for m, i in where), proxy)
            for p, where, proxy in list(zip(request.prompts, request.rows, request.proxy))[:take]
        ]
        pairs = [
            p for p in pairs if not np.array_equal(np.asarray(p.a), np.asarray(p.b))
        ]  # one edit twice: no question
        known = {r["id"] for r in self.rows}
        key = f"{self.run}-step-{request.step:06d}"
        rows, asked = self.labeller.label(pairs, self.dir, key, known) if pairs else ([], 0)
        if not pairs and isinstance(self.labeller, QueueLabeller):
            rows = self.labeller.collect(self.run, known)  # people's labels still arrive after the budget is spent
        self.labels_asked += asked
        strict = [r for r in rows if not r["tie_case"]]
        metrics = {
            "refresh/labels_asked": self.labels_asked,
            "refresh/new_labels": len(rows),
            "refresh/new_ties": len(rows) - len(strict),
            # the reward that scored the rollouts, judged on their labels before it trains on them
            "refresh/accuracy_before": float(np.mean([on_policy_agreement(r) for r in strict]))
            if strict
            else float("nan"),
        }
        self.remember(rows)
        trained = bool(strict) and self.cfg.steps > 0 and request.train
        if trained:
            metrics.update(self.train(request.step))
            self.version += 1
        metrics.update(
            {
                "refresh/trained": int(trained),
                "refresh/version": self.version,
                "refresh/buffer": len(self.rows),
                "perf/refresh_s": time.perf_counter() - start,
            }
        )
        self.last = (request.step, metrics)
        self.save_latest()
        return metrics

    def remember(self, rows: list[dict]) -> None:
        """Append to the buffer and its file (a bad row stops here, not in training); the strict pairs are kept parsed
        for training."""
        self.strict += [parse_pair(r, r["id"], self.dir) for r in rows if not r["tie_case"]]
        self.rows += rows
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "pairs.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def train(self, step: int) -> dict:
        """`steps` AdamW steps of reward/train.py's joint loss; each batch mixes the buffer's strict pairs with
        the original data (original_fraction of it), drawn with a seed of (run seed, step): a resumed run draws
        the same batches."""
        rng = np.random.default_rng([self.seed, step])
        torch.manual_seed(self.seed * 1_000_003 + step)
        n_old = round(self.cfg.batch_size * self.cfg.original_fraction) if self.original else 0
        losses, accuracies = [], []
        for _ in range(self.cfg.steps):
            batch = [self.strict[i] for i in rng.integers(len(self.strict), size=self.cfg.batch_size - n_old)]
            batch += [self.original[i] for i in rng.integers(len(self.original), size=n_old)] if n_old else []
            inputs = {k: v.to(self.device) for k, v in self.collate(batch).items()}
            ties = inputs["ties"]
            out = joint_loss(self.model, inputs, self.loss)
            self.optimizer.zero_grad()
            out.loss.backward()
            self.optimizer.step()
            losses.append(float(out.loss.detach()))
            accuracies.append(pairwise_accuracy(out.chosen, out.rejected, ties))
        return {"refresh/loss": float(np.mean(losses)), "refresh/train_accuracy": float(np.nanmean(accuracies))}

    def trainable_state(self) -> dict[str, np.ndarray]:
        """What the reward actors load: the trained tensors by parameter name."""
        return {n: p.detach().float().cpu().numpy().copy() for n, p in self.params.items()}  # numpy has no bf16

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """The trained tensors, the optimizer state and the buffer's length, into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, folder / "reward.safetensors")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        state = {
            "version": self.version,
            "labels_asked": self.labels_asked,
            "buffer": len(self.rows),
            "last": self.last,
            "run": self.run,
        }
        (folder / "refresh.json").write_text(json.dumps(state))

    def load(self, folder: str | Path) -> int:
        """Restore what `save` wrote and cut the buffer file back to its length then (rows written by steps
        after the checkpoint are redone); returns the version."""
        folder = Path(folder)
        state = json.loads((folder / "refresh.json").read_text())
        tensors = load_file(folder / "reward.safetensors")
        if tensors.keys() != self.params.keys():
            raise ValueError(
                f"{folder}: its reward tensors are not the trainable ones of {self.cfg.term!r}'s model: resume with"
                f" the reward term (spec and LoRA settings) the run was started with"
            )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        log = self.dir / "pairs.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if len(rows) < state["buffer"]:
            raise DataError(
                f"{log} holds {len(rows)} labelled pairs; the checkpoint {folder} needs {state['buffer']}: put back "
                f"the run's refresh/ folder, or start a new run"
            )
        self.rows = rows[: state["buffer"]]
        self.strict = [parse_pair(r, r["id"], self.dir) for r in self.rows if not r["tie_case"]]
        log.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.version, self.labels_asked, self.last = state["version"], state["labels_asked"], tuple(state["last"])
        self.run = state["run"]
        if folder != latest_folder(self.dir):  # a resume: what a restart would take back is now this checkpoint
            self.save_latest()
        return self.version

    def save_latest(self) -> None:
        """`save` into refresh/state-N, then point refresh/latest at it (an atomic rename: a restarted actor never
        reads a half-written state); the state before it is kept for a reader that has just read the old pointer."""
        name = f"state-{self.last[0]:06d}"
        self.save(self.dir / name)
        previous = latest_folder(self.dir)
        pointer = self.dir / f"{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.dir / LATEST)
        keep = {name} | ({previous.name} if previous is not None else set())
        for old in self.dir.glob("state-*"):  # the current state and the one the old pointer named, nothing else
            if old.name not in keep:
                shutil.rmtree(old)


def latest_folder(refresh_dir: Path) -> Path | None:
    """The folder refresh_dir/latest points at (the trainer's state after its last refresh), or None."""
    pointer = refresh_dir / LATEST
    return refresh_dir / pointer.read_text() if pointer.is_file() else None


def latest_weights(run_dir: str | Path) -> dict[str, Tensor] | None:
    """The refreshed tensors of a run's last refresh (None before its first): what a reward actor
    that Ray restarted loads, so it never scores with an older version than the others."""
    folder = latest_folder(Path(run_dir) / "refresh")
    if folder is None:
        return None
    return load_file(folder / "reward.safetensors")


def sample(micro: list, m: int, i: int) -> Image.Image:
    """Row i of micro-batch m's edits, as an image."""
    return tensor_to_images(micro[m].edited_images[i : i + 1])[0]


def on_policy_agreement(row: dict) -> float:
    """1 when the reward scored the preferred side higher, 1/2 on a tie of scores, else 0."""
    return float(np.sign(row["proxy1"] - row["proxy2"]) + 1) / 2
