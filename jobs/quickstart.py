"""Quickstart: the pipeline on one machine with the tiny model and synthetic data (the embedded default).

    vigorl quickstart                      # or: python -m jobs.quickstart [--n 8] [--run_name demo]

What runs today (MCTS, SFT, GRPO and evaluation stages join as they land):
1. build the tiny random-weight Qwen2.5-VL into runs/models/tiny (once);
2. write synthetic grounding and visual-search benchmarks into runs/data/;
3. start one vLLM engine (CPU build here) on the tiny model;
4. single-turn grounded rollouts on grounding (GRPO groups of `group_size`) and multi-turn zoom rollouts on
   visual search, through the turn-asynchronous rollout driver, scored with the reward registry;
5. write runs/quickstart/<run_name>/{config.yaml, rollouts.jsonl, metrics.json} and print a summary.

The tiny model has random weights: its answers are noise and rewards near zero until SFT/GRPO train it.
It never zooms on its own, so the multi-turn part uses PlannedTurnsEngine (grammar-constrained turns,
`--planned_zooms false` to turn that off) to show the zoom loop with real crops.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import yaml
from pydantic import Field

from jobs.common import REPO_ROOT, run_main
from vigorl_core.config import StageConfig, parse_config


class QuickstartConfig(StageConfig):
    """Run the tiny-model pipeline on synthetic data."""

    run_name: str = Field("default", description="runs/quickstart/<run_name>")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of models, data and run folders")
    n: int = Field(8, ge=1, description="samples per synthetic task")
    seed: int = Field(0, description="data seed")
    group_size: int = Field(4, ge=1, description="samples per prompt in the single-turn rollouts (GRPO group)")
    planned_zooms: bool = Field(True, description="constrain multi-turn turns to a zoom plan (tiny model)")


async def _rollouts(cfg: QuickstartConfig, model_dir: Path, datasets: dict[str, Path]) -> list:
    from vigorl_core.chat_tokens import ChatTokens
    from vigorl_core.data import load_samples
    from vigorl_core.engine import EngineConfig, VLLMEngine
    from vigorl_core.planned import PlannedTurnsEngine
    from vigorl_core.rollout import RolloutConfig, RolloutDriver

    engine = await VLLMEngine.create(EngineConfig(model=str(model_dir)))
    try:
        chat = ChatTokens.from_pretrained(model_dir)
        runs = [
            ("grounding", engine, RolloutConfig(mode="grounded", group_size=cfg.group_size, max_tokens_per_turn=64)),
            ("visual_search", PlannedTurnsEngine(engine, chat.tokenizer) if cfg.planned_zooms else engine,
             RolloutConfig(mode="multiturn", max_tokens_per_turn=96)),
        ]
        rollouts = []
        for task, policy, config in runs:
            driver = RolloutDriver(policy, chat, config)
            async for group in driver.run(load_samples(datasets[task])):
                rollouts += group
        return rollouts
    finally:
        engine.shutdown()


def _run(argv: list[str]) -> int:
    cfg = parse_config(QuickstartConfig, argv, prog="vigorl quickstart")
    from vigorl_core.data import write_jsonl
    from vigorl_core.synthetic import write_dataset
    from vigorl_core.tiny import build_tiny_model

    runs = Path(cfg.runs_dir)
    out = runs / "quickstart" / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    started = time.perf_counter()
    model_dir = runs / "models" / "tiny"
    if not (model_dir / "vigorl_model.json").is_file():
        build_tiny_model(model_dir)
    print(f"[1/4] tiny model: {model_dir}")
    datasets = {task: write_dataset(task, cfg.n, cfg.seed, runs / "data" / f"{task}-n{cfg.n}-s{cfg.seed}")
                for task in ("grounding", "visual_search")}
    print(f"[2/4] synthetic data: {', '.join(str(p) for p in datasets.values())}")
    print("[3/4] starting vLLM and rolling out (single-turn grounding, multi-turn visual search)")
    rollouts = asyncio.run(_rollouts(cfg, model_dir, datasets))
    write_jsonl([r.record for r in rollouts], out / "rollouts.jsonl")
    metrics = {}
    for mode in ("grounded", "multiturn"):
        records = [r.record for r in rollouts if r.record.mode == mode]
        metrics[mode] = {
            "conversations": len(records),
            "mean_reward": sum(r.reward or 0.0 for r in records) / max(1, len(records)),
            "mean_turns": sum(r.num_turns for r in records) / max(1, len(records)),
            "crops": sum(len(r.images) - 1 for r in records),
            "generated_tokens": sum(sum(r.loss_mask) for r in records),
            "finish": dict(Counter(r.finish for r in records)),
        }
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"[4/4] wrote {len(rollouts)} rollouts to {out / 'rollouts.jsonl'}")
    for mode in ("grounded", "multiturn"):
        m = metrics[mode]
        print(f"  {mode:<10} {m['conversations']:>3} conversations, mean reward {m['mean_reward']:.3f}, "
              f"{m['mean_turns']:.1f} turns, {m['crops']} crops, finish {m['finish']}")
    print(f"done in {metrics['seconds']} s (random weights: rewards stay near zero until training stages land)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
