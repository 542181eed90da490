"""Untrusted image bytes -> a decoded image, with limits checked before any pixel is decoded.

Every HTTP image goes through `decode_image`: the declared size is read from the header and checked
against `max_pixels` first (a 100,000 x 100,000 PNG of a few KB is a decompression bomb), the format
against the accepted list, then the pixels are decoded; truncated or corrupt files raise `ImageError`
with a message that says which problem it was. `image_bytes` turns a `data:` URL or bare base64 into
bytes; remote URLs are the gateway's business (allow-list).

    data = image_bytes("data:image/png;base64,iVBOR...", field="image")
    image = decode_image(data, ImageLimits(max_pixels=40_000_000), field="image")
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vigorl_core.frames import FrameMap, ModelProfile, resize_to_model

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class ImageError(ValueError):
    """A bad image; `field` names where it came from (e.g. `messages[0].content[1].image_url.url`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickles with both arguments (errors travel between Ray processes)
        return (type(self), (self.field, self.message))


@dataclass(frozen=True)
class ImageLimits:
    """What an accepted image may be: at most `max_pixels` (width x height), `max_bytes` encoded, one of
    `formats` (PIL format names)."""

    max_pixels: int = 40_000_000
    max_bytes: int = 20 * 1024 * 1024
    formats: tuple[str, ...] = DEFAULT_FORMATS


def image_bytes(url: str, field: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL, or of bare base64 text."""
    match = _DATA_URL.match(url)
    if match:
        if not match.group("b64"):
            raise ImageError(field, "data URL must be base64-encoded (data:image/png;base64,...)")
        payload = url[match.end():]
    elif url.startswith(("http://", "https://", "file:")):
        raise ImageError(field, "remote image URLs are not fetched here; send a data URL")
    else:
        payload = url
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(field, "not valid base64 (expected data:image/<type>;base64,<data>)") from None


def decode_image(data: bytes, limits: ImageLimits, field: str) -> Image.Image:
    """Decode `data` into an RGB image, checking size, format and integrity; raises ImageError."""
    if not data:
        raise ImageError(field, "empty image")
    if len(data) > limits.max_bytes:
        raise ImageError(field, f"{len(data)} bytes, more than the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(field, f"declares more pixels than the limit of {limits.max_pixels}") from None
    except Exception:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error, ... on garbage
        raise ImageError(field, "not an image (the bytes are no known image format)") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(field, f"invalid image size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(field, f"declares {width}x{height} = {width * height} pixels, more than the limit of "
                                f"{limits.max_pixels}")
    if image.format not in limits.formats:
        raise ImageError(field, f"format {image.format} not accepted; accepted: {', '.join(limits.formats)}")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as err:  # truncated files raise OSError; broken streams zlib/SyntaxError
        raise ImageError(field, f"corrupt or truncated {image.format} image ({err})") from None


def annotate_points(image: Image.Image, points: list[tuple[float, float]], radius: int | None = None) -> Image.Image:
    """A copy of `image` with numbered markers (1, 2, ...) at `points` (pixels of this image)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    r = radius or max(4, round(min(out.size) / 60))
    for number, (x, y) in enumerate(points, start=1):
        draw.ellipse([(x - r, y - r), (x + r, y + r)], outline="red", width=max(2, r // 3))
        draw.text((x + r + 2, y - r - 2), str(number), fill="red", stroke_width=2, stroke_fill="white")
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(image: Image.Image) -> str:
    """sha256 of a decoded image's mode, size and pixels: an image's name wherever it travels (rollout records,
    the replay buffer, the PolicyServer's image cache, content-addressed crop files). Only the ZoomServer hashes
    raw upload bytes instead, to find a re-sent upload before decoding it."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def model_frame_images(images: Sequence[Image.Image] | Sequence[str], profile: ModelProfile
                       ) -> tuple[list[Image.Image], FrameMap]:
    """A sample's images (decoded ones, or dataset paths decoded here) resized to the model frame
    (frames.resize_to_model), and the frame map of the first: the one the sample's points and boxes use."""
    decoded = open_images(list(images)) if images and isinstance(images[0], str) else images
    resized = [resize_to_model(im, profile) for im in decoded]
    return [im for im, _ in resized], resized[0][1]


def open_images(paths: list[str]) -> list[Image.Image]:
    """Decode trusted image files (dataset paths) fully, closing each file."""
    images = []
    for path in paths:
        with Image.open(path) as im:
            im.load()
            images.append(im)
    return images
