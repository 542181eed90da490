"""Zoom crop geometry, settings table and image budget (vigorl_core.zoom)."""

from __future__ import annotations

import pytest
from PIL import Image

from vigorl_core.frames import PROFILES
from vigorl_core.records import TASKS
from vigorl_core.zoom import (
    ZOOM_SETTINGS, Crop, ZoomBudgetError, ZoomEnv, ZoomSettings, point_crop, zoom_settings,
)

NO_DOT = ZoomSettings(offset=20, crop_size=112, draw_dot=False)
DOT = ZoomSettings(offset=20, crop_size=112, draw_dot=True)


def gradient(w: int = 200, h: int = 150) -> Image.Image:
    """Each pixel encodes its own coordinates: R = x, G = y (so a crop tells where it came from)."""
    img = Image.new("RGB", (w, h))
    img.putdata([(x, y, 0) for y in range(h) for x in range(w)])
    return img


def test_every_task_and_profile_has_settings_that_fit():
    for task in TASKS:
        for name, profile in PROFILES.items():
            s = zoom_settings(task, name)
            assert s.crop_size % profile.factor == 0
            assert s.crop_size ** 2 <= profile.max_pixels
            assert s.crop_size ** 2 >= profile.min_pixels
    assert zoom_settings("grounding", "qwen2.5-vl") == ZoomSettings(50, 392, True)
    assert zoom_settings("visual_search", "qwen2.5-vl") == ZoomSettings(182, 672, False)
    assert set(ZOOM_SETTINGS) == {(t, p) for t in TASKS for p in PROFILES}


def test_unknown_settings_name_valid_keys():
    with pytest.raises(ValueError, match="visual_search/tiny"):
        zoom_settings("nope", "tiny")


@pytest.mark.parametrize("x, y, window", [
    (100, 75, (80, 55, 120, 95)),     # middle: side 2*offset
    (5, 75, (0, 55, 25, 95)),         # left border
    (195, 75, (175, 55, 200, 95)),    # right border
    (100, 3, (80, 0, 120, 23)),       # top border
    (100, 149, (80, 129, 120, 150)),  # bottom border
    (0, 0, (0, 0, 20, 20)),           # corners
    (199, 0, (179, 0, 200, 20)),
    (0, 149, (0, 129, 20, 150)),
    (199, 149, (179, 129, 200, 150)),
])
def test_window_clipping(x, y, window):
    crop = point_crop(gradient(), x, y, NO_DOT)
    assert crop.frame.window == window
    assert crop.image.size == (112, 112)
    assert crop.frame.out_size == (112, 112)
    assert crop.point == (x, y) and not crop.clamped


def test_degenerate_window_widened_to_one_pixel():
    crop = point_crop(gradient(), 0, 0, ZoomSettings(offset=0, crop_size=28, draw_dot=False))
    assert crop.frame.window == (0, 0, 1, 1)
    assert crop.image.size == (28, 28)


def test_crop_content_comes_from_the_window():
    crop = point_crop(gradient(), 100, 75, NO_DOT)
    # centre of the crop maps back to model pixel (100, 75), whose colour encodes (100, 75)
    r, g, _ = crop.image.getpixel((56, 56))
    assert abs(r - 100) <= 1 and abs(g - 75) <= 1


def test_dot_drawn_only_when_requested():
    img = Image.new("RGB", (200, 150), (0, 128, 0))
    with_dot = point_crop(img, 100, 75, DOT).image.getpixel((56, 56))
    without = point_crop(img, 100, 75, NO_DOT).image.getpixel((56, 56))
    assert with_dot[0] > 200 and with_dot[1] < 40 and with_dot[2] < 40
    assert without == (0, 128, 0)


def test_dot_at_border_point_sits_on_the_point():
    img = Image.new("RGB", (200, 150), (0, 0, 0))
    crop = point_crop(img, 4, 140, DOT)
    px, py = crop.frame.from_model(4, 140)
    r, g, b = crop.image.getpixel((int(px), int(py)))
    assert r > 200 and g < 40 and b < 40


@pytest.mark.parametrize("x, y, point", [
    (-30, 75, (0, 75)), (500, 75, (199, 75)), (100, -1, (100, 0)), (100, 1e9, (100, 149)),
    (float("nan"), 75, (0, 75)), (float("inf"), float("-inf"), (199, 0)),
])
def test_out_of_image_point_is_clamped(x, y, point):
    crop = point_crop(gradient(), x, y, DOT)
    assert crop.clamped and crop.point == point
    assert crop.image.size == (112, 112)
    x1, y1, x2, y2 = crop.frame.window
    assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150


def test_float_point_is_rounded_not_clamped():
    crop = point_crop(gradient(), 99.6, 74.4, NO_DOT)
    assert crop.point == (100, 74) and not crop.clamped


def test_crop_frame_round_trip():
    crop = point_crop(gradient(), 190, 10, NO_DOT)  # clipped window: non-square scale
    for cx, cy in [(0, 0), (37.5, 90.25), (111, 111), (56, 3)]:
        mx, my = crop.frame.to_model(cx, cy)
        bx, by = crop.frame.from_model(mx, my)
        assert bx == pytest.approx(cx) and by == pytest.approx(cy)
    # crop pixel -> model pixel lands where the image content says it does
    mx, my = crop.frame.to_model(56, 56)
    r, g, _ = crop.image.getpixel((56, 56))
    assert abs(r - mx) <= 1.5 and abs(g - my) <= 1.5


def test_env_crops_always_from_root_image():
    root = gradient()
    env = ZoomEnv(root, NO_DOT)
    first = env.crop(50, 50)
    env.crop(150, 100)
    third = env.crop(50, 50)
    assert first.image.tobytes() == third.image.tobytes()
    assert third.frame.window == (30, 30, 70, 70)  # root-frame coordinates, not relative to crop 2
    assert root.getpixel((0, 0)) == (0, 0, 0)  # root untouched


def test_env_does_not_draw_on_root():
    root = Image.new("RGB", (200, 150), (0, 128, 0))
    env = ZoomEnv(root, DOT)
    env.crop(100, 75)
    assert env.image.getpixel((100, 75)) == (0, 128, 0)
    assert env.crop(100, 75).image.getpixel((56, 56))[0] > 200  # dot drawn on the copy only, every time


def test_budget_five_images_is_four_crops():
    env = ZoomEnv(gradient(), NO_DOT)
    assert env.images_used == 1 and env.can_zoom and not env.needs_forced_final
    for i in range(1, 4):
        env.crop(10 * i, 10 * i)
        assert env.images_used == i + 1 and env.can_zoom and not env.needs_forced_final
    env.crop(40, 40)
    assert env.images_used == 5 and not env.can_zoom and env.needs_forced_final
    with pytest.raises(ZoomBudgetError, match="max_images=5"):
        env.crop(50, 50)
    assert env.images_used == 5


def test_budget_custom_and_invalid():
    env = ZoomEnv(gradient(), NO_DOT, max_images=2)
    env.crop(1, 1)
    assert env.needs_forced_final and not env.can_zoom
    one = ZoomEnv(gradient(), NO_DOT, max_images=1)
    assert not one.can_zoom and not one.needs_forced_final  # no crop appended, nothing to force
    with pytest.raises(ZoomBudgetError):
        one.crop(1, 1)
    with pytest.raises(ValueError):
        ZoomEnv(gradient(), NO_DOT, max_images=0)


def test_observation_segments():
    env = ZoomEnv(gradient(), DOT)
    crop = env.crop(10, 10)
    head, image, tail = env.observation_segments(crop)
    assert head == ("<observation>\nHere is the crop of the image centered on the coordinate, "
                    "with a red dot at the coordinate location:\n")
    assert image is crop.image and tail == "\n</observation>"
    plain = ZoomEnv(gradient(), NO_DOT)
    head, _, _ = plain.observation_segments(plain.crop(10, 10))
    assert head == "<observation>\nHere is the crop of the image centered on the coordinate:\n"
    assert isinstance(crop, Crop)
