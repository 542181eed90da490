"""A collated training batch on the GPU and the forward's inputs, arranged so that the host never waits on the GPU.

Every host wait (`.item()`, `.tolist()`, a Python `if` on a GPU tensor, a blocking copy) drains the GPU's queue: the
GPU then idles while the host prepares the next kernels. A Qwen2.5-VL training micro-step in transformers waited
five times before any of this: the vision tower read `grid_thw` and the image-feature split read it again
(`.tolist()`), the placeholder check compared token and feature counts in Python (its message formats the count),
and the causal mask checked the padding mask for padding. This module removes all of them:
- `to_device(batch, device)` copies a collated batch (vigorl_core.train.sft_data.collate) without blocking and
  leaves `image_grid_thw` on the host, where both readers find it without a wait;
- `model_inputs(batch)` is what the model's forward takes: no labels, no loss positions and no attention mask.
  Collated batches are right-padded, so under causal attention no real token can see a pad: the logits of every
  real token are the same without the mask, and SDPA runs its causal flash kernel instead of building a mask;
- `check_placeholders_async(model)` makes that model instance's placeholder check a device-side assertion.

    from vigorl_core.train.device_batch import model_inputs, to_device
    batch = to_device(collated, "cuda")
    logits = model(**model_inputs(batch), logits_to_keep=batch["loss_positions"]).logits

Importable without torch.
"""

from __future__ import annotations

import types
from typing import Any

HOST_KEYS = ("image_grid_thw",)  # read on the host by the vision tower and the feature split
NOT_MODEL_INPUTS = ("labels", "loss_positions", "attention_mask")


def to_device(batch: dict, device: Any) -> dict:
    """`batch` with its tensors on `device` (non-blocking: pin the batch for an asynchronous copy), except
    HOST_KEYS, which stay where they are."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keyword inputs of the model's forward for a right-padded collated batch (see the module docstring)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def check_placeholders_async(model: Any) -> bool:
    """Give `model` (a Qwen2.5-VL HF model) a placeholder check that does not wait on the GPU: the same masks as
    transformers' `get_placeholder_mask`, and the same check (as many image tokens as image features) as a
    device-side assertion (on the CPU it raises at once). Returns whether the model has that method."""
    inner = getattr(model, "model", None)
    stock = getattr(inner, "get_placeholder_mask", None)
    if stock is None:
        return False

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        import torch

        if input_ids is None:  # masks found by comparing embeddings: transformers' own path
            return stock(input_ids, inputs_embeds, image_features=image_features, video_features=video_features)
        masks = []
        for token_id, features, kind in ((self.config.image_token_id, image_features, "image"),
                                         (self.config.video_token_id, video_features, "video")):
            mask = input_ids == token_id
            if features is not None:
                torch._assert_async(mask.sum() * inputs_embeds.shape[-1] == features.numel(),
                                    f"{kind} features and {kind} tokens do not match")
            masks.append(mask.unsqueeze(-1).to(inputs_embeds.device))
        return masks[0], masks[1]

    inner.get_placeholder_mask = types.MethodType(get_placeholder_mask, inner)
    return True
