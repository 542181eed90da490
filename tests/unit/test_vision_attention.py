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


def test_tower_bookkeeping_is_computed_once_per_image_size_and_changes_no_feature(tiny_model_dir, monkeypatch):
    """The prepared tower (as the trainers prepare it) derives positions, window order and segments once per
    grid_thw and gives transformers' features; arguments it does not know go to transformers' own forward."""
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train import vision_attention
    from vigorl_core.train.sft_train import prepare_for_training

    built, build = [], vision_attention._TowerBookkeeping.__init__
    monkeypatch.setattr(vision_attention._TowerBookkeeping, "__init__",
                        lambda self, visual, grid, device: (built.append(grid), build(self, visual, grid, device))[1])
    stock, prepared = (AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
                       for _ in range(2))
    prepare_for_training(prepared)
    width = stock.model.visual.patch_embed.proj.weight[0].numel()
    torch.manual_seed(0)
    for grids in ([[1, 16, 16]], [[1, 20, 28], [1, 12, 8]], [[1, 16, 16]], [[1, 20, 28], [1, 12, 8]]):
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), width)
        with torch.no_grad():
            want, got = (m.model.visual(pixels, grid_thw=grid).pooler_output for m in (stock, prepared))
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert built == [((1, 16, 16),), ((1, 20, 28), (1, 12, 8))]
    with torch.no_grad():
        out = prepared.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
    assert torch.allclose(out.pooler_output, want, atol=1e-5) and out.hidden_states is not None
    assert len(built) == 2
