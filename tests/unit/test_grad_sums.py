"""One-pass fp32 gradient sums (vigorl_core.train.grad_sums): bit-identical to DeepSpeed's cast-then-add, on the CPU
(torch's mixed-dtype add) and with the Triton kernel on a GPU. The patched DeepSpeed optimizer is tested in
tests/integration/test_trainer_bf16.py."""

from __future__ import annotations

import pytest
import torch

from vigorl_core.train.grad_sums import add_into, fuse_bf16_grad_sums


def _pair(device: str, n: int):
    torch.manual_seed(0)
    total = torch.randn(n, device=device) * 3
    grad = torch.randn(n, device=device).to(torch.bfloat16)
    return total, grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_add_into_equals_cast_then_add(device):
    for n in (1, 4095, 4096 * 3 + 17):  # below, at and across the kernel's block
        total, grad = _pair(device, n)
        want = total.clone().add_(grad.to(torch.float32))
        add_into(total, grad)
        assert torch.equal(total, want)
    total, grad = _pair(device, 12)
    add_into(total.view(3, 4), grad)  # the gradient takes the sum's shape
    assert torch.equal(total, _pair(device, 12)[0] + grad.float())


def test_other_optimizers_are_left_alone():
    assert not fuse_bf16_grad_sums(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
