"""`vigorl <command> ARGS`: the same parser as `python -m jobs.<module> ARGS`.

    vigorl tiny --out runs/models/tiny
    vigorl synth --task visual_search --n 16 --seed 0 --out runs/data/vs
    vigorl quickstart
    vigorl serve --model runs/models/tiny --port 8000
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "tiny": ("jobs.tiny", "build a random-weight Qwen2.5-VL (tiny, 3b or 7b shape) offline"),
    "synth": ("jobs.synth", "write a deterministic synthetic benchmark (visual_search, grounding, spatial)"),
    "quickstart": ("jobs.quickstart", "the whole pipeline (teacher, MCTS, SFT, GRPO, eval, report) on the tiny model"),
    "serve": ("jobs.serve", "serve a model over HTTP (OpenAI chat completions, /v1/grounded) on Ray Serve"),
    "mcts": ("jobs.mcts", "tree search over grounded reasoning steps with a teacher (SFT data generation)"),
    "chains": ("jobs.chains", "linearize MCTS trees into SFT chains (single-turn and multi-turn zoom)"),
    "sft": ("jobs.sft", "supervised fine-tuning on Ray Train with DeepSpeed"),
    "grpo": ("jobs.grpo", "GRPO (single-turn grounded or multi-turn zoom) on Ray Train with a replay actor"),
    "eval": ("jobs.evaluate", "evaluate a model on benchmarks with Ray Data (resumable)"),
    "score": ("jobs.score", "rescore predictions (ours or the original project's eval files) without the model"),
    "push": ("jobs.push", "upload a checkpoint folder to a Hugging Face Hub model repo (only when asked)"),
    "demo": ("jobs.demo", "ask about one image on a local engine: print the grounded trace, write PNG + HTML"),
    "behaviour": ("jobs.behaviour", "grounding-behaviour counts of traces (predictions, rollouts), model by model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: vigorl <command> [--help] [--key value ...]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<12}{summary}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vigorl: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
