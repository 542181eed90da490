"""Grouped window attention (vigorl_core/train/vision_attention.py) equals transformers' per-window attention."""

from __future__ import annotations

import pytest
import torch

from vigorl_core.train.vision_attention import (
    batch_window_attention,
    grouped_window_attention,
)


def test_grouped_attention_equals_attention_per_segment():
    torch.manual_seed(0)
    lengths = [64, 64, 32, 64, 16, 32, 64]  # full windows, right/bottom edge windows, a corner
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(4, sum(lengths), 8) for _ in range(3))
    got = grouped_window_attention(q, k, v, cu, scaling=8 ** -0.5)
    expected = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b]).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert got.shape == (sum(lengths), 4, 8)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("grids", [[[1, 16, 16]], [[1, 20, 28], [1, 16, 16], [1, 12, 8]]])
def test_patched_tower_matches_transformers_forward_and_backward(tiny_model_dir, grids):
    from transformers import AutoModelForImageTextToText

    grid = torch.tensor(grids)
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    results = []
    for patched in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        assert batch_window_attention(model) if patched else True
        visual = model.model.visual
        out = visual(pixels, grid_thw=grid).pooler_output
        out.square().sum().backward()
        results.append((out.detach(), visual.blocks[0].attn.qkv.weight.grad.clone()))
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(grad_a, grad_b, atol=1e-4)


def test_left_alone_without_sdpa(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not batch_window_attention(model)
    assert "forward" not in vars(model.model.visual.blocks[0].attn)
