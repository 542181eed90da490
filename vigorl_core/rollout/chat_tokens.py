"""The token contract: conversation pieces as token ids, built once by the project, never re-encoded.

Template and observation pieces are tokenized here; generated pieces are the engine's ids verbatim.
Engine ids carry ONE `<|image_pad|>` per image (vLLM expands it); training ids expand each to the
processor's count, grid_h * grid_w / merge^2 of the model-frame image (docs/method.md "Token contract").
Every piece boundary sits on a special token, so tokenizing pieces separately equals tokenizing the
whole text (checked against the HF processor in tests/integration/test_rollout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vigorl_core.frames import ModelProfile
from vigorl_core.prompts import observation_text
from vigorl_core.protocol import FORCED_FINAL_PREFIX
from vigorl_core.zoom import OBSERVATION_TAIL

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class ChatTokens:
    """Tokenizer + vision geometry of one model folder, and the pieces of a grounded conversation."""

    tokenizer: object
    profile: ModelProfile
    chat_template: str | None = None  # the processor's, for folders whose tokenizer carries none

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChatTokens:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model_dir))
        ip = processor.image_processor
        size = ip.size if isinstance(ip.size, dict) else ip.size.__dict__
        profile = ModelProfile(name=Path(str(model_dir)).name, min_pixels=size["shortest_edge"],
                               max_pixels=size["longest_edge"], patch_size=ip.patch_size, merge_size=ip.merge_size)
        template = getattr(processor.tokenizer, "chat_template", None) or getattr(processor, "chat_template", None)
        return cls(processor.tokenizer, profile, template)

    def __post_init__(self):
        t = self.tokenizer
        self.image_pad_id = t.convert_tokens_to_ids("<|image_pad|>")
        self.im_end_id = t.convert_tokens_to_ids("<|im_end|>")
        self.tool_call_end_id = t.convert_tokens_to_ids("</tool_call>")
        self.forced_final_ids = self.encode(FORCED_FINAL_PREFIX)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt_text(self, system: str, user: str, num_images: int) -> str:
        """Chat-template text of the system and first user turn (images first, as the original data puts
        `<image>` before the question) up to the assistant header."""
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                f"{IMAGE_PLACEHOLDER * num_images}{user}<|im_end|>\n<|im_start|>assistant\n")

    def chat_prompt_text(self, messages: list[dict]) -> str:
        """Chat-template text of chat messages (`content` a string or parts `{"type": "text", "text": ...}` /
        `{"type": "image"}`) up to the assistant header, one image placeholder per image part."""
        if not self.chat_template:
            raise ValueError("the model folder has no chat template (tokenizer or processor)")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def observation_text(self, draw_dot: bool, has_image: bool = True, note: str = "") -> str:
        """A zoom observation user turn, from the newline after the assistant's `<|im_end|>` to the next
        assistant header. Without an image (a tool call that could not run) `note` says why."""
        body = observation_text(draw_dot) + IMAGE_PLACEHOLDER if has_image else f"<observation>\n{note}"
        return f"\n<|im_start|>user\n{body}{OBSERVATION_TAIL}<|im_end|>\n<|im_start|>assistant\n"

    def image_tokens(self, image: Image.Image) -> int:
        return self.profile.image_tokens(image.width, image.height)

    def expand(self, ids: list[int], images: list[Image.Image]) -> list[int]:
        """Engine ids -> training ids: the k-th `<|image_pad|>` becomes image_tokens(images[k]) pads."""
        out: list[int] = []
        k = 0
        for token in ids:
            if token == self.image_pad_id:
                if k >= len(images):
                    raise ValueError(f"more <|image_pad|> tokens than images ({len(images)})")
                out.extend([token] * self.image_tokens(images[k]))
                k += 1
            else:
                out.append(token)
        if k != len(images):
            raise ValueError(f"{len(images)} images but {k} <|image_pad|> tokens")
        return out
