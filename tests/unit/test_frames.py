import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vigorl_core.frames import PROFILES, CropFrame, FrameMap, get_profile, resize_to_model, smart_resize


def _hf_processor(profile):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size={"shortest_edge": profile.min_pixels, "longest_edge": profile.max_pixels})


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_smart_resize_equals_hf_processor_grid(profile_name):
    profile = PROFILES[profile_name]
    processor = _hf_processor(profile)
    rng = random.Random(profile_name)
    sizes = [(rng.randint(20, 3000), rng.randint(20, 3000)) for _ in range(24)] + [(28, 28), (1, 57), (4000, 30)]
    for width, height in sizes:
        image = Image.new("RGB", (width, height), (10, 20, 30))
        grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        h, w = smart_resize(height, width, profile.factor, profile.min_pixels, profile.max_pixels)
        assert [1, h // profile.patch_size, w // profile.patch_size] == grid, (width, height)
        assert profile.image_tokens(width, height) == grid[1] * grid[2] // profile.merge_size**2


def test_model_frame_is_fixed_point_of_smart_resize():
    # The project hands pre-resized images to the engine: resizing them again must be a no-op.
    profile = PROFILES["tiny"]
    for width, height in [(448, 448), (400, 300), (1000, 37), (50, 50)]:
        resized, frame = resize_to_model(Image.new("RGB", (width, height)), profile)
        assert resized.size == frame.model_size
        assert FrameMap.for_image(*resized.size, profile).model_size == resized.size


coordinate = st.floats(min_value=0, max_value=5000, allow_nan=False)


@given(w=st.integers(28, 4000), h=st.integers(28, 4000), x=coordinate, y=coordinate)
def test_point_mapping_round_trips(w, h, x, y):
    frame = FrameMap.for_image(w, h, PROFILES["qwen2.5-vl"])
    mx, my = frame.to_model(x, y)
    ox, oy = frame.to_original(mx, my)
    assert ox == pytest.approx(x, rel=1e-9, abs=1e-6) and oy == pytest.approx(y, rel=1e-9, abs=1e-6)
    box = frame.box_to_original(frame.box_to_model((x, y, x + 10, y + 20)))
    assert box == pytest.approx((x, y, x + 10, y + 20), rel=1e-9, abs=1e-6)


def test_box_scales_into_model_frame():
    frame = FrameMap((1000, 500), (500, 250))
    assert frame.box_to_model((100, 50, 200, 100)) == (50, 25, 100, 50)


@given(x=st.floats(0, 112), y=st.floats(0, 112))
def test_crop_frame_round_trips(x, y):
    crop = CropFrame(window=(40, 60, 96, 116), out_size=(112, 112))
    mx, my = crop.to_model(x, y)
    assert 40 <= mx <= 96 and 60 <= my <= 116
    assert crop.from_model(mx, my) == pytest.approx((x, y), abs=1e-9)


def test_bad_sizes_and_profiles_are_named():
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
    with pytest.raises(ValueError, match="tiny"):
        get_profile("huge")
