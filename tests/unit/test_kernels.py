"""The trainer's fused-kernel choice (vigorl_core.train.kernels): what each name means on this machine, and
torch.compile per decoder layer giving the same logits and gradients as the plain model (Inductor on CPU)."""

from __future__ import annotations

import importlib.util

import pytest

from vigorl_core.train.kernels import resolve_kernels


def test_auto_means_nothing_without_a_gpu_and_unknown_names_are_refused():
    assert resolve_kernels("auto", gpu=False) == "none"
    assert resolve_kernels("compile", gpu=False) == "compile"
    assert resolve_kernels("none", gpu=True) == "none"
    with pytest.raises(ValueError, match="'fused' is not one of auto, liger, compile, none"):
        resolve_kernels("fused", gpu=False)


def test_liger_without_a_gpu_says_what_it_needs():
    with pytest.raises(ValueError, match="liger needs a CUDA GPU and the liger-kernel package"):
        resolve_kernels("liger", gpu=False)
    if importlib.util.find_spec("liger_kernel") is None:
        assert resolve_kernels("auto", gpu=True) == "none"


def test_compiled_decoder_layers_match_the_plain_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train.sft_train import prepare_for_training

    plain, compiled = (AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
                       for _ in range(2))
    prepare_for_training(plain, kernels="none")
    prepare_for_training(compiled, kernels="compile")
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.language_model.layers)
    torch.manual_seed(0)
    for length in (17, 29):  # two lengths: dynamic shapes, no recompile needed to be right
        ids = torch.randint(0, 1000, (2, length))
        losses = [model(input_ids=ids).logits.float().logsumexp(-1).mean() for model in (plain, compiled)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
    grad = [dict(m.named_parameters())["model.language_model.layers.0.mlp.up_proj.weight"].grad
            for m in (plain, compiled)]
    assert torch.allclose(grad[0], grad[1], atol=1e-5)


def test_compiled_vision_blocks_give_the_same_features(tiny_model_dir):
    """The compiled blocks (around the batched window attention) give the tower's features of two images of
    different sizes, as transformers' own tower does."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train.vision_attention import batch_window_attention
    from vigorl_core.train.vision_speed import compile_vision_blocks

    plain, fast = (AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa") for _ in range(2))
    assert batch_window_attention(fast)
    assert compile_vision_blocks(fast) == len(fast.model.visual.blocks)
    grid = torch.tensor([[1, 8, 12], [1, 16, 8]])
    width = plain.model.visual.patch_embed.proj.weight[0].numel()
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), width)
    with torch.no_grad():
        want, got = (m.model.visual(pixels, grid_thw=grid).pooler_output for m in (plain, fast))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_text_rope_takes_the_place_the_attention_calls(tiny_model_dir, monkeypatch):
    """transformers 5's text attention calls the plain apply_rotary_pos_emb on merged M-RoPE cos/sin: text_rope
    puts a rotary function there, every layer calls it, and the same rotation gives the same logits."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module

    from vigorl_core.train.kernels import text_rope

    stock = module.apply_rotary_pos_emb
    monkeypatch.setattr(module, "apply_rotary_pos_emb", stock)  # restored after the test
    calls = []

    def counted(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # Liger's signature
        calls.append(cos.shape)
        return stock(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 13))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert text_rope(counted)
        got = model(input_ids=ids).logits
    assert len(calls) == model.config.text_config.num_hidden_layers and calls[0][:2] == (2, 13)  # cos [B, L, head_dim]
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_liger_text_rope_gives_the_plain_logits(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module

    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    from vigorl_core.train.kernels import text_rope

    monkeypatch.setattr(module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    ids = torch.randint(0, 1000, (2, 37), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert text_rope(liger_rotary_pos_emb)
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
