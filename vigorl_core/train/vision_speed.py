"""A faster forward for the frozen Qwen2.5-VL vision tower: each block's element-wise work fused by torch.compile.

A 1344-px image is 9,216 patches through 32 blocks, and between the matmuls each block runs a dozen element-wise
kernels over them: two RMSNorms, the vision rotary embedding with its float32 round trip, bias adds, SiLU x up in
the MLP, residuals. `compile_vision_blocks` compiles each block around the batched window attention of
vigorl_core.train.vision_attention (which stays eager); one compiled graph serves every block. On one H200 the
tower's forward over two such images went from 0.139 s to 0.070 s (bench/vision_profile.py,
bench/results/vision_forward_gpu.json). The patch embedding, a Conv3d whose stride equals its kernel, measured
the same as the equivalent matmul there, so it stays as transformers has it.

    from vigorl_core.train.vision_speed import compile_vision_blocks
    compile_vision_blocks(model)   # a Qwen2.5-VL HF model; prepare_for_training does it with any kernels

Importable without torch.
"""

from __future__ import annotations

from typing import Any


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
