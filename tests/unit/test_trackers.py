"""jobs.training's optional trackers: MLflow on its local file store for real, W&B through a fake module (only
the dispatch: what reaches wandb.init and run.log), and the error for a tracker whose package is missing."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types

import pytest
import yaml
from pydantic import ValidationError

from jobs.training import RunLog, TrackerSettings


def _run(run_dir, trackers, start: int, steps: list[tuple[int, float]]) -> None:
    log = RunLog(run_dir / "metrics.jsonl", start, 10, 1, logging.getLogger("test"), ("loss", "val_loss"),
                 lambda r: "", trackers=trackers)
    for step, loss in steps:
        log.step({"step": step, "loss": loss, "val_loss": loss + 1, "other": 7}, show=False)
    log.close()


@pytest.fixture
def run_dir(tmp_path):
    run_dir = tmp_path / "runs" / "grpo" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"lr": 1e-6, "engine": {"dtype": "bf16"}}))
    return run_dir


def test_mlflow_file_store_one_run_across_a_restart(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset below")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # a folder URI sets it (and the test leaves it as it was)
    store = str(tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    settings = TrackerSettings(mlflow="mlruns")
    assert settings.mlflow == store  # absolute: rank 0 runs in Ray Train's working directory
    _run(run_dir, settings, 0, [(1, 0.5), (2, 0.4)])
    _run(run_dir, settings, 1, [(2, 0.3), (3, 0.2)])  # a restart from step 1's checkpoint redoes step 2

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("vigorl-grpo")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "1e-06", "engine.dtype": "bf16"}
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(history) == [(1, 0.5), (2, 0.3), (2, 0.4), (3, 0.2)]
    assert set(run.data.metrics) == {"train/loss", "val/val_loss"}  # what TensorBoard gets, nothing else


def test_wandb_dispatch(run_dir, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, scalars, step):
            calls.append(("log", step, dict(scalars)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    settings = TrackerSettings(wandb="proj", experiment="ablation")
    _run(run_dir, settings, 0, [(1, 0.5)])
    _run(run_dir, settings, 1, [(2, 0.4)])
    (_, first), log1, _, (_, again), log2, _ = calls
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert first == {"project": "proj", "id": run_id, "name": "demo", "group": "ablation", "dir": str(run_dir),
                     "config": {"lr": 1e-6, "engine.dtype": "bf16"}, "resume": "allow"}
    assert again["id"] == run_id and run_id.startswith("demo-")  # the rerun continues the same W&B run
    assert log1 == ("log", 1, {"train/loss": 0.5, "val/val_loss": 1.5}) and log2[1] == 2


def test_trackers_are_off_by_default_and_need_their_package(run_dir):
    _run(run_dir, TrackerSettings(), 0, [(1, 0.5)])
    assert not (run_dir / "trackers.json").exists()
    if importlib.util.find_spec("wandb") is None:
        needs_the_package = r"wandb\n.*needs the wandb package.*pip install 'vigorl\[trackers\]'"
        with pytest.raises(ValidationError, match=needs_the_package):
            TrackerSettings(wandb="proj")
