"""VIEScore for image editing: a VLM judge's semantic consistency (SC) and perceptual quality (PQ), as GEdit-Bench
and the papers that report it judge an editor (VIEScore, arXiv 2312.14867; GEdit-Bench, Step1X-Edit).

The protocol as its authors publish it: two questions to the judge, each answered as JSON
`{"score": [a, b], "reasoning": "..."}` on a 0-10 scale. SC shows the source then the edit with the instruction
and asks for editing success and over-editing; PQ shows the edit alone and asks for naturalness and artifacts.
SC = min of its two scores, PQ = min of its two, overall O = sqrt(SC x PQ), all on 0-10 (no rescaling). The
prompts below follow the published structure (a role and output format, the two-image rule, the scale and what
each score means, the instruction last) in this project's words; scores move with the judge and its prompt, so
every result records both (docs/evaluation.md).

Judges sit behind one seam, `ask(images, prompt) -> text`: `vlm:PATH` runs a Qwen-VL model folder in process
(reward/backbone.py's loading path), an `http(s)://HOST/v1[#MODEL]` spec calls an OpenAI-compatible
chat-completions endpoint (vLLM serving Qwen2.5-VL-72B-Instruct, GPT-4.1, or launch/serve_judge.py).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

CONTEXT = (
    "You are a professional digital artist. You will judge the quality of AI-generated images by the rules "
    "below. Your answer must be a JSON object and nothing else, in this form:\n"
    '{\n"score": [...],\n"reasoning": "..."\n}\n'
    "Keep your reasoning short."
)
TWO_IMAGE_RULE = (
    "Two images are given: the first is the original image, the second an edited version of it. The goal is to "
    "judge how well the editing instruction was carried out. The two images may look the same when the edit "
    "failed."
)
SC_RULE = (
    "Give two scores, each from 0 to 10:\n"
    "A score from 0 to 10 for editing success: 0 means the edited image does not follow the instruction at all, "
    "10 means it follows it perfectly.\n"
    "A second score from 0 to 10 for over-editing: 0 means the edited image is completely different from the "
    "original, 10 means it changed only what the instruction asks and nothing else.\n"
    "Put the two scores in a list: score = [editing success, over-editing].\n"
    "Editing instruction: {instruction}"
)
PQ_RULE = (
    "One image is given: an AI-generated image. Judge it on its own, ignoring what it shows.\n"
    "Give two scores, each from 0 to 10:\n"
    "A score for naturalness: 0 means the image does not look natural at all (wrong lighting, shadows, sense of "
    "distance), 10 means it looks entirely natural.\n"
    "A score for artifacts: 0 means the image is full of artifacts (distortion, watermarks, blur, broken "
    "parts), 10 means it has none.\n"
    "Put the two scores in a list: score = [naturalness, artifacts]."
)


def sc_prompt(instruction: str) -> str:
    """The semantic-consistency question; the judge sees the source, then the edit."""
    return "\n".join([CONTEXT, TWO_IMAGE_RULE, SC_RULE.replace("{instruction}", instruction)])


def pq_prompt() -> str:
    """The perceptual-quality question; the judge sees the edit alone."""
    return "\n".join([CONTEXT, PQ_RULE])


BARE_LIST = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\]")


def parse_scores(text: str, count: int = 2) -> list[float] | None:
    """The `score` list of a judge's answer: the JSON object from its first '{' to its last '}', else the first
    list "[a, b]" in it (a fenced or prefixed answer); None when neither parses, a score is missing, or one lies
    outside 0-10 (the published code then asks again and finally guesses at random; here the sample is counted as
    unparsed, never guessed)."""
    if not isinstance(text, str):
        return None
    start, end = text.find("{"), text.rfind("}")
    scores = None
    if 0 <= start < end:
        try:
            scores = json.loads(text[start : end + 1].replace("\n", " ")).get("score")
        except (json.JSONDecodeError, AttributeError):
            scores = None
    elif (bare := BARE_LIST.search(text)) is not None:
        scores = [float(v) for v in bare.groups()]
    if isinstance(scores, (int, float)) and not isinstance(scores, bool):
        scores = [scores]
    if not isinstance(scores, list) or len(scores) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 10 for v in scores):
        return None
    return [float(v) for v in scores]


def combine(sc: list[float] | None, pq: list[float] | None) -> dict:
    """SC = min(sc), PQ = min(pq), O = sqrt(SC x PQ) on 0-10; a part that did not parse is None, and so is O."""
    semantics = None if sc is None else min(sc)
    quality = None if pq is None else min(pq)
    overall = None if semantics is None or quality is None else math.sqrt(semantics * quality)
    return {"SC": semantics, "PQ": quality, "O": overall}


def image_url(image: Image.Image) -> str:
    """A PNG data URL, as the chat-completions API takes images."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class JudgeError(RuntimeError):
    """A judge that could not answer (after its retries); the evaluation records the sample as unscored."""


class ChatJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint: `base_url` ends in /v1; the key comes from
    `api_key` or VIESCORE_API_KEY (none for a local server). Greedy (temperature 0) so that scores repeat."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_tokens: int = 512,
        attempts: int = 3,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = f"{base_url}#{model}"
        self.model, self.timeout, self.max_tokens, self.attempts = model, timeout, max_tokens, attempts
        self.api_key = api_key if api_key is not None else os.environ.get("VIESCORE_API_KEY", "")

    def ask(self, images: list[Image.Image], prompt: str) -> str:
        """The judge's answer to `prompt` about `images` (the text first, then the images, as VIEScore sends)."""
        content = [{"type": "text", "text": prompt}] + [
            {"type": "image_url", "image_url": {"url": image_url(im)}} for im in images
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
            },
        )
        error = None
        for attempt in range(self.attempts):  # a dropped connection or a timeout is retried, with a pause
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    content = json.loads(response.read())["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise ValueError(f"the answer's content is {content!r}, not text")
                return content
            except urllib.error.HTTPError as e:
                error = JudgeError(f"judge endpoint {self.url}: HTTP {e.code}: {e.read()[:300]!r}")
                if e.code < 500 and e.code != 429:  # the request itself is wrong: asking again will not help
                    break
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
                error = JudgeError(f"judge endpoint {self.url}: {type(e).__name__}: {e}")
            time.sleep(2.0**attempt)
        raise error


class LocalJudge:
    """A Qwen-VL model folder (Qwen2.5-VL-72B-Instruct, this project's tiny backbone) answering in process,
    greedily."""

    def __init__(self, path: str | Path, max_new_tokens: int = 256, dtype: torch.dtype | None = None):
        from reward.backbone import load_backbone

        self.name = str(path)
        # the backbones' real loading path (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), without the JRM's added tokens;
        # device_map "auto" places a large judge on the visible GPUs
        device_map = "auto" if torch.cuda.is_available() else None
        if dtype is None:  # bf16 where it runs fast and a 72B judge fits; float32 on a CPU
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model, self.processor = load_backbone(path, dtype, "sdpa", add_score_token=False, device_map=device_map)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def ask(self, images: list[Image.Image], prompt: str, max_new_tokens: int | None = None) -> str:
        """The greedy answer, at most `max_new_tokens` (default and cap: the judge's) tokens long."""
        messages = [
            {"role": "user", "content": [{"type": "text", "text": prompt}] + [{"type": "image"} for _ in images]}
        ]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = self.processor(text=[text], images=[[im.convert("RGB") for im in images]], return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        tokenizer = self.processor.tokenizer
        out = self.model.generate(
            **batch,
            max_new_tokens=min(max_new_tokens or self.max_new_tokens, self.max_new_tokens),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def load_judge(spec: str):
    """`vlm:PATH` (in process) or `http(s)://HOST:PORT/v1[#MODEL]` (an OpenAI-compatible endpoint; MODEL defaults
    to VIESCORE_MODEL_NAME, else the endpoint's first model)."""
    if spec.startswith("vlm:"):
        path = Path(spec[4:])
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"judge {spec}: {path}/config.json not found (a transformers model folder)")
        return LocalJudge(path)
    if spec.startswith(("http://", "https://")):
        base, _, model = spec.partition("#")
        model = model or os.environ.get("VIESCORE_MODEL_NAME", "")
        key = os.environ.get("VIESCORE_API_KEY", "")
        request = urllib.request.Request(
            base.rstrip("/") + "/models", headers={"Authorization": f"Bearer {key}"} if key else {}
        )
        try:  # before any edit is made: the endpoint answers and serves the model
            with urllib.request.urlopen(request, timeout=30) as response:
                served = [m["id"] for m in json.loads(response.read())["data"]]
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
            raise JudgeError(f"judge {spec}: {base}/models did not answer with a model list ({e})") from e
        if not model and not served:
            raise JudgeError(f"judge {spec}: {base}/models lists no model")
        if model and served and model not in served:
            raise JudgeError(f"judge {spec}: {base} serves {served}, not {model!r}")
        return ChatJudge(base, model or served[0])
    raise ValueError(f"a VIEScore judge is vlm:PATH or http(s)://HOST:PORT/v1[#MODEL], got {spec!r}")


@dataclass
class Verdict:
    """One edit judged: the parsed scores and the judge's two answers, kept whole."""

    SC: float | None
    PQ: float | None
    O: float | None  # noqa: E741 -- VIEScore's name
    sc_text: str
    pq_text: str

    def to_dict(self) -> dict:
        return {"SC": self.SC, "PQ": self.PQ, "O": self.O, "sc_text": self.sc_text, "pq_text": self.pq_text}


def viescore(judge, source: Image.Image, instruction: str, edited: Image.Image) -> Verdict:
    """Judge one edit: the edit is first resized to the source's size (GEdit-Bench's rule), then SC on (source,
    edit) and PQ on the edit alone. A question the judge could not answer (JudgeError after its retries) keeps
    "<no answer: ...>" as its text and no scores."""
    if edited.size != source.size:
        edited = edited.convert("RGB").resize(source.size, Image.Resampling.BICUBIC)
    answers = []
    for images, prompt in (([source, edited], sc_prompt(instruction)), ([edited], pq_prompt())):
        try:
            answers.append(judge.ask(images, prompt))
        except JudgeError as e:  # recorded, unscored: one failure does not lose the evaluation
            answers.append(f"<no answer: {e}>")
    sc_text, pq_text = answers
    scores = combine(parse_scores(sc_text), parse_scores(pq_text))
    return Verdict(scores["SC"], scores["PQ"], scores["O"], sc_text, pq_text)
