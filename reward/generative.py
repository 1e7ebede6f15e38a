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

from reward.model import JRM

VERDICT = re.compile(r"overall\s+(\d+(?:\.\d+)?)\s*/\s*(\d+)", re.IGNORECASE)


def parse_verdict(text: str) -> float | None:
    """The overall score c/b of the critique's (last) verdict "... overall c/b.", in [0, 1]; None without one.

    A critique cut before its verdict is a parse failure, not a score read off another of its lines.
    """
    found = VERDICT.findall(text)
    if not found:
        return None
    value, scale = found[-1]
    return float(value) / float(scale) if float(scale) > 0 else None


class GenerativeJudge:
    """score() by greedy decoding of a critique and parsing its verdict; critiques without one score 0 and are
    counted."""

    def __init__(self, model: JRM, max_new_tokens: int | None = None, min_new_tokens: int = 0):
        """`max_new_tokens` defaults to the longest critique the model was trained on (model.max_critique_tokens)
        plus its end token, so that no verdict is cut. `min_new_tokens` holds back the end token until that many
        are decoded: benchmarks set it to max_new_tokens so that a random-weight judge writes critiques of a
        known length."""
        if max_new_tokens is None:
            max_new_tokens = model.config.max_critique_tokens + 1
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens ({max_new_tokens})")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.parse_failures = 0
        self.generated_tokens = 0

    def critique(
        self,
        source_images: list[Image.Image | list[Image.Image]],
        instructions: list[str],
        edited_images: list[Image.Image],
    ) -> list[str]:
        """Greedy critiques, one per candidate (JRM.critique)."""
        out = self.model.critique(source_images, instructions, edited_images, self.max_new_tokens, self.min_new_tokens)
        self.generated_tokens += int(out.num_tokens.sum())
        return out.texts

    def score(
        self,
        source_images: list[Image.Image | list[Image.Image]],
        instructions: list[str],
        edited_images: list[Image.Image],
        batch_size: int = 16,
    ) -> torch.Tensor:
        """(B,) parsed overall scores in [0, 1]."""
        scores: list[float] = []
        for i in range(0, len(source_images), batch_size):
            texts = self.critique(
                source_images[i : i + batch_size], instructions[i : i + batch_size], edited_images[i : i + batch_size]
            )
            for text in texts:
                value = parse_verdict(text)
                if value is None:
                    self.parse_failures += 1
                    value = 0.0
                scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)
