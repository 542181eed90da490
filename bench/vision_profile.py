"""The frozen vision tower's forward on one GPU: where its time goes and what makes it faster.

    python -m bench.vision_profile --model /tmp/vigorl-3b     # after `vigorl tiny --preset 3b`
    python -m bench.vision_profile --model runs/models/tiny --cpu

In a 3B SFT micro-step of two 1344-px examples the frozen tower's forward (no grad) is about 0.14 s of 0.5 s
(bench/sft_profile.py). This times that forward alone, in one process, on the same micro-batch, for each way
of preparing the tower (each arm adds to the one before):
- prepared: the tower as the SFT job prepared it before this bench (batched window attention; `--kernels`:
  on a GPU Liger's RMSNorm in its blocks);
- fused_blocks: each block's element-wise work compiled (vigorl_core.train.vision_speed.compile_vision_blocks).
Prints torch.profiler's top kernels of the first and last arm; ratio = last / first arm's forwards per second ->
runs/bench/vision_forward_<gpu|cpu>.json (--out). Outputs of every arm are compared with the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from jobs.common import set_runtime_env

ARMS = ("prepared", "fused_blocks")


def _batch(model_dir: str, micro_batch: int, image_size: int) -> dict:
    from transformers import AutoProcessor

    from jobs.sft import SFTConfig, _prepare_data
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.synthetic.chains import write_synthetic_chains
    from vigorl_core.train.sft_data import SFTDataset, collate

    work = Path(tempfile.mkdtemp(prefix="vigorl-vision-profile-"))
    chat = ChatTokens.from_pretrained(model_dir)
    chains = write_synthetic_chains(work / "chains", micro_batch, 0, chat.profile, image_size=(image_size,) * 2)
    data = _prepare_data(SFTConfig(model=model_dir, data=str(chains), runs_dir=str(work)), Path(model_dir))
    dataset = SFTDataset(data["train"], AutoProcessor.from_pretrained(model_dir).image_processor, chat.profile)
    return collate([dataset[j % len(dataset)] for j in range(micro_batch)], pad_id=chat.tokenizer.pad_token_id,
                   image_pad_id=chat.image_pad_id)


def _time_forward(visual, pixels, grid, device: str, repeats: int) -> tuple[list[float], object]:
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    seconds, out = [], None
    with torch.no_grad():
        for _ in range(repeats + 2):  # two unmeasured: allocator warm-up and any compilation
            sync()
            start = time.perf_counter()
            out = visual(pixels, grid_thw=grid).pooler_output
            sync()
            seconds.append(time.perf_counter() - start)
    return seconds[2:], out


def _top_kernels(visual, pixels, grid, device: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        visual(pixels, grid_thw=grid)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=1344)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--kernels", default="auto", help="the job's kernels for the language model (and norms)")
    from bench.common import add_out_argument, write_result

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train.kernels import apply_kernels
    from vigorl_core.train.vision_attention import batch_window_attention
    from vigorl_core.train.vision_speed import compile_vision_blocks

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    batch = _batch(args.model, args.micro_batch, args.image_size)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device)
    model.requires_grad_(False)
    batch_window_attention(model)
    apply_kernels(model, args.kernels, gpu=device == "cuda")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as prepare_for_training
    visual = model.model.visual
    pixels = batch["pixel_values"].to(device, dtype)
    grid = batch["image_grid_thw"].to(device)
    patches = int(pixels.shape[0])
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "patches": patches,
                    "grids": grid.tolist(), "arms": {}}
    reference = None
    for arm in ARMS:
        if arm == "fused_blocks":
            compile_vision_blocks(model)
        seconds, out = _time_forward(visual, pixels, grid, device, args.repeats)
        reference = out if reference is None else reference
        diff = float((out.float() - reference.float()).norm() / reference.float().norm())
        report["arms"][arm] = {"median_seconds": statistics.median(seconds), "seconds": [round(s, 4) for s in seconds],
                               "patches_per_s": patches / statistics.median(seconds),
                               "relative_difference_vs_prepared": diff}
        print(arm, report["arms"][arm], flush=True)
        if arm in (ARMS[0], ARMS[-1]):
            _top_kernels(visual, pixels, grid, device)
    first, last = report["arms"][ARMS[0]], report["arms"][ARMS[-1]]
    result = {"ratio": first["median_seconds"] / last["median_seconds"],
              "metric": f"frozen vision tower forwards per second (no grad), {ARMS[-1]} / {ARMS[0]}",
              **report, "config": {"model": args.model, "micro_batch": args.micro_batch,
                                   "image_size": args.image_size, "dtype": str(dtype), "kernels": args.kernels,
                                   "repeats": args.repeats}}
    path = write_result("vision", f"forward_{'cpu' if args.cpu else 'gpu'}", result, args.out)
    print("ratio", result["ratio"], "->", path)


if __name__ == "__main__":
    main()
