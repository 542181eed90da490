"""A faster forward for the frozen Qwen2.5-VL vision tower: the patch embedding as one matmul, and each block's
element-wise work fused by torch.compile.

- `linear_patch_embed`: transformers embeds patches with an nn.Conv3d whose stride equals its kernel
  (2 x 14 x 14), which is a matmul of the flattened patches by the flattened weight; torch's Conv3d path for it
  is far slower on a GPU than that matmul. Same weights, same result.
- `compile_vision_blocks`: `torch.compile` of each vision block (RMSNorms, the vision rotary embedding with its
  float32 round trip, bias adds, SiLU x up of the MLP, residuals) around the batched window attention of
  vigorl_core.train.vision_attention, which stays eager. One compiled graph serves every block.

    from vigorl_core.train.vision_speed import compile_vision_blocks, linear_patch_embed
    linear_patch_embed(model); compile_vision_blocks(model)   # a Qwen2.5-VL HF model

bench/vision_profile.py measures both on a GPU. Importable without torch.
"""

from __future__ import annotations

from typing import Any


def linear_patch_embed(model: Any) -> bool:
    """Run `model`'s vision patch embedding as one matmul (this instance only). Returns whether it did: a
    patch embedding that is not a bias-free, stride-equals-kernel Conv3d is left alone."""
    embed = getattr(getattr(getattr(model, "model", None), "visual", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if proj is None or getattr(proj, "bias", 1) is not None or tuple(proj.stride) != tuple(proj.kernel_size) \
            or any(proj.padding):
        return False
    width = proj.weight[0].numel()  # in_channels x temporal x patch x patch, in the order Conv3d reads them

    def forward(hidden_states):
        import torch.nn.functional as F

        weight = proj.weight
        return F.linear(hidden_states.to(weight.dtype).reshape(-1, width), weight.reshape(weight.shape[0], width))
    embed.forward = forward
    return True


def compile_vision_blocks(model: Any) -> int:
    """torch.compile each of `model`'s vision blocks (dynamic sequence lengths); returns how many."""
    blocks = model.model.visual.blocks
    for block in blocks:
        for norm in (block.norm1, block.norm2):
            # Liger's instance patch (kernels: liger) binds its Triton RMSNorm here; dynamo does not trace it,
            # and the compiled block fuses the plain norm as well.
            norm.__dict__.pop("forward", None)
        block.compile(dynamic=True)
    return len(blocks)
