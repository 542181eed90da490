"""Window attention of the Qwen2.5-VL vision tower in a few batched SDPA calls instead of one per window, and
the tower's per-image-size bookkeeping computed once per size.

Without flash-attn, transformers runs the ViT's attention once per window (`torch.split` on cu_seqlens):
a 1344-px image has 144 windows, so 28 windowed blocks launch about 4,000 attention calls per image and
the tower is bound by kernel-launch overhead on a GPU (0.3 s of an 0.85 s 3B SFT micro-step on an H100,
bench/sft_profile.py). Windows are mostly the same length (64 patches; smaller ones only on the right and
bottom edges), so grouping them by length makes each group one batched SDPA call: a handful of calls per
block, the same arithmetic.

Before its blocks, transformers' tower derives from `grid_thw` the rotary positions, the window order and the
attention segments (`cu_seqlens`, `cu_window_seqlens`), with a Python loop per image and host waits on the GPU
(`.tolist()`, `unique_consecutive`); the window plan above adds one more per segment tensor. They depend on the
image sizes only, so the patched tower computes them once per `grid_thw` (on the CPU) and hands them to
transformers' own forward, which accepts them precomputed (transformers.vision_utils): a forward then waits on
the GPU once, to read `grid_thw`.

    from vigorl_core.train.vision_attention import batch_window_attention
    batch_window_attention(model)   # a Qwen2.5-VL HF model with attn_implementation="sdpa"

Patches the tower and its attention modules of that model instance only (other models in the process keep
transformers' code). Importable without torch.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

# transformers' own forward must take these: the patch reproduces that forward (qkv, vision rotary, proj).
_EXPECTED_PARAMS = ("hidden_states", "cu_seqlens", "position_embeddings")
# The helpers whose results transformers' tower forward accepts precomputed (popped from its keyword arguments).
_PRECOMPUTED = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")


class _WindowPlan:
    """How to cut the packed patch sequence described by `cu_seqlens` into same-length window groups:
    a permutation that puts each group's windows next to each other, and the groups' (count, length)."""

    def __init__(self, cu_seqlens, bounds: list[int] | None = None):
        import torch

        self.cu_seqlens = cu_seqlens  # kept so the cache key (its id) cannot be reused by another tensor
        if bounds is None:  # a host sync, unless the tower's bookkeeping cache brought them (_TowerBookkeeping)
            bounds = cu_seqlens.tolist()
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


class _TowerBookkeeping:
    """What transformers' tower derives from one `grid_thw` before its blocks, computed on the CPU and kept on
    `device`: the keyword arguments its forward takes precomputed, and the window plans of both segment tensors."""

    def __init__(self, visual: Any, grid: tuple, device: Any):
        import torch

        utils = sys.modules[type(visual).__module__]  # the helpers transformers' forward calls, as it imports them
        grid_cpu = torch.tensor(grid, dtype=torch.long)
        position_ids = utils.get_vision_position_ids(grid_cpu, visual.spatial_merge_size)
        cu_seqlens, _ = utils.get_vision_attention_seqlens(grid_cpu, visual.config)
        window_index, cu_window_seqlens = utils.get_vision_window_index(
            grid_cpu, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        self.kwargs = {"position_ids": position_ids.to(device), "cu_seqlens": cu_seqlens.to(device),
                       "window_index": window_index.to(device), "cu_window_seqlens": cu_window_seqlens.to(device)}
        self.plans = {id(self.kwargs[k]): _WindowPlan(self.kwargs[k], host.tolist())
                      for k, host in (("cu_seqlens", cu_seqlens), ("cu_window_seqlens", cu_window_seqlens))}


def _cached_tower_forward(visual: Any, plans: dict):
    stock = visual.forward
    cache: dict = {}

    def forward(hidden_states, grid_thw, **kwargs):
        if set(kwargs) - {"return_dict"}:  # inputs precomputed by the caller, outputs to record: transformers' path
            return stock(hidden_states, grid_thw, **kwargs)
        key = (hidden_states.device, tuple(map(tuple, grid_thw.tolist())))  # the one host wait (none on CPU)
        book = cache.get(key)
        if book is None:
            if len(cache) >= 256:  # image sizes come from a bounded set; this only caps memory
                cache.clear()
            book = cache[key] = _TowerBookkeeping(visual, key[1], hidden_states.device)
        plans.clear()
        plans.update(book.plans)
        return stock(hidden_states, grid_thw, **book.kwargs, **kwargs)
    return forward


def batch_window_attention(model: Any) -> bool:
    """Give `model`'s vision tower the grouped window attention when it runs on sdpa, and its bookkeeping
    computed once per image size where transformers takes it precomputed. Returns whether it did: flash-attn
    already runs all windows in one varlen call; a transformers version whose vision attention looks
    different is left alone."""
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
    module = sys.modules[type(visual).__module__]
    if all(hasattr(module, f) for f in _PRECOMPUTED):  # transformers >= 5.17 takes the bookkeeping precomputed
        visual.forward = _cached_tower_forward(visual, plans)
    return True
