"""Write a deterministic synthetic benchmark: PNG images plus samples.jsonl (our Sample schema).

    python -m jobs.synth --task visual_search --n 32 --seed 0 --out runs/data/visual_search

Same task, n and seed give byte-identical files. Tasks: visual_search (small target, colour question,
options; a zoom crop makes it legible), grounding (point inside the target box), spatial (left/right,
above/below with options).
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field

from jobs.common import run_main
from vigorl_core.config import StageConfig, parse_config


class SynthConfig(StageConfig):
    """Generate a synthetic task dataset."""

    task: Literal["visual_search", "grounding", "spatial"] = Field(description="which synthetic task")
    n: int = Field(32, ge=1, description="number of samples")
    seed: int = Field(0, description="generator seed")
    out: str = Field(description="output folder (images/ and samples.jsonl)")


def _run(argv: list[str]) -> int:
    cfg = parse_config(SynthConfig, argv, prog="vigorl synth")
    from vigorl_core.synthetic.tasks import write_dataset

    path = write_dataset(cfg.task, cfg.n, cfg.seed, cfg.out)
    print(f"wrote {cfg.n} {cfg.task} samples to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
