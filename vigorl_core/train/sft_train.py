"""Pure pieces of SFT training, called by the Ray Train plumbing in jobs/sft.py (no Ray here).

- `cosine_lr`: the learning rate of an optimizer step (linear warmup, cosine decay), a function of the
  step alone, so a resumed run continues the schedule without scheduler state;
- `loss_positions` / `token_nll`: next-token loss summed over labelled tokens; `exact_matches`: which examples
  greedy decoding would reproduce (validation);
- `deepspeed_config`: the ZeRO config for a stage, batch split and precision (one bf16 rank: the
  BF16 optimizer, no ZeRO buckets);
- `prepare_for_training`: which parameters train (vision tower frozen by default), gradient checkpointing,
  the vision tower's batched window attention (and compiled blocks with any kernels), the attention backend and
  a placeholder check that does not wait on the GPU;
- `set_system_template` / `save_hf_checkpoint`: a standard Hugging Face folder (weights, processor,
  tokenizer, chat template whose default system message is the task's prompt, as the released ViGoRL
  models ship it) that transformers and vLLM load directly, without a merge step;
- `point_latest` / `truncate_log`: the run folder's `latest` link and its step log on resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vigorl_core.train.sft_data import IGNORE_INDEX

DEFAULT_SYSTEM = "You are a helpful assistant."  # the Qwen2.5-VL template's fallback system message


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """LR of optimizer step `step` (0-based) of `total_steps`: linear warmup over ceil(warmup_ratio * total)
    steps up to `peak_lr` (the first step already moves, unlike HF's schedule whose first step has lr 0),
    then half a cosine towards `min_lr_ratio * peak_lr`, reached one step after the last (as HF's schedule)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_positions(labels):
    """Positions p (1-D LongTensor) whose next token carries a label in any row of `labels` [B, L]: pass as
    `logits_to_keep` so the model projects only those hidden states to the vocabulary (the prompt and image
    tokens of SFT chains are most of a sequence; full-vocabulary logits of them would be wasted memory)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def token_nll(logits, labels, positions):
    """Summed next-token negative log-likelihood and the number of labelled tokens.

    logits [B, K, V] at `positions` [K] (see loss_positions); labels [B, L] with IGNORE_INDEX = no loss.
    Returns (sum, count): 0-d tensors, float32 with grad and int64 (no host sync on GPU)."""
    import torch.nn.functional as F

    targets = labels[:, positions + 1]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


def exact_matches(logits, labels, positions):
    """Per row of labels [B, L]: 1 when every labelled token is the most likely one given the true prefix
    (logits [B, K, V] at `positions` [K], as token_nll takes them), i.e. greedy decoding would write the
    labelled text exactly; -1 for a row without labels (not counted). Teacher-forced, so one forward pass
    scores it: a cheap validation measure of a skill whose loss says little, such as naming the right point."""
    import torch

    targets = labels[:, positions + 1]
    labelled = targets != IGNORE_INDEX
    right = (logits.argmax(-1) == targets) | ~labelled
    return torch.where(labelled.any(1), right.all(1).long(), torch.full_like(right[:, 0], -1, dtype=torch.long))


def deepspeed_config(stage: int, micro_batch: int, accumulation: int, world_size: int, bf16: bool,
                     max_grad_norm: float, offload_optimizer: bool = False, gpu: bool = False) -> dict[str, Any]:
    """DeepSpeed config for ZeRO `stage` with a client (torch) optimizer: DeepSpeed's own Adam variants
    JIT-compile C++/CUDA ops on first use (20-30 s each), torch's AdamW needs nothing built. Gradient
    communication overlaps backward on GPUs (CUDA streams); gloo on CPU has no streams to overlap on.

    One rank with bf16 and stage 1 or 2 (`uses_bf16_optimizer`): ZeRO has nothing to partition, and stage 2's
    gradient buckets cost a 3B micro-step 0.23 s of backward and 0.17 s of optimizer on an H100
    (bench/sft_profile.py), so the config asks for DeepSpeed's BF16 optimizer instead (stage 1 with fp32
    gradient accumulation): the same fp32 master weights, AdamW state and fp32 gradient sums, no buckets.
    It adds each bf16 gradient to its fp32 sum as backward produces it and drops it (`immediate_grad_update`):
    by default DeepSpeed zeroes every bf16 gradient before each micro-step, lets backward add into them and
    sums them all afterwards, three more passes over 6 GB of gradients per micro-step of a 3B model. The sums
    are the same either way (tests/integration/test_trainer_bf16.py). DeepSpeed's throughput timer is off: it
    synchronizes the device twice per micro-step."""
    bf16_optimizer = uses_bf16_optimizer(stage, world_size, bf16, offload_optimizer)
    stage = 1 if bf16_optimizer else stage
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": gpu,
                            "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if stage == 3:
        # save_hf_checkpoint needs the full 16-bit weights gathered on rank 0.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=5e7,
                    stage3_param_persistence_threshold=1e5)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronizes the device at every forward and every step()
        # to time them; the job times its own steps, and each of those waits left the GPU idle.
        "timers": {"throughput": {"enabled": False}},
    }
    if bf16_optimizer:  # bf16 weights + fp32 gradient sums at stage 1 = DeepSpeed's BF16_Optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["bf16"]["immediate_grad_update"] = True
    return config


def uses_bf16_optimizer(stage: int, world_size: int, bf16: bool, offload_optimizer: bool = False) -> bool:
    """Whether a run gets DeepSpeed's BF16 optimizer instead of ZeRO: bf16, one rank, stage 1 or 2 (stage 3
    and optimizer offload are asked for memory, not speed, and keep ZeRO)."""
    return world_size == 1 and bf16 and stage in (1, 2) and not offload_optimizer


def prepare_for_training(model: Any, *, freeze_vision_tower: bool = True, freeze_projector: bool = False,
                         gradient_checkpointing: bool = False, kernels: str = "none", gpu: bool = False) -> list:
    """Set which parameters of a Qwen2.5-VL train and turn on gradient checkpointing; returns the trainable
    parameters. A frozen vision tower keeps its merger (the projector into the language model) trainable
    unless `freeze_projector`. The tower's window attention runs batched and its per-image-size bookkeeping is
    computed once per size (vigorl_core.train.vision_attention),
    and torch's cuDNN attention backend is turned off for this process: on an H100 (torch 2.11) its
    per-call CPU cost made a 3B micro-step's backward 0.34 s against 0.20 s with the flash backend
    (bench/sft_profile.py).

    transformers' `gradient_checkpointing_enable` also hooks every input embedding (the ViT's patch
    embedding included) to make its output require grad, a PEFT convenience. With the ViT frozen that
    makes autograd record, recompute and backpropagate the whole frozen tower: on a 3B model with 1344-px
    images it was most of the step (thousands of per-window attention calls). Non-reentrant
    checkpointing needs no such hook and the text embedding trains in a full fine-tune, so it is removed.

    `kernels` fuses the language model's element-wise work (vigorl_core.train.kernels: auto, liger, compile,
    none; `gpu` says whether the model trains on a CUDA GPU); any kernels but none also compile the vision
    tower's blocks (vigorl_core.train.vision_speed). The placeholder check of the image tokens becomes a
    device-side assertion (vigorl_core.train.device_batch), so a forward does not wait on the GPU for it."""
    import torch

    from vigorl_core.train.device_batch import check_placeholders_async
    from vigorl_core.train.kernels import apply_kernels
    from vigorl_core.train.vision_attention import batch_window_attention
    from vigorl_core.train.vision_speed import compile_vision_blocks

    visual = model.model.visual
    if freeze_vision_tower:
        for name, param in visual.named_parameters():
            if not name.startswith("merger."):
                param.requires_grad_(False)
    if freeze_projector:
        visual.merger.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    model.config.use_cache = False
    batch_window_attention(model)
    check_placeholders_async(model)
    if apply_kernels(model, kernels, gpu) != "none":
        compile_vision_blocks(model)
    torch.backends.cuda.enable_cudnn_sdp(False)
    return [p for p in model.parameters() if p.requires_grad]


def chat_template_with_system(template: str, system: str) -> str:
    """`template` with its fallback system message replaced by `system` (kept verbatim: Jinja raw block),
    so a chat without a system message gets the task's prompt: the released models bake it in because
    without it they write no coordinates (issue #25 of the original repository). The fallback is Qwen's
    default message, or the raw block an earlier fine-tune put there (SFT of a fine-tuned checkpoint)."""
    if "{% endraw %}" in system:
        raise ValueError("the system prompt contains '{% endraw %}'")
    ours = "{% raw %}" + system + "{% endraw %}"
    if DEFAULT_SYSTEM in template:
        return template.replace(DEFAULT_SYSTEM, ours)
    earlier = re.search(r"\{% raw %\}.*?\{% endraw %\}", template, flags=re.DOTALL)
    if earlier is None:
        raise ValueError(f"the chat template has no default system message {DEFAULT_SYSTEM!r} to replace")
    return template[:earlier.start()] + ours + template[earlier.end():]


def set_system_template(processor: Any, system: str) -> Any:
    """Give `processor` and its tokenizer the chat template whose default system message is `system`
    (every loader finds it: vLLM reads the tokenizer's, transformers the processor's). Returns it."""
    template = chat_template_with_system(processor.chat_template or processor.tokenizer.chat_template, system)
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    return processor


def save_hf_checkpoint(out_dir: str | Path, model: Any, processor: Any, *, state_dict: dict | None = None,
                       source_dir: str | Path | None = None) -> Path:
    """Write model weights (safetensors; `state_dict` overrides the module's, e.g. ZeRO-3's gathered 16-bit
    weights), processor and tokenizer (see set_system_template) into `out_dir`. The project's model marker
    (vigorl_model.json: preset and frames profile) is copied from `source_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(out)
    marker = Path(source_dir, "vigorl_model.json") if source_dir is not None else None
    if marker is not None and marker.is_file():
        shutil.copy(marker, out / marker.name)
    return out


def point_latest(run_dir: str | Path, checkpoint_dir: str | Path) -> Path:
    """Make `run_dir/latest` a relative symlink to `checkpoint_dir` (replaced atomically)."""
    run_dir = Path(run_dir)
    link, tmp = run_dir / "latest", run_dir / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(Path(checkpoint_dir).resolve(), run_dir.resolve()))
    os.replace(tmp, link)
    return link


def truncate_log(path: str | Path, last_step: int) -> int:
    """Move step records after `last_step` out of a JSONL log into `<name>.superseded.jsonl` (a restarted
    run redoes those steps, so each step stays logged once, and the first attempt can still be compared
    with the redo); returns the number of lines kept. Lines without a step (events) are kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (kept if json.loads(line).get("step", -1) <= last_step else dropped).append(line + "\n")
    if dropped:
        with open(path.with_name(path.stem + ".superseded.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(dropped)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(kept)
