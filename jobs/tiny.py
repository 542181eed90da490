"""Build a random-weight Qwen2.5-VL folder offline (model, tokenizer, processor, chat template).

    python -m jobs.tiny --out runs/models/tiny                 # ~1 M params, CPU tests and quickstart
    python -m jobs.tiny --preset 3b --out /tmp/q3b --dtype bfloat16 --device cuda   # GPU benchmarks

The folder loads with transformers' Auto classes and in vLLM. Same preset and seed give the same files.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field

from jobs.common import run_main
from vigorl_core.config import StageConfig, parse_config


class TinyConfig(StageConfig):
    """Build a random-weight Qwen2.5-VL model folder."""

    out: str = Field("runs/models/tiny", description="output folder")
    preset: Literal["tiny", "3b", "7b"] = Field("tiny", description="architecture shape")
    seed: int = Field(0, description="weight initialisation seed")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight dtype")
    device: str = Field("cpu", description="where weights are initialised (cuda for 3b/7b is much faster)")


def _run(argv: list[str]) -> int:
    cfg = parse_config(TinyConfig, argv, prog="vigorl tiny")
    from vigorl_core.synthetic.tiny import build_tiny_model

    out = build_tiny_model(cfg.out, preset=cfg.preset, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    print(f"built {cfg.preset} Qwen2.5-VL (seed {cfg.seed}) in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
