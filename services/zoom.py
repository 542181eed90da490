"""ZoomServer: the zoom environment's image side as a Ray Serve deployment (CPU replicas).

Decoding untrusted image bytes is CPU work that must not block the HTTP ingress, so it happens here:
`decode` checks the limits (vigorl_core.images), decodes and resizes to the model frame, and keeps the
result in a store keyed by the content hash of the bytes, so an image that comes again (a chat client
re-sends the whole history with every turn; benchmarks ask several questions per image) is not decoded
twice. `annotate` draws numbered points on the original image. Zoom crops are cut where the conversation
runs (vigorl_core.zoom.ZoomEnv in the rollout driver), not here.

    zoom = ZoomServer.bind(profile, limits)            # in an app builder
    decoded = await zoom_handle.decode.remote(data, "image")
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from PIL import Image
from ray import serve

from vigorl_core.frames import FrameMap, ModelProfile, resize_to_model
from vigorl_core.images import ImageError, ImageLimits, annotate_points, decode_image, png_bytes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class DecodedImage:
    """An accepted image: its model-frame pixels, the frame map, the content hash and the format."""

    image: Image.Image
    frame: FrameMap
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "original_size": list(self.frame.original_size),
                "model_size": list(self.frame.model_size)}


@serve.deployment(name="ZoomServer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
class ZoomServer:
    """Image decoding, the content-addressed image store and annotations."""

    def __init__(self, profile: dict[str, Any], limits: dict[str, Any], store_bytes: int = 512 * 1024 * 1024):
        self.profile = ModelProfile(**profile)
        self.limits = ImageLimits(**limits)
        self.store_bytes = store_bytes
        self._store: OrderedDict[str, DecodedImage] = OrderedDict()
        self._stored_bytes = 0

    def _remember(self, decoded: DecodedImage) -> None:
        self._store[decoded.sha256] = decoded
        self._stored_bytes += decoded.image.width * decoded.image.height * 3
        while self._stored_bytes > self.store_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self._stored_bytes -= old.image.width * old.image.height * 3

    async def decode(self, data: bytes, field: str) -> DecodedImage | ImageError:
        """The model-frame image of `data`, or the ImageError that says what is wrong with it (returned,
        not raised, so the caller gets the typed error across the process boundary). Hashing and decoding run
        in a worker thread (PIL and hashlib release the GIL), so one replica decodes concurrent requests in
        parallel: as a plain method they queued (83 ms per request at 16 concurrent on a GPU host); the store
        is touched only on the event loop."""
        digest = await asyncio.to_thread(_sha256, data)
        cached = self._store.get(digest)
        if cached is not None:
            self._store.move_to_end(digest)
            return cached
        decoded = await asyncio.to_thread(self._decode, data, field, digest)
        if isinstance(decoded, DecodedImage):
            self._remember(decoded)
        return decoded

    def _decode(self, data: bytes, field: str, digest: str) -> DecodedImage | ImageError:
        try:
            original = decode_image(data, self.limits, field)
        except ImageError as err:
            return err
        image, frame = resize_to_model(original, self.profile)
        return DecodedImage(image, frame, digest)

    def annotate(self, data: bytes, points: list[tuple[float, float]], field: str = "image") -> bytes:
        """PNG of the ORIGINAL image with numbered markers at `points` (original-frame pixels)."""
        return png_bytes(annotate_points(decode_image(data, self.limits, field), points))
