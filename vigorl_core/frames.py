"""Image frames: Qwen2.5-VL smart-resize and point/box mapping between frames.

Three frames exist (docs/method.md "Coordinate frames"):
- `original`: pixels of the image file as given;
- `model`: the image resized by `smart_resize` for the model profile in use (what the model sees and
  where it writes its points);
- `crop`: pixels of a zoom crop, cut from the model-frame image and resized to crop_size.

The project resizes images to the model frame itself and hands the engine pre-resized images, so the
HF processor and vLLM never resize again (a model-frame size is a fixed point of `smart_resize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ModelProfile:
    """Vision settings of a model family: the pixel budget per image and the ViT geometry."""

    name: str
    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2

    @property
    def factor(self) -> int:
        """Side of one merged vision token in pixels (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    def image_tokens(self, width: int, height: int) -> int:
        """Number of `<|image_pad|>` tokens the processor expands one image of this size into."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return (h // self.factor) * (w // self.factor)


# The paper's RL/SFT pixel budget (3,136 to 4,194,304 pixels per image) for real models; a small one for the tiny
# model so CPU tests stay fast (224x224 at most = 64 merged tokens per image).
PROFILES: dict[str, ModelProfile] = {
    "qwen2.5-vl": ModelProfile("qwen2.5-vl", min_pixels=3136, max_pixels=4_194_304),
    "tiny": ModelProfile("tiny", min_pixels=3136, max_pixels=50_176),
}


def get_profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; expected one of {sorted(PROFILES)}") from None


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 12_845_056) -> tuple[int, int]:
    """Qwen2-VL/2.5-VL resize rule: (height, width) rounded to multiples of `factor`, with the pixel count
    brought inside [min_pixels, max_pixels] keeping the aspect ratio. Same arithmetic as
    transformers' `smart_resize` (tested against the HF image processor)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class FrameMap:
    """Maps points and boxes between the original frame and the model frame of one image."""

    original_size: tuple[int, int]  # (width, height)
    model_size: tuple[int, int]  # (width, height)

    @classmethod
    def for_image(cls, width: int, height: int, profile: ModelProfile) -> FrameMap:
        h, w = smart_resize(height, width, profile.factor, profile.min_pixels, profile.max_pixels)
        return cls((width, height), (w, h))

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model pixels per original pixel."""
        return (self.model_size[0] / self.original_size[0], self.model_size[1] / self.original_size[1])

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        sx, sy = self.scale
        return x * sx, y * sy

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        sx, sy = self.scale
        return x / sx, y / sy

    def box_to_model(self, box: Box) -> Box:
        x1, y1 = self.to_model(box[0], box[1])
        x2, y2 = self.to_model(box[2], box[3])
        return x1, y1, x2, y2

    def box_to_original(self, box: Box) -> Box:
        x1, y1 = self.to_original(box[0], box[1])
        x2, y2 = self.to_original(box[2], box[3])
        return x1, y1, x2, y2


def resize_to_model(image: Image.Image, profile: ModelProfile) -> tuple[Image.Image, FrameMap]:
    """The model-frame image (RGB, bicubic like the HF processor) and its frame map."""
    frame = FrameMap.for_image(image.width, image.height, profile)
    rgb = image.convert("RGB")
    if frame.model_size != (image.width, image.height):
        rgb = rgb.resize(frame.model_size, Image.Resampling.BICUBIC)
    return rgb, frame


@dataclass(frozen=True)
class CropFrame:
    """A crop window (model-frame pixels, x1, y1, x2, y2 with x2/y2 exclusive) resized to `out_size`."""

    window: tuple[int, int, int, int]
    out_size: tuple[int, int]  # (width, height)

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        x1, y1, x2, y2 = self.window
        return x1 + x * (x2 - x1) / self.out_size[0], y1 + y * (y2 - y1) / self.out_size[1]

    def from_model(self, x: float, y: float) -> tuple[float, float]:
        x1, y1, x2, y2 = self.window
        return (x - x1) * self.out_size[0] / (x2 - x1), (y - y1) * self.out_size[1] / (y2 - y1)
