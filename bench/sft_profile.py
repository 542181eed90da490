"""SFT micro-step on one GPU: vigorl's model preparation vs stock transformers, and where the time goes.

    python -m bench.sft_profile --model /tmp/vigorl-3b          # after `vigorl tiny --preset 3b`
    python -m bench.sft_profile --model runs/models/tiny --cpu  # the same on CPU, tiny model

Arms (one process, no Ray, the same micro-batches of 1344-px synthetic chains, bf16, AdamW, frozen ViT,
gradient checkpointing), each timed per phase (copy, forward, backward, optimizer) with the device
synchronised around every phase:
- stock: the usual transformers recipe: freeze the ViT's parameters, `gradient_checkpointing_enable()`,
  sdpa with torch's default backends (transformers then hooks the patch embedding to require grad, so the
  frozen tower is recomputed and backpropagated; its window attention is one call per window);
- vigorl: `vigorl_core.train.sft_train.prepare_for_training` as the SFT job does it (tower out of autograd,
  batched window attention, cuDNN attention off);
- vigorl_liger, vigorl_compile: vigorl with the language model's fused kernels (vigorl_core.train.kernels: Liger's
  Triton kernels; torch.compile per decoder layer; the compile happens in the first, unmeasured micro-step);
- deepspeed: the vigorl model in a single-rank DeepSpeed engine with the job's config (one bf16 rank: the
  BF16 optimizer); deepspeed_zero2: the same with ZeRO-2 forced (what the job ran before): their overheads.
ratio = vigorl / stock tokens/s (plain loops) -> runs/bench/sft_step_<gpu|cpu>.json (--out). `vision_nograd`
times the tower's forward alone (not part of the step). `--trace` prints torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from jobs.common import set_runtime_env


def _timer(device: str):
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def _free(device: str) -> None:
    """Give the memory of the arm just measured back before the next one loads its model."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _model(model_dir: str, device: str, bf16: bool, checkpointing: bool, stock: bool, kernels: str = "none"):
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train.sft_train import prepare_for_training

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa").to(device)
    if not stock:
        prepare_for_training(model, gradient_checkpointing=checkpointing, kernels=kernels, gpu=device == "cuda")
        return model
    torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default (prepare_for_training turns it off)
    for name, param in model.model.visual.named_parameters():
        param.requires_grad_(name.startswith("merger."))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _profile_arm(name: str, model, step_fn, backward_fn, batches: list[dict], device: str, trace: bool) -> dict:
    """Per micro-step: vision tower alone (no grad), forward, backward, optimizer step."""
    import torch

    from jobs.sft import _forward

    now = _timer(device)
    rows = []
    for i, batch in enumerate(batches):
        t0 = now()
        batch = {k: v.to(device) for k, v in batch.items()}
        t1 = now()
        with torch.no_grad():
            visual = getattr(model, "module", model).model.visual  # a DeepSpeed engine wraps the model
            visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
        t2 = now()
        nll, _ = _forward(model, batch)
        t3 = now()
        backward_fn(nll / 100.0)
        t4 = now()
        step_fn()
        t5 = now()
        rows.append({"copy": t1 - t0, "vision_nograd": t2 - t1, "forward": t3 - t2, "backward": t4 - t3,
                     "optimizer": t5 - t4, "tokens": int(batch["attention_mask"].sum())})
        print(name, i, {k: round(v, 4) for k, v in rows[-1].items()}, flush=True)
    if trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        batch = {k: v.to(device) for k, v in batches[-1].items()}
        with profile(activities=activities) as prof:
            nll, _ = _forward(model, batch)
            backward_fn(nll / 100.0)
            step_fn()
            now()
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    steady = rows[1:] or rows
    summary = {k: statistics.median(r[k] for r in steady) for k in rows[0] if k != "tokens"}
    summary["tokens"] = statistics.mean(r["tokens"] for r in steady)
    summary["tokens_per_s"] = summary["tokens"] / sum(summary[k] for k in ("copy", "forward", "backward", "optimizer"))
    return summary


def _plain_arm(arm: str, args, batches: list[dict], device: str, bf16: bool, checkpointing: bool) -> dict:
    """stock, vigorl or vigorl_<kernels>: a plain loop with torch's AdamW."""
    import torch

    kernels = arm.removeprefix("vigorl_") if arm.startswith("vigorl_") else "none"
    model = _model(args.model, device, bf16, checkpointing, stock=arm == "stock", kernels=kernels)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _profile_arm(arm, model, step, lambda loss: loss.backward(), batches, device, args.trace)


def _deepspeed_arm(arm: str, args, batches: list[dict], device: str, bf16: bool, checkpointing: bool) -> dict:
    """The vigorl model in a single-rank DeepSpeed engine (deepspeed_zero2: ZeRO-2 forced)."""
    import deepspeed
    import torch

    from vigorl_core.train.sft_train import deepspeed_config

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    model = _model(args.model, device, bf16, checkpointing, stock=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                  fused=device == "cuda" or None)
    config = deepspeed_config(2, args.micro_batch, 1, 1, bf16, 1.0, gpu=device == "cuda")
    if arm == "deepspeed_zero2":
        config["zero_optimization"]["stage"] = 2
        config.pop("data_types", None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    return _profile_arm(arm, engine, engine.step, engine.backward, batches, device, args.trace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--micro-steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=1344)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=1, help="examples per micro-step")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--arms", default="stock,vigorl,deepspeed")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    import torch
    from transformers import AutoProcessor

    from jobs.sft import SFTConfig, _prepare_data
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.train.sft_data import SFTDataset, collate
    from vigorl_core.synthetic.chains import write_synthetic_chains

    device = "cpu" if args.cpu else "cuda"
    work = Path(tempfile.mkdtemp(prefix="vigorl-sft-profile-"))
    chat = ChatTokens.from_pretrained(args.model)
    chains = write_synthetic_chains(work / "chains", 4 * args.micro_batch, 0, chat.profile,
                                    image_size=(args.image_size,) * 2)
    cfg = SFTConfig(model=args.model, data=str(chains), runs_dir=str(work))
    data = _prepare_data(cfg, Path(args.model))
    processor = AutoProcessor.from_pretrained(args.model)
    dataset = SFTDataset(data["train"], processor.image_processor, chat.profile)
    fetch = []
    batches = []
    for i in range(args.micro_steps):
        t = time.perf_counter()
        examples = [dataset[(i * args.micro_batch + j) % len(dataset)] for j in range(args.micro_batch)]
        batches.append(collate(examples, pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id))
        fetch.append(time.perf_counter() - t)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "args": vars(args),
              "data_seconds_per_example": statistics.median(fetch),
              "tokens": [int(b["attention_mask"].sum()) for b in batches],
              "image_grids": [b["image_grid_thw"].tolist() for b in batches]}
    print("data", report, flush=True)
    bf16, checkpointing = device == "cuda", not args.no_checkpointing
    arms = args.arms.split(",")
    # Liger patches transformers' Qwen2.5-VL module itself (its RMSNorm, MLP and rotary function), so every model
    # built after it would run Liger's kernels too: its arm goes last.
    for arm in ("stock", "vigorl", "vigorl_compile", "deepspeed", "deepspeed_zero2", "vigorl_liger"):
        if arm in arms:
            measure = _deepspeed_arm if arm.startswith("deepspeed") else _plain_arm
            report[arm] = measure(arm, args, batches, device, bf16, checkpointing)
            _free(device)  # the arm's model and optimizer went with its function's frame
    print(json.dumps(report, indent=2))
    if "stock" in report and "vigorl" in report:
        from bench.common import write_result

        result = {"ratio": report["vigorl"]["tokens_per_s"] / report["stock"]["tokens_per_s"],
                  "metric": "training tokens/s of one micro-step (copy + forward + backward + AdamW), plain "
                            "loop, vigorl's model preparation / stock transformers recipe",
                  **report, "config": {"model": args.model, "micro_batch": args.micro_batch,
                                       "image_size": args.image_size,
                                       "gradient_checkpointing": checkpointing, "precision": "bf16" if bf16 else "fp32",
                                       "steady_micro_steps": max(1, args.micro_steps - 1)}}
        path = write_result("sft", f"step_{'cpu' if args.cpu else 'gpu'}", result, args.out)
        print("ratio", result["ratio"], "->", path)


if __name__ == "__main__":
    main()
