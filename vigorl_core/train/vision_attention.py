"""Window attention of the Qwen2.5-VL vision tower in a few batched SDPA calls instead of one per window.

Without flash-attn, transformers runs the ViT's attention once per window (`torch.split` on cu_seqlens):
a 1344-px image has 144 windows, so 28 windowed blocks launch about 4,000 attention calls per image and
the tower is bound by kernel-launch overhead on a GPU (0.3 s of an 0.85 s 3B SFT micro-step on an H100,
bench/sft_profile.py). Windows are mostly the same length (64 patches; smaller ones only on the right and
bottom edges), so grouping them by length makes each group one batched SDPA call: a handful of calls per
block, the same arithmetic.

    from vigorl_core.train.vision_attention import batch_window_attention
    batch_window_attention(model)   # a Qwen2.5-VL HF model with attn_implementation="sdpa"

Patches the tower's attention modules of that model instance only (other models in the process keep
transformers' code). Importable without torch.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

# transformers' own forward must take these: the patch reproduces that forward (qkv, vision rotary, proj).
_EXPECTED_PARAMS = ("hidden_states", "cu_seqlens", "position_embeddings")


class _WindowPlan:
    """How to cut the packed patch sequence described by `cu_seqlens` into same-length window groups:
    a permutation that puts each group's windows next to each other, and the groups' (count, length)."""

    def __init__(self, cu_seqlens):
        import torch

        self.cu_seqlens = cu_seqlens  # kept so the cache key (its id) cannot be reused by another tensor
        bounds = cu_seqlens.tolist()  # one host sync per tower forward (transformers syncs once per block)
        starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds, bounds[1:])]
        by_length: dict[int, list[int]] = {}
        for start, length in zip(starts, lengths):
            by_length.setdefault(length, []).append(start)
        self.groups = [(len(group), length) for length, group in by_length.items() if length]
        order = [torch.arange(s, s + length) for length, group in by_length.items() for s in group]
        perm = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
        self.identity = bool(torch.equal(perm, torch.arange(len(perm))))
        self.perm = perm.to(cu_seqlens.device)
        self.inverse = torch.argsort(perm).to(cu_seqlens.device)


def grouped_window_attention(query, key, value, cu_seqlens, scaling: float, plan: _WindowPlan | None = None):
    """Attention within each segment of `cu_seqlens` (no attention across segments).

    query/key/value [heads, seq, head_dim]; returns [seq, heads, head_dim]."""
    import torch
    import torch.nn.functional as F

    plan = plan or _WindowPlan(cu_seqlens)
    heads, _, dim = query.shape
    if not plan.identity:
        query, key, value = (t.index_select(1, plan.perm) for t in (query, key, value))
    outputs, offset = [], 0
    for count, length in plan.groups:
        size = count * length
        q, k, v = (t[:, offset:offset + size].reshape(heads, count, length, dim).transpose(0, 1)
                   for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # [count, heads, length, dim]
        outputs.append(out.transpose(1, 2).reshape(size, heads, dim))
        offset += size
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out if plan.identity else out.index_select(0, plan.inverse)


def _patched_forward(module: Any, rotary: Any, plans: dict):
    import torch

    # Kept out of torch.compile (vigorl_core.train.vision_speed compiles the blocks around it): the plan is
    # host-side bookkeeping keyed by tensor identity, and its groups' shapes change with every image size.
    @torch.compiler.disable
    def attend(q, k, v, cu_seqlens):
        plan = plans.get(id(cu_seqlens))
        if plan is None or plan.cu_seqlens is not cu_seqlens:
            if len(plans) > 8:  # each tower forward brings new cu_seqlens tensors
                plans.clear()
            plan = plans[id(cu_seqlens)] = _WindowPlan(cu_seqlens)
        return grouped_window_attention(q, k, v, cu_seqlens, module.scaling, plan)

    def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        seq_length = hidden_states.shape[0]
        q, k, v = module.qkv(hidden_states).reshape(seq_length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        out = attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_seqlens)
        return module.proj(out.reshape(seq_length, -1))
    return forward


def batch_window_attention(model: Any) -> bool:
    """Give `model`'s vision tower the grouped window attention when it runs on sdpa. Returns whether it
    did: flash-attn already runs all windows in one varlen call; a transformers version whose vision
    attention looks different is left alone."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    blocks = getattr(visual, "blocks", None)
    if blocks is None or getattr(visual.config, "_attn_implementation", None) != "sdpa":
        return False
    attn_class = type(blocks[0].attn)
    params = inspect.signature(attn_class.forward).parameters
    rotary = getattr(sys.modules[attn_class.__module__], "apply_rotary_pos_emb_vision", None)
    if rotary is None or any(p not in params for p in _EXPECTED_PARAMS) or \
            not all(hasattr(blocks[0].attn, a) for a in ("qkv", "proj", "num_heads", "scaling")):
        return False
    plans: dict = {}  # shared by the blocks: every windowed block of one forward sees the same cu_seqlens
    for block in blocks:
        block.attn.forward = _patched_forward(block.attn, rotary, plans)
    return True
