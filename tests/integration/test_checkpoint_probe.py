"""scripts/checkpoint_probe.py on a random-weight model: both measures run and report every sample."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vigorl_core.synthetic.tasks import write_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "checkpoint_probe.py"


@pytest.mark.parametrize("measure", ["generate", "options", "base"])
def test_probe_scores_every_sample(tiny_model_dir, tmp_path, subprocess_env, measure):
    out_dir = tmp_path / "colour"
    write_dataset("colour", 3, 0, out_dir)
    samples = out_dir / "samples.jsonl"
    result = subprocess.run([sys.executable, str(SCRIPT), measure, str(tiny_model_dir), str(samples), "--n", "3",
                             "--max_tokens", "8"], capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n"] == 3
    if measure == "base":
        assert 0.0 <= report["first_point_in_box"] <= 1.0 and 0.0 <= report["colour_accuracy"] <= 1.0
        return
    assert 0.0 <= report["accuracy"] <= 1.0
    if measure == "options":  # one prediction per sample, each one of that sample's options
        assert sum(report["predictions"].values()) == 3
    else:
        assert set(report) >= {"format", "all_points_in_box", "last_output"}
