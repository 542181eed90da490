"""Random-weight Qwen2.5-VL models of real architectures, built offline.

No weights can be downloaded in tests or the quickstart, so we build a real Qwen2.5-VL
(`Qwen2_5_VLForConditionalGeneration`) with random weights, a byte-level BPE tokenizer trained on a
corpus this module generates, Qwen's special tokens and chat template, and a Qwen2.5-VL processor;
then `save_pretrained` everything into one folder that the stock transformers Auto classes and vLLM load.

Presets: `tiny` (about 1 M parameters, for CPU tests and the quickstart), `3b` and `7b` (the real
shapes, for GPU benchmarks). Same preset and seed give the same files.

    vigorl tiny --out runs/models/tiny            # or: python -m jobs.tiny --out ...
    vigorl tiny --preset 3b --out /tmp/qwen3b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vigorl_core.frames import PROFILES

# Qwen2.5's special tokens, in Qwen's order. `<tool_call>`/`</tool_call>` are single (non-special)
# added tokens as in Qwen2.5, so decoding with skip_special_tokens keeps them.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

# Qwen2.5-VL's chat template (images as <|vision_start|><|image_pad|><|vision_end|>, one pad per image).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VISION_3B_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
PRESETS: dict[str, dict[str, Any]] = {
    # rope_theta 10: with head_dim 32 the default 1e6 leaves the width axis almost unrotated (measured on the
    # pointing task: 24.5% vs 100% accuracy at the same step).
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 6, 6]}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1], tokens_per_second=2),
        tie_word_embeddings=False, profile="tiny", vocab_size=None),
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(_VISION_3B_7B, out_hidden_size=2048), tie_word_embeddings=True, profile="qwen2.5-vl",
        vocab_size=151936),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(_VISION_3B_7B, out_hidden_size=3584), tie_word_embeddings=False, profile="qwen2.5-vl",
        vocab_size=152064),
}


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: the project's prompts, tags, tool calls, numbers and task words.
    Built from fixed strings and loops only, so it is identical on every Python version."""
    from vigorl_core import prompts

    lines = [prompts.system_prompt(task, mode) for task in prompts.TASKS for mode in prompts.MODES]
    words = ("red green blue yellow purple orange white black gray cyan magenta brown pink "
             "circle square triangle star diamond cross ring button icon text field menu "
             "left right above below front behind near far top bottom middle center small large "
             "what is the colour color of shape where point to find click type scroll stop go_back "
             "answer options yes no object image crop zoom region coordinate observation think").split()
    lines += [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)]
    lines += ["<think> The target is at ({}, {}). </think>\n<answer> ({}, {}) </answer>".format(
        x, y, y, x) for x in range(0, 1000, 37) for y in range(0, 1000, 53)]
    lines += ['<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [%d, %d]}}\n</tool_call>'
              % (x, 999 - x) for x in range(0, 1000, 11)]
    lines += ["<observation>\nHere is the crop of the image centered on the coordinate:\n\n</observation>",
              "Wait, this seems off. Let's try something else."]
    return lines


def build_tokenizer(vocab_size: int = 2048):
    """Byte-level BPE trained on `tokenizer_corpus()`, wrapped as a Qwen-style PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, model_max_length=32768, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.add_tokens(TOOL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(preset: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    spec = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = spec["vocab_size"] or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"preset {preset}: vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    text = dict(spec["text"], vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(spec["vision"])
    vision.setdefault("out_hidden_size", text["hidden_size"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_processor(preset: str, tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    profile = PROFILES[PRESETS[preset]["profile"]]
    size = {"shortest_edge": profile.min_pixels, "longest_edge": profile.max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=profile.patch_size,
                                              merge_size=profile.merge_size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
                     device: str = "cpu") -> Path:
    """Build a random-weight Qwen2.5-VL of `preset` shape and save model, tokenizer and processor
    into `out_dir`. Returns the folder. Rebuilding with the same arguments gives the same files."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_processor(preset, tokenizer).save_pretrained(out)
    (out / "vigorl_model.json").write_text(json.dumps(
        {"preset": preset, "seed": seed, "profile": PRESETS[preset]["profile"]}, indent=1) + "\n")
    return out


def model_profile_name(model_dir: str | Path) -> str:
    """The frames profile of a model folder: `tiny` for our tiny builds, else `qwen2.5-vl`."""
    marker = Path(model_dir) / "vigorl_model.json"
    if marker.is_file():
        return json.loads(marker.read_text())["profile"]
    return "qwen2.5-vl"
