"""SFT training throughput: the Ray Train + DeepSpeed job vs a plain single-process Hugging Face loop.

    .venv/bin/python -m bench.sft_throughput          # CPU, tiny model  -> runs/bench/sft_throughput_cpu.json (--out)
    python -m bench.sft_throughput --gpu              # one H100/H200, random weights of the real 3B shape
                                                      #                  -> runs/bench/sft_throughput_gpu.json (--out)

Both arms train the same examples in the same order (BatchPlan, one global batch per step), with the same
loss (labelled tokens only, jobs.sft._forward), torch AdamW, precision and data pipeline (SFTDataset,
collate, a DataLoader inside the step), each in its own subprocess, vigorl first:
- vigorl: `python -m jobs.sft` (Ray TorchTrainer, DeepSpeed ZeRO-2). CPU: 2 workers with 1 thread each.
  GPU: 1 worker; bf16 with DeepSpeed's fp32 master weights and optimizer state;
- baseline: one process, a plain PyTorch loop over the HF model. CPU: the same cores as threads of one
  process. GPU: the same precision recipe as the job: fp32 weights and AdamW state, bf16 compute under
  torch.autocast (HF Trainer's bf16=True, which the original's LLaMA-Factory runs).
  GPU also runs `baseline_pure_bf16` for information (bf16 weights and AdamW state, no fp32 master copy:
  faster, but updates below bf16's resolution are lost, so its loss falls more slowly).
Throughput = the median over the steps after `--warmup` of each step's tokens (padding excluded) / its time; a
step is data loading, forward, backward and the optimizer (all-reduces included). ratio = vigorl / baseline
tokens/s. Both loops move batches with vigorl_core.train.device_batch and wait on the GPU once per step, as HF
Trainer does between logging steps (the loss adds up on the device, tokens are counted on the host batch).
The baseline's threads wait passively (OMP_WAIT_POLICY): spinning OpenMP threads slow down by 10x and more when
anything else runs on the cores.
GPU: MFU = 6 x text parameters x tokens/s / peak dense bf16 FLOP/s (989 T for H100/H200 SXM;
recomputation by gradient checkpointing not counted), the formula of the MFU figures in docs/sft.md.

`--trace-step N` runs the job alone with its optimizer step N traced (`profile_steps`) and writes
sft_trace_<cpu|gpu>.json: where the GPU idles (bench.trace_gaps; ratio = the GPU's busy share of that step) and
the gzipped trace beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import yaml

from jobs.common import REPO_ROOT, set_runtime_env

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


def _steady(records: list[dict], warmup: int) -> dict:
    """Rates over the steps after `warmup`: the MEDIAN of the steps' own rates (tokens / seconds, examples /
    seconds), so a few steps slowed by other work on the machine do not decide the result. Steps differ in
    tokens (length-grouped batches), so each step's tokens are divided by its own time; `tokens_per_s_total`
    (all tokens over all the time) and `tokens_per_s_mean_over_median` (the mean tokens per step over the median
    step time, this bench's figure until commit d201c00, low when the median step is a long one) for comparison."""
    steps = [r for r in records if "loss" in r and r["step"] > warmup]
    median = statistics.median(r["step_seconds"] for r in steps)
    tokens = sum(r["tokens"] for r in steps) / len(steps)
    return {"tokens_per_s": statistics.median(r["tokens"] / r["step_seconds"] for r in steps),
            "samples_per_s": statistics.median(r["examples"] / r["step_seconds"] for r in steps),
            "tokens_per_s_total": tokens * len(steps) / sum(r["step_seconds"] for r in steps),
            "tokens_per_s_mean_over_median": tokens / median,
            "median_step_seconds": median, "step_seconds": [round(r["step_seconds"], 4) for r in steps],
            "step_tokens": [r["tokens"] for r in steps],
            "tokens_per_step": tokens, "losses": [round(r["loss"], 4) for r in records if "loss" in r]}


def baseline(config_path: str, out_path: str, pure_bf16: bool = False) -> None:
    """The plain loop (runs in its own process): same data, order, loss and optimizer as the job; bf16 runs
    autocast over fp32 weights unless `pure_bf16`."""
    import contextlib

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from jobs.sft import SFTConfig, _forward, _prepare_data
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.config import parse_config
    from vigorl_core.train.device_batch import to_device
    from vigorl_core.train.sft_data import BatchPlan, SFTDataset, collate
    from vigorl_core.train.sft_train import cosine_lr, prepare_for_training

    cfg = parse_config(SFTConfig, ["--config", config_path])
    data = _prepare_data(cfg, Path(cfg.model))
    torch.manual_seed(cfg.seed)
    device = "cuda" if cfg.use_gpu else "cpu"
    bf16 = cfg.precision == "bf16"
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model, dtype=torch.bfloat16 if bf16 and pure_bf16 else torch.float32,
        attn_implementation="sdpa").to(device)
    autocast = partial(torch.autocast, device, dtype=torch.bfloat16) if bf16 and not pure_bf16 else \
        contextlib.nullcontext
    trainable = prepare_for_training(model, freeze_vision_tower=cfg.freeze_vision_tower,
                                     freeze_projector=cfg.freeze_projector,
                                     gradient_checkpointing=cfg.gradient_checkpointing, kernels=cfg.kernels,
                                     gpu=cfg.use_gpu)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=cfg.use_gpu or None)  # what HF Trainer picks on a GPU (adamw_torch_fused)
    chat = ChatTokens.from_pretrained(cfg.model)
    processor = AutoProcessor.from_pretrained(cfg.model)
    plan = BatchPlan([e.length for e in data["train"]], cfg.global_batch_size, cfg.micro_batch_size, 1, cfg.seed)
    loader = torch.utils.data.DataLoader(
        SFTDataset(data["train"], processor.image_processor, chat.profile),
        batch_sampler=plan.rank_batches(0, 0, cfg.max_steps), num_workers=cfg.dataloader_workers,
        collate_fn=partial(collate, pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id),
        pin_memory=cfg.use_gpu)
    batches = iter(loader)
    records = []
    model.train()
    for step in range(cfg.max_steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
        labels = sum(data["train"][i].label_tokens for i in plan.step_batch(step))
        loss_sum, tokens = torch.zeros((), device=device), 0
        for _ in range(plan.accumulation):
            host = next(batches)
            batch = to_device(host, device)
            with autocast():
                nll, _ = _forward(model, batch)
            (nll / labels).backward()
            loss_sum += nll.detach()
            tokens += int(host["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / labels  # the step's one wait on the GPU
        records.append({"step": step + 1, "loss": loss, "tokens": tokens, "examples": cfg.global_batch_size,
                        "step_seconds": time.perf_counter() - started})
    Path(out_path).write_text(json.dumps(records))


def _trace_result(args, work: Path, log: list[dict], config: dict) -> dict:
    """The traced step's summary (bench.trace_gaps) and the job's step times; the trace, gzipped, into --out."""
    import gzip

    from bench.trace_gaps import load, report, summarize

    trace = next((work / "runs" / "sft" / "vigorl" / "profile").glob("rank0-*.json"))
    summary = summarize(load(trace))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(trace, "rb") as f, gzip.open(out / f"sft_trace_{'gpu' if args.gpu else 'cpu'}.trace.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    steps = {r["step"]: r for r in log if "loss" in r}
    return {"ratio": summary["gpu_busy_share"],
            "metric": "share of the traced optimizer step the GPU is busy (kernels, copies, memsets)",
            "traced_step": args.trace_step, "summary": summary, "report": report(summary),
            "step_seconds": {s: round(r["step_seconds"], 4) for s, r in steps.items()},
            "tokens_per_step": {s: r["tokens"] for s, r in steps.items()},
            "config": {k: v for k, v in config.items() if k not in ("runs_dir", "model", "data")}}


def _text_params(model_dir: Path) -> int:
    """Parameters of the language model and its head (tied embeddings counted once), from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    params = {id(p): p.numel() for m in (model.model.language_model, model.lm_head) for p in m.parameters()}
    return sum(params.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="one GPU, 3B-shaped random weights (bf16)")
    parser.add_argument("--model", default=None, help="model folder (default: build tiny, or 3b with --gpu)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 30 CPU, 12 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rate (default 5 CPU, 3 GPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="examples per forward (default 2 CPU and GPU)")
    parser.add_argument("--global-batch", type=int, default=None, help="examples per step (default 16 CPU, 16 GPU)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (GPU default: off; "
                        "an H200 holds a 3B model's activations at micro-batch 2 of ~3k tokens)")
    parser.add_argument("--kernels", default="auto", help="the job's kernels (both arms): auto, liger, compile, none")
    parser.add_argument("--zero-stage", type=int, default=2, help="the job's zero_stage (one bf16 rank at 1 or 2 "
                        "runs DeepSpeed's BF16 optimizer)")
    parser.add_argument("--trace-step", type=int, default=None, help="run the job alone, trace this optimizer step "
                        "and write sft_trace_<cpu|gpu>.json (where the GPU idles) instead of the comparison")
    parser.add_argument("--baseline", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop
    parser.add_argument("--baseline-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pure-bf16", action="store_true", help=argparse.SUPPRESS)
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    if args.baseline:
        return baseline(args.baseline, args.baseline_out, args.pure_bf16)
    from bench.common import write_result

    work = Path(tempfile.mkdtemp(prefix="vigorl-bench-sft-"))  # model (7.5 GB for 3b), data, runs
    try:
        result = _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.trace_step:
        path = write_result("sft_trace", "gpu" if args.gpu else "cpu", result, args.out)
        print(result.pop("report"), f"\n-> {path}")
        return
    path = write_result("sft_throughput", "gpu" if args.gpu else "cpu", result, args.out)
    vigorl, plain = result["vigorl"], result["baseline"]
    print(f"vigorl {vigorl['tokens_per_s']:.0f} tok/s {vigorl['samples_per_s']:.2f} samples/s, baseline "
          f"{plain['tokens_per_s']:.0f} tok/s {plain['samples_per_s']:.2f} samples/s, "
          f"ratio {result['ratio']:.2f} -> {path}")


def _measure(args, work: Path) -> dict:
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.synthetic.chains import write_synthetic_chains
    from vigorl_core.synthetic.tiny import build_tiny_model

    gpu = args.gpu
    load_before = os.getloadavg()[0]  # other work on the machine skews CPU numbers: recorded with them
    steps, warmup = args.steps or (12 if gpu else 30), args.warmup or (3 if gpu else 5)
    if args.model:
        model = Path(args.model)
    elif gpu:
        import torch

        model = build_tiny_model(work / "qwen3b", preset="3b", dtype="bfloat16", device="cuda")
        torch.cuda.empty_cache()  # the arms run in their own processes: leave them the whole GPU
    else:
        model = build_tiny_model(work / "tiny")
    # GPU: 1344 px images (2,304 image tokens) make ~3k-token sequences, as real chains are.
    chains = write_synthetic_chains(work / "chains", 64, 0, ChatTokens.from_pretrained(model).profile,
                                    image_size=(1344, 1344) if gpu else None)
    workers = 1 if gpu else 2
    config = {
        "run_name": "vigorl", "runs_dir": str(work / "runs"), "model": str(model), "data": str(chains),
        "max_length": 8192, "max_steps": steps, "global_batch_size": args.global_batch or 16,
        "micro_batch_size": args.micro_batch or 2, "lr": 1e-5, "warmup_ratio": 0.0, "freeze_vision_tower": gpu,
        "num_workers": workers, "use_gpu": gpu, "cpus_per_worker": 8 if gpu else 1, "zero_stage": args.zero_stage,
        "precision": "bf16" if gpu else "fp32", "gradient_checkpointing": args.checkpointing,
        "kernels": args.kernels,
        "attn_implementation": "sdpa", "dataloader_workers": 4 if gpu else 0, "save_every": 10 ** 6,
        "save_at_end": False,
        "eval_every": 10 ** 6, "log_every": 5,
    }
    config_path = work / "sft.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cores = os.cpu_count() or 1
    if args.trace_step:
        config["profile_steps"] = [args.trace_step, args.trace_step]
        config_path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "jobs.sft", "--config", str(config_path)], cwd=REPO_ROOT, check=True,
                   env={**env, "OMP_NUM_THREADS": "1"} if not gpu else env)
    log = [json.loads(x) for x in (work / "runs" / "sft" / "vigorl" / "log.jsonl").read_text().splitlines()]
    if args.trace_step:
        return _trace_result(args, work, log, config)
    vigorl = _steady(log, warmup)
    out = work / "baseline.json"
    threads = {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"} if not gpu else {}
    subprocess.run([sys.executable, "-m", "bench.sft_throughput", "--baseline", str(config_path), "--baseline-out",
                    str(out)],
                   cwd=REPO_ROOT, check=True, env={**env, **threads})
    plain = _steady(json.loads(out.read_text()), warmup)
    extra = {}
    if gpu:
        subprocess.run([sys.executable, "-m", "bench.sft_throughput", "--baseline", str(config_path), "--baseline-out",
                        str(out), "--pure-bf16"], cwd=REPO_ROOT, check=True, env=env)
        extra["baseline_pure_bf16"] = _steady(json.loads(out.read_text()), warmup)
    # Same examples, order, loss, schedule and optimizer: the arms' losses agree up to float reduction order.
    gap = max(abs(a - b) for a, b in zip(vigorl["losses"], plain["losses"]))
    result = {
        "ratio": vigorl["tokens_per_s"] / plain["tokens_per_s"],
        "metric": "training tokens/s (padding excluded; the median of the steps' own rates after warm-up), vigorl "
                  "job / plain single-process HF loop",
        "vigorl": vigorl, "baseline": plain, **extra, "max_loss_difference": gap,
        "config": {**{k: v for k, v in config.items() if k not in ("runs_dir", "model", "data")},
                   "model": "tiny (random weights)" if not (gpu or args.model) else
                   ("3b shape (random weights)" if not args.model else args.model),
                   "warmup_steps": warmup, "examples": "64 grounding + 64 multi-turn visual-search synthetic chains",
                   "threads": "vigorl: 1 per worker; baseline: " + ("all" if gpu else str(cores)),
                   "deepspeed_workers": workers,
                   "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
    }
    if gpu:
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        params = _text_params(model)
        result["config"].update(gpu=name, text_params=params, peak_bf16_flops=peak)
        for arm in (result["vigorl"], result["baseline"], *extra.values()):
            arm["mfu"] = 6 * params * arm["tokens_per_s"] / peak if peak else None
            arm["mfu_mean_over_median"] = 6 * params * arm["tokens_per_s_mean_over_median"] / peak if peak else None
    return result


if __name__ == "__main__":
    main()
