"""The helpers every job shares: the resume check, the model folder, the progress bar (jobs/common.py,
jobs/progress.py)."""

from __future__ import annotations

import pytest
import yaml

from jobs.common import check_resume, model_folder
from jobs.progress import Progress
from vigorl_core.config import ConfigError


def _fixed(config: dict) -> dict:
    return {k: config.get(k) for k in ("model", "sampling")}


def test_check_resume_saves_the_config_and_names_each_changed_setting(tmp_path):
    run = tmp_path / "run"
    check_resume(run, {"model": "m", "sampling": {"t": 0}, "limit": 4}, _fixed)
    assert yaml.safe_load((run / "config.yaml").read_text())["limit"] == 4
    check_resume(run, {"model": "m", "sampling": {"t": 0}, "limit": 8}, _fixed)  # not fixed: may change
    assert yaml.safe_load((run / "config.yaml").read_text())["limit"] == 8
    with pytest.raises(ConfigError, match=r"was evaluated with different model: 'm' -> 'other', "
                                          r"sampling: \{'t': 0\} -> \{'t': 1\}; use a new --run_name"):
        check_resume(run, {"model": "other", "sampling": {"t": 1}, "limit": 8}, _fixed, made="evaluated")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "m"  # a refused run saves nothing


def test_check_resume_ignores_settings_the_old_config_lacks(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "m"}))
    check_resume(tmp_path, {"model": "m", "sampling": {"t": 1}}, lambda c: {k: c[k] for k in c if k != "limit"})


def test_model_folder_fails_early_naming_the_model(tmp_path):
    with pytest.raises(ConfigError, match="model: cannot load 'no/such-model'"):
        model_folder("no/such-model", tmp_path)  # HF_HUB_OFFLINE=1 (tests/conftest.py): no download tried


def test_progress_prints_lines_with_count_rate_and_eta_off_a_terminal(capsys):
    with Progress(4, "eval", unit="sample", every=0) as progress:
        progress.update(1)
        progress.write("s1 done")
        progress.update(3)
    lines = capsys.readouterr().out.splitlines()
    assert "s1 done" in lines and "\r" not in "".join(lines)
    assert any("eval:  25%" in line and "1/4 [00:00<" in line for line in lines)  # elapsed<ETA
    assert lines[-1].startswith("eval: 100%") and "4/4 [" in lines[-1] and "sample/s]" in lines[-1]


def test_progress_shows_work_counted_elsewhere_with_its_total(capsys):
    with Progress(1, "sft", every=0) as progress:  # the quickstart reads (done, total) from a job's files
        progress.show(3, 12)
        progress.show(12, 12)
    lines = capsys.readouterr().out.splitlines()
    assert any("sft:  25%" in line and "3/12" in line for line in lines) and "12/12" in lines[-1]


def test_faults_come_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    from jobs.faults import requested_faults

    monkeypatch.delenv("VIGORL_FAULTS", raising=False)
    assert requested_faults().kill_policy_after is None
    monkeypatch.setenv("VIGORL_FAULTS", '{"kill_policy_after": 2}')
    assert requested_faults().kill_policy_after == 2
    monkeypatch.setenv("VIGORL_FAULTS", '{"kill_everything": 1}')
    with pytest.raises(ConfigError, match="VIGORL_FAULTS: .*kill_everything"):
        requested_faults()


def test_no_job_config_carries_a_test_fault():
    """Faults come from VIGORL_FAULTS only: no field a user sees in a config file or in --help."""
    from jobs.evaluate import EvalConfig
    from jobs.grpo import GRPOConfig
    from jobs.mcts import MCTSJobConfig

    for config in (EvalConfig, MCTSJobConfig, GRPOConfig):
        assert not [name for name in config.model_fields if "fault" in name or name.startswith("fail_")], config


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_trainer_refuses_to_continue_a_run_with_other_data_before_it_starts(stage, tmp_path):
    import importlib

    run = tmp_path / stage / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "m", "data": "old.jsonl"}))
    job = importlib.import_module(f"jobs.{stage}")
    with pytest.raises(ConfigError, match=r"was trained with different data: 'old.jsonl' -> 'new.jsonl'; use a new "
                                          r"--run_name"):
        job._run(["--runs_dir", str(tmp_path), "--run_name", "r", "--model", "m", "--data", "new.jsonl"])
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == "old.jsonl"
