"""Zoom environment: crop settings per task x model profile, crop geometry, and the image budget.

The multi-turn model asks to zoom with a `<tool_call>` naming a point (x, y) in the MODEL frame of the
first image; the environment cuts a window of side 2*offset around that point from the model-frame
root image (never from a previous crop, as in the original), optionally draws a red dot on the
point, resizes the window to crop_size x crop_size and hands back an observation user turn.

Pure (PIL + stdlib). Used by SFT chain building, GRPO rollouts, evaluation and the ZoomServer alike, so
one settings table serves them all (the original used different web-grounding crops in SFT and in RL:
200 px -> 512 vs 100 px -> 384; docs/method.md has its settings by stage).

    from vigorl_core.zoom import ZoomEnv, zoom_settings
    env = ZoomEnv(model_image, zoom_settings("visual_search", "tiny"))
    crop = env.crop(120, 64)            # Crop(image, frame, point, clamped)
    content = env.observation_segments(crop)
    if env.needs_forced_final: ...      # append protocol.FORCED_FINAL_PREFIX after the observation
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vigorl_core.frames import CropFrame
from vigorl_core.prompts import observation_text


@dataclass(frozen=True)
class ZoomSettings:
    """How one task zooms: `offset` = half-window in model-frame pixels, `crop_size` = output side."""

    offset: int
    crop_size: int
    draw_dot: bool


# The ONE table (task, profile name) -> settings; crop_size is a multiple of 28 so a crop is a fixed point
# of smart_resize (engines never resize it again). qwen2.5-vl: web grounding as the paper's multi-turn RL
# (Table A3: 100x100 window, "resize 384", with dot) -- 384 is not a multiple of 28 and the original's
# fetch_image rounded it to 392, so 392 is what its model really saw; V*/spatial as every stage of the
# original (364 -> 672). tiny (model frame <= 224x224): a 56x56 window magnified 2x to 112 (112^2 <= 50176).
ZOOM_SETTINGS: dict[tuple[str, str], ZoomSettings] = {
    ("grounding", "qwen2.5-vl"): ZoomSettings(offset=50, crop_size=392, draw_dot=True),
    ("web_action", "qwen2.5-vl"): ZoomSettings(offset=50, crop_size=392, draw_dot=True),
    ("visual_search", "qwen2.5-vl"): ZoomSettings(offset=182, crop_size=672, draw_dot=False),
    ("spatial", "qwen2.5-vl"): ZoomSettings(offset=182, crop_size=672, draw_dot=False),
    ("grounding", "tiny"): ZoomSettings(offset=28, crop_size=112, draw_dot=True),
    ("web_action", "tiny"): ZoomSettings(offset=28, crop_size=112, draw_dot=True),
    ("visual_search", "tiny"): ZoomSettings(offset=28, crop_size=112, draw_dot=False),
    ("spatial", "tiny"): ZoomSettings(offset=28, crop_size=112, draw_dot=False),
}


def zoom_settings(task: str, profile: str) -> ZoomSettings:
    """Settings for `task` under the model profile named `profile` (frames.PROFILES key)."""
    try:
        return ZOOM_SETTINGS[(task, profile)]
    except KeyError:
        valid = ", ".join(f"{t}/{p}" for t, p in sorted(ZOOM_SETTINGS))
        raise ValueError(f"no zoom settings for task={task!r}, profile={profile!r}; valid: {valid}") from None


# Original `_get_point_crop` dot: radius 7 in model-frame pixels (before the resize), white outline 2.
DOT_RADIUS = 7
DOT_OUTLINE = 2

# Closes the observation turn (SFT/eval convention of the original: a newline before </observation>);
# the opening text is prompts.observation_text(draw_dot). The one definition: chat_tokens lays turns out with it.
OBSERVATION_TAIL = "\n</observation>"


@dataclass(frozen=True)
class Crop:
    """A zoom crop. `point` is the (possibly clamped) centre in model-frame ints; `frame` maps crop pixels
    to model pixels; `clamped` is True when the requested point lay outside the image (or was not finite)."""

    image: Image.Image
    frame: CropFrame
    point: tuple[int, int]
    clamped: bool = False


def _clamp(v: float, size: int) -> tuple[int, bool]:
    """Round `v` to an int pixel inside [0, size-1]; NaN goes to 0. Returns (value, changed)."""
    if math.isnan(v):
        return 0, True
    if v < 0:
        return 0, True
    if v > size - 1:
        return size - 1, True
    return int(round(v)), False


def point_crop(image: Image.Image, x: float, y: float, settings: ZoomSettings) -> Crop:
    """Cut the zoom crop around (x, y) (model-frame pixels of `image`), as the original `_get_point_crop`.

    Window [x-offset, y-offset, x+offset, y+offset] clipped to the image (side 2*offset, smaller at the
    borders; an empty box is widened to 1 px), dot drawn at the point when `settings.draw_dot`, then
    resized to crop_size x crop_size with LANCZOS (the demo's resize). A point outside the image is
    clamped into it first and reported via `Crop.clamped` (the original raised or cut black padding).
    """
    width, height = image.size
    cx, cl_x = _clamp(x, width)
    cy, cl_y = _clamp(y, height)
    off = settings.offset
    left, top = max(0, cx - off), max(0, cy - off)
    right, bottom = min(width, cx + off), min(height, cy + off)
    if right <= left:
        right = left + 1
    if bottom <= top:
        bottom = top + 1
    window = image.convert("RGB").crop((left, top, right, bottom))  # crop() returns a copy
    if settings.draw_dot:
        dx, dy, r = cx - left, cy - top, DOT_RADIUS
        ImageDraw.Draw(window).ellipse([(dx - r, dy - r), (dx + r, dy + r)], fill="red", outline="white",
                                       width=DOT_OUTLINE)
    size = settings.crop_size
    out = window.resize((size, size), Image.Resampling.LANCZOS)
    return Crop(out, CropFrame((left, top, right, bottom), (size, size)), (cx, cy), cl_x or cl_y)


class ZoomBudgetError(RuntimeError):
    """A crop was requested after the image budget (original + crops) was already full."""


class ZoomEnv:
    """Zoom state of one conversation over one model-frame root image.

    `max_images` counts the original plus crops (5 -> at most 4 crops, as the original RL). When a crop
    fills the budget, `needs_forced_final` turns True: the caller appends protocol.FORCED_FINAL_PREFIX
    after that observation so the model must answer. Turns are the caller's budget (RolloutConfig.max_turns).
    """

    def __init__(self, image: Image.Image, settings: ZoomSettings, *, max_images: int = 5):
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.image = image.convert("RGB")
        self.settings = settings
        self.max_images = max_images
        self.crops: list[Crop] = []

    @property
    def images_used(self) -> int:
        return 1 + len(self.crops)

    @property
    def can_zoom(self) -> bool:
        return self.images_used < self.max_images

    @property
    def needs_forced_final(self) -> bool:
        """True once the last crop appended reached max_images."""
        return bool(self.crops) and self.images_used >= self.max_images

    def crop(self, x: float, y: float) -> Crop:
        """Crop the ROOT image around model-frame (x, y) and count it against the image budget."""
        if not self.can_zoom:
            raise ZoomBudgetError(
                f"image budget full: {self.images_used} of max_images={self.max_images} used "
                f"(original + {len(self.crops)} crops); no further crop allowed")
        crop = point_crop(self.image, x, y, self.settings)
        self.crops.append(crop)
        return crop

    def observation_segments(self, crop: Crop) -> list[str | Image.Image]:
        """Content of the observation user turn, in order: head text, crop image, tail text."""
        return [observation_text(self.settings.draw_dot), crop.image, OBSERVATION_TAIL]
