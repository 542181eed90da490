"""Untrusted image decoding: limits before pixels, clear errors, data URLs; point annotation."""

from __future__ import annotations

import base64
import io
import pickle
import struct
import zlib

import pytest
from PIL import Image

from vigorl_core.frames import FrameMap, get_profile
from vigorl_core.images import (ImageError, ImageLimits, annotate_points, decode_image, image_bytes, image_hash,
                                model_frame_images, png_bytes)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height, with almost no pixel data (a decompression bomb; the
    gateway's bad-input tests send it too)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(Image.new("RGB", (40, 30), "blue"), fmt), ImageLimits(), "image")
    assert image.size == (40, 30) and image.mode == "RGB"


def test_rejections_name_the_field_and_problem():
    limits = ImageLimits(max_pixels=10_000, max_bytes=50_000, formats=("PNG",))
    cases = {
        b"": "empty image",
        b"hello world": "not an image",
        png_declaring(100_000, 100_000): "more pixels than the limit",  # PIL's own bomb check fires first
        png_declaring(200, 100): "200x100 = 20000 pixels",
        encoded(Image.new("RGB", (20, 20)), "JPEG"): "format JPEG not accepted",
        b"\0" * 60_000: "more than the limit of 50000",
    }
    noisy = encoded(Image.effect_noise((90, 90), 64).convert("RGB"), "PNG")
    cases[noisy[: len(noisy) // 2]] = "truncated"
    for data, says in cases.items():
        with pytest.raises(ImageError) as err:
            decode_image(data, limits, "messages.0.content.1.image_url.url")
        assert err.value.field == "messages.0.content.1.image_url.url" and says in err.value.message, err.value


def test_image_error_survives_pickling():  # it crosses Ray process boundaries as a returned value
    err = pickle.loads(pickle.dumps(ImageError("image", "corrupt")))
    assert (err.field, err.message, str(err)) == ("image", "corrupt", "image: corrupt")


def test_image_bytes_from_data_urls_and_bare_base64():
    data = encoded(Image.new("RGB", (4, 4)), "PNG")
    b64 = base64.b64encode(data).decode()
    assert image_bytes(f"data:image/png;base64,{b64}", "image") == data
    assert image_bytes(b64, "image") == data
    for bad, says in [("data:image/png,rawbytes", "base64-encoded"), ("data:image/png;base64,@@@", "not valid base64"),
                      ("https://example.com/a.png", "remote image URLs")]:
        with pytest.raises(ImageError, match=says):
            image_bytes(bad, "image")


def test_annotate_points_marks_each_point():
    base = Image.new("RGB", (120, 80), "white")
    marked = annotate_points(base, [(30, 40), (90, 20)])
    assert marked.size == base.size and base.getpixel((30, 40)) == (255, 255, 255)  # the input is untouched
    changed = {(x, y) for x in range(120) for y in range(80) if marked.getpixel((x, y)) != (255, 255, 255)}
    assert any(abs(x - 30) <= 8 and abs(y - 40) <= 8 for x, y in changed)
    assert any(abs(x - 90) <= 8 and abs(y - 20) <= 8 for x, y in changed)
    assert Image.open(io.BytesIO(png_bytes(marked))).size == (120, 80)


def test_model_frame_images_decode_paths_or_take_images_and_give_the_first_frame(tmp_path):
    tiny = get_profile("tiny")
    first, second = Image.new("RGB", (400, 300), "red"), Image.new("RGB", (90, 500), "blue")
    paths = []
    for i, image in enumerate((first, second)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    from_paths, frame = model_frame_images(paths, tiny)
    from_images, same = model_frame_images([first, second], tiny)
    assert frame == same == FrameMap.for_image(400, 300, tiny)
    assert [im.size for im in from_paths] == [im.size for im in from_images] == [
        FrameMap.for_image(400, 300, tiny).model_size, FrameMap.for_image(90, 500, tiny).model_size]
    assert [image_hash(im) for im in from_paths] == [image_hash(im) for im in from_images]


def test_image_hash_names_mode_size_and_pixels():
    base = Image.new("RGB", (4, 4), "red")
    changed = base.copy()
    changed.putpixel((3, 3), (254, 0, 0))
    hashes = {image_hash(base), image_hash(changed), image_hash(base.convert("RGBA")),
              image_hash(Image.new("RGB", (2, 8), "red"))}
    assert len(hashes) == 4 and image_hash(base.copy()) == image_hash(base)
