"""Fused kernels for the trainer's language model: Liger's Triton kernels or torch.compile per decoder layer.

A 3B micro-step spends much of its time in small element-wise kernels around the matmuls (RMSNorm, SwiGLU, the
multimodal rotary embedding), each a read and a write of the activations. Two ways to fuse them:
- liger: LinkedIn's Liger kernels (`pip install liger-kernel`, Triton, GPU only) replace RMSNorm, SwiGLU and the
  rotary embedding of this model instance and of transformers' Qwen2.5-VL module (the text rotary through
  `text_rope`: Liger's own patch misses it on transformers 5); logits and the loss stay ours
  (the SFT loss projects only the labelled positions, so a fused linear cross-entropy would buy little);
- compile: `torch.compile` of each language-model decoder layer (one compiled graph reused by every layer,
  dynamic sequence lengths), which fuses the same element-wise work with Inductor; works on CPU too.
`auto` picks liger on a GPU when liger-kernel is installed, else nothing.

    from vigorl_core.train.kernels import apply_kernels
    apply_kernels(model, "auto", gpu=True)   # -> "liger" | "none" (what was applied)

Importable without torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

KERNELS = ("auto", "liger", "compile", "none")


def resolve_kernels(kernels: str, gpu: bool) -> str:
    """The kernels `kernels` means on this machine; ValueError for an unknown name or liger without its package
    or without a GPU."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: {kernels!r} is not one of {', '.join(KERNELS)}")
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if kernels == "auto":
        return "liger" if gpu and has_liger else "none"
    if kernels == "liger" and not (gpu and has_liger):
        raise ValueError("kernels: liger needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)"
                         + ("" if has_liger else "; it is not installed"))
    return kernels


def apply_kernels(model: Any, kernels: str, gpu: bool) -> str:
    """Apply `kernels` (see the module docstring) to a Qwen2.5-VL model in place; returns what was applied."""
    chosen = resolve_kernels(kernels, gpu)
    if chosen == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                         fused_linear_cross_entropy=False, model=model)
        text_rope(liger_rotary_pos_emb)
    elif chosen == "compile":
        for layer in model.model.language_model.layers:
            layer.compile(dynamic=True)
    return chosen


def text_rope(rope: Any) -> bool:
    """Make Qwen2.5-VL's text attention rotate queries and keys with `rope` (Liger's rotary kernel), where
    transformers' attention calls the plain `apply_rotary_pos_emb(q, k, cos, sin)`; returns whether it does.

    transformers >= 5 merges the M-RoPE sections in the rotary embedding (cos and sin [B, L, head_dim]), so the
    attention applies a plain rotary embedding, and Liger's Qwen2.5-VL patch, written for the older
    `apply_multimodal_rotary_pos_emb`, changes nothing: the rotation ran as a dozen eager kernels per layer
    (slices, neg, cat, four mul and two add forward, as many backward), 150 ms of a 2.9 s optimizer step of a
    3B model on an H200. Liger's LLaMA rotary kernel computes the same rotation on the merged cos/sin. Patches
    transformers' module (every Qwen2.5-VL model in the process), as Liger's own patch does."""
    import inspect

    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module

    source = inspect.getsource(module.Qwen2_5_VLAttention.forward)
    if "apply_rotary_pos_emb(query_states, key_states, cos, sin)" not in source:
        return False
    module.apply_rotary_pos_emb = rope
    return True
