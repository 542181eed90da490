"""Each micro-step's bf16 gradients added into DeepSpeed's fp32 gradient sums in one pass instead of two.

DeepSpeed's BF16 optimizer (one bf16 rank, vigorl_core.train.sft_train.deepspeed_config) adds every bf16 gradient
to its fp32 sum as backward produces it, as `sum.add_(grad.to(float32))`: one kernel writes an fp32 copy of the
gradient, a second reads it back, 18 bytes moved per parameter and micro-step. For a 3B model on one H200 the two
kernels took 165 ms of each 2.9 s optimizer step (8 micro-steps; 3,500 casts at 1.6 TB/s, 3,500 adds). `add_into`
reads the bf16 gradient and the fp32 sum and writes the sum in one Triton kernel: 10 bytes. The sums are
bit-identical: a bf16 value converts to fp32 exactly, and the add is the same fp32 add.

    from vigorl_core.train.grad_sums import fuse_bf16_grad_sums
    fuse_bf16_grad_sums(engine.optimizer)   # after deepspeed.initialize; False (left alone) if not a BF16 optimizer

On the CPU (and for tensors the kernel does not take) `add_into` is torch's mixed-dtype `add_`, also one pass.
Importable without torch.
"""

from __future__ import annotations

import types
from typing import Any

_KERNEL: list = []  # the Triton kernel, compiled on first use on a GPU
_BLOCK = 4096


def _kernel():
    if not _KERNEL:
        import triton
        import triton.language as tl

        @triton.jit
        def add_bf16_into_fp32(sum_ptr, grad_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            keep = offsets < n
            total = tl.load(sum_ptr + offsets, mask=keep)
            grad = tl.load(grad_ptr + offsets, mask=keep)
            tl.store(sum_ptr + offsets, total + grad.to(tl.float32), mask=keep)

        _KERNEL.append(add_bf16_into_fp32)
    return _KERNEL[0]


def add_into(total, grad) -> None:
    """total += grad, in place: total a float32 tensor, grad a tensor of the same number of elements (bf16 from
    the trainer; any float dtype works)."""
    import torch

    grad = grad.view(total.shape)
    if (total.is_cuda and total.dtype == torch.float32 and grad.dtype == torch.bfloat16 and total.is_contiguous()
            and grad.is_contiguous()):
        n = total.numel()
        _kernel()[((n + _BLOCK - 1) // _BLOCK,)](total, grad, n, BLOCK=_BLOCK, num_warps=8)
    else:
        total.add_(grad)


def fuse_bf16_grad_sums(optimizer: Any) -> bool:
    """Make `optimizer` (DeepSpeed's BF16_Optimizer) sum gradients with add_into; returns whether it did (other
    optimizers, and DeepSpeed versions whose gradient update looks different, are left alone)."""
    stock = getattr(optimizer, "_update_hp_grad", None)
    if stock is None or not hasattr(optimizer, "fp32_groups_gradients") or \
            not hasattr(optimizer, "fp32_groups_has_gradients"):
        return False

    def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads):
        if lp.grad is None or getattr(self, "autoep_folding_tp_group", None) is not None:
            return stock(lp, group_idx, param_idx, clear_lp_grads)  # nothing to add, or DeepSpeed's MoE correction
        hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
        add_into(hp_grad.data, lp.grad.data)
        lp._hp_grad = hp_grad
        self.fp32_groups_has_gradients[group_idx][param_idx] = True
        if clear_lp_grads:
            lp.grad.zero_()

    optimizer._update_hp_grad = types.MethodType(_update_hp_grad, optimizer)
    return True
