"""Generative judge: decode a critique after the score token, then parse its verdict ("... overall 6/8.").

This is how generative judges (EditScore, VLM-as-a-judge) score an edit. The trained baseline is
reward/train_generative.py: JRM's backbone fine-tuned on the critiques alone and saved as a JRM checkpoint;
any JRM checkpoint also decodes the critique it learnt beside its reward. Either way the weights' format,
prompt and `score()` signature are JRM's, so accuracy and speed compare like for like: JRM reads one hidden
state after a prefill; this decodes up to `max_new_tokens` tokens per candidate first.
"""

from __future__ import annotations

import re

import torch
from PIL import Image

from reward.model import JRM, _unwrap

VERDICT = re.compile(r"overall\s+(\d+(?:\.\d+)?)\s*/\s*(\d+)", re.IGNORECASE)
ANY_SCORE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+)")


def parse_verdict(text: str) -> float | None:
    """The overall score in [0, 1] from a critique ("... overall 6/8."), else the last "a/b", else None."""
    match = VERDICT.search(text) or (ANY_SCORE.findall(text) or [None])[-1]
    if match is None:
        return None
    value, scale = (match.groups() if isinstance(match, re.Match) else match)
    return float(value) / float(scale) if float(scale) > 0 else None


class GenerativeJudge:
    """score() by greedy decoding of a critique; unparsable critiques score 0 and are counted."""

    def __init__(self, model: JRM, max_new_tokens: int = 256, min_new_tokens: int = 0):
        """`min_new_tokens` holds back the end token until that many are decoded: benchmarks set it to
        max_new_tokens so that a random-weight judge writes critiques of a known length."""
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens ({max_new_tokens})")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.parse_failures = 0
        self.generated_tokens = 0

    @torch.inference_mode()
    def critique(self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image]) -> list[str]:
        """Greedy critiques, one per candidate (left padding, so every row continues from its score token)."""
        model = self.model
        model.eval()
        batch = model.encode(source_images, instructions, edited_images, padding_side="left")
        device = model.head.weight.device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokenizer = model.processor.tokenizer
        generated = _unwrap(model.backbone).generate(
            **batch,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        ends = (new == tokenizer.eos_token_id).int()
        self.generated_tokens += int((ends.cumsum(1) - ends == 0).sum())  # up to each row's end token: the rest is padding
        return tokenizer.batch_decode(new, skip_special_tokens=True)

    def score(
        self, source_images: list[Image.Image], instructions: list[str], edited_images: list[Image.Image], batch_size: int = 16
    ) -> torch.Tensor:
        """(B,) parsed overall scores in [0, 1]."""
        scores: list[float] = []
        for i in range(0, len(source_images), batch_size):
            texts = self.critique(source_images[i : i + batch_size], instructions[i : i + batch_size], edited_images[i : i + batch_size])
            for text in texts:
                value = parse_verdict(text)
                if value is None:
                    self.parse_failures += 1
                    value = 0.0
                scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)
