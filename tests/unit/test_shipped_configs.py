"""Every stage config shipped in configs/ parses into its stage's settings (unknown keys and bad values
would stop a user's first run). serve.yaml is a Serve deploy file: tests/integration/test_serve.py checks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.chains import ChainsConfig
from jobs.evaluate import EvalConfig
from jobs.grpo import GRPOConfig
from jobs.mcts import MCTSJobConfig
from jobs.sft import SFTConfig
from vigorl_core.config import parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = {"chains": ChainsConfig, "eval": EvalConfig, "grpo": GRPOConfig, "mcts": MCTSJobConfig, "sft": SFTConfig}


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "serve.yaml"))
def test_shipped_config_parses(path):
    stage = STAGES[path.split("_")[0]]
    cfg = parse_config(stage, ["--config", str(CONFIGS / path)])
    assert isinstance(cfg, stage)

