"""Vision-language backbones for JRM: Qwen2-VL, Qwen2.5-VL, Qwen3-VL from a path or hub id, or a `tiny` preset.

The tiny preset builds a random-weight model from a config and a byte-level BPE tokenizer trained here on
ShapeEdit text, so everything runs offline on a CPU. Real checkpoints load with `from_pretrained`.
Images go through `ImageOnlyProcessor`: Qwen2-VL's processor without the video processor, which needs
torchvision, which does not install beside the CPU torch wheel.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from reward.shapeedit.critique import GLOBAL_TAG, LOC_TOKENS, REGION_TAGS
from reward.shapeedit.generate import GenerateConfig, make_prompt

SCORE_TOKEN = "<|score|>"
ADDED_TOKENS = [SCORE_TOKEN, *REGION_TAGS, GLOBAL_TAG, *LOC_TOKENS]
"""Tokens JRM adds to a backbone's vocabulary: the score token, the grounded critiques' region tags and the
location tokens of their boxes."""
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
# Qwen2's pre-tokenisation, so the tiny tokenizer splits text the way the real one does.
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen-VL chat format without a default system prompt; images become vision_start/image_pad/vision_end.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL / 2.5-VL / 3-VL processor that needs only an image processor and a tokenizer.

    ProcessorMixin reads its parts from this signature, so leaving out `video_processor` drops the
    torchvision-backed video processor. Always returns `mm_token_type_ids`, which Qwen2.5-VL needs for
    correct positions (without it, it silently uses wrong ones).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


@functools.cache
def _tokenizer_corpus(num_prompts: int = 400, seed: int = 0) -> tuple[str, ...]:
    """ShapeEdit instructions and critiques: the text the tiny preset reads and writes (made once per
    process: it is most of the cost of building a tiny model)."""
    rng = np.random.default_rng(seed)
    cfg = GenerateConfig(out="", candidates=4, size=32)
    texts: list[str] = []
    while len(texts) < num_prompts * 5:
        prompt = make_prompt(rng, cfg)
        if prompt is not None:
            texts.append(prompt.instruction)
            texts.extend(prompt.critiques)
    return tuple(texts)


def build_tiny_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens, the score token and a chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL + ADDED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens, ever
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=_SPECIAL[1:] + ADDED_TOKENS,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    family: str, tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, vision_depth: int = 2, patch: int = 8
):
    """A small random-weight config of `family` whose special-token ids match `tokenizer`."""
    if family not in MODEL_CLASSES:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {sorted(MODEL_CLASSES)}")
    head_dim = hidden // heads
    half = head_dim // 2
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # mrope_section splits the rotary half of head_dim over (time, height, width).
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vision_width = hidden // 2
    common_vision = dict(
        depth=vision_depth, num_heads=max(1, heads // 2), patch_size=patch, spatial_merge_size=2, temporal_patch_size=2
    )
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(common_vision, embed_dim=vision_width, mlp_ratio=2, hidden_size=hidden),
            tie_word_embeddings=False,
            **ids,
        )
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(
                common_vision,
                hidden_size=vision_width,
                intermediate_size=2 * vision_width,
                out_hidden_size=hidden,
                fullatt_block_indexes=[vision_depth - 1],
                window_size=4 * patch * 2,
            ),
            tie_word_embeddings=False,
            **ids,
        )
    # Qwen3-VL: interleaved rope (section [T, H, W] with T largest), a square grid of learned position
    # embeddings, and deepstack features from vision layers below the depth.
    rope3 = dict(rope, mrope_section=[half - 2 * (half // 4), half // 4, half // 4], mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config=dict(text, head_dim=head_dim, rope_parameters=rope3),
        vision_config=dict(
            common_vision,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(min(vision_depth, layers)))[:2],
        ),
        tie_word_embeddings=False,
        **ids,
    )


def tiny_processor(tokenizer, patch: int = 8, image_size: int = 64) -> ImageOnlyProcessor:
    factor = patch * 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=image_size * image_size,
    )
    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def build_tiny(family: str = "qwen2_vl", seed: int = 0, **sizes) -> tuple[PreTrainedModel, ImageOnlyProcessor]:
    """A random-weight backbone of `family` and its processor, entirely offline."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(family, tokenizer, **sizes)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config)
    return model, tiny_processor(tokenizer, patch=config.vision_config.patch_size)


def load_backbone(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    add_score_token: bool = True,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, ImageOnlyProcessor]:
    """A pretrained Qwen-VL backbone and its processor from a local path or hub id, with JRM's tokens added
    (`ADDED_TOKENS`, unless add_score_token is false; their input and output embeddings start at the mean of
    the rows before them). `device_map` goes to from_pretrained ("auto" spreads a model larger than one GPU
    over every visible one as it loads)."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"{name_or_path} is a {config.model_type!r} model; JRM supports {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[config.model_type].from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    chat_template = tokenizer.chat_template
    local = Path(name_or_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        if chat_template is None and (local / name).is_file():
            text = (local / name).read_text()
            chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    if chat_template is None:
        raise ValueError(f"{name_or_path} has no chat template (tokenizer_config.json or chat_template.jinja)")
    tokenizer.chat_template = chat_template
    new = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()] if add_score_token else []
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        rows = model.get_input_embeddings().weight.shape[0]
        # Real Qwen tables are padded past the tokenizer: never shrink them, and start the new tokens at
        # the mean of the trained rows rather than at an untrained padding row.
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        new_ids = tokenizer.convert_tokens_to_ids(new)
        with torch.no_grad():
            for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                table[new_ids] = table[: min(new_ids)].mean(0)
    processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    return model, processor
