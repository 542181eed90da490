"""jobs.common without Ray: the inputs a stage reads by default (the previous stage's output of the same run
name), the errors when they are missing, `--verbose`, and where a job's output goes (job.log) in a child
process whose stdout is not a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import common
from jobs.common import PREVIOUS, previous_output
from vigorl_core.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return path


def test_each_stage_reads_the_previous_stage_of_the_same_run_name(tmp_path):
    _touch(tmp_path / "mcts" / "a" / "trees.jsonl")
    _touch(tmp_path / "chains" / "a" / "train.json")
    _touch(tmp_path / "sft" / "a" / "latest" / "config.json")
    assert previous_output("chains", tmp_path, "a") == tmp_path / "mcts" / "a"
    assert previous_output("sft", tmp_path, "a") == tmp_path / "chains" / "a"
    assert previous_output("grpo", tmp_path, "a") == tmp_path / "sft" / "a" / "latest"
    # eval and serve: the GRPO checkpoint when there is one, else the SFT one
    assert previous_output("eval", tmp_path, "a") == tmp_path / "sft" / "a" / "latest"
    _touch(tmp_path / "grpo" / "a" / "latest" / "config.json")
    assert previous_output("eval", tmp_path, "a") == tmp_path / "grpo" / "a" / "latest"
    assert previous_output("serve", tmp_path, "a") == tmp_path / "grpo" / "a" / "latest"
    assert set(PREVIOUS) == {"chains", "sft", "grpo", "eval", "serve"}


@pytest.mark.parametrize("stage, says", [
    ("chains", r"trees: not given.*mcts/b/trees.jsonl does not exist: make it with `vigorl mcts --run_name b "
               r"\.\.\.`, or pass --trees"),
    ("sft", r"data: .*chains/b/train.json does not exist: make it with `vigorl chains --run_name b \.\.\.`"),
    ("grpo", r"model: .*sft/b/latest/config.json does not exist: make it with `vigorl sft --run_name b"),
    ("eval", r"model: .*grpo/b/latest/config.json and .*sft/b/latest/config.json do not exist: make it with "
             r"`vigorl grpo --run_name b \.\.\.` or `vigorl sft --run_name b \.\.\.`, or pass --model"),
])
def test_a_missing_previous_output_names_its_path_and_the_command_that_makes_it(tmp_path, stage, says):
    _touch(tmp_path / "mcts" / "a" / "trees.jsonl")  # another run name's output is not taken
    with pytest.raises(ConfigError, match=says):
        previous_output(stage, tmp_path, "b")


def test_a_checkpoint_folder_without_weights_is_not_taken(tmp_path):
    (tmp_path / "sft" / "a" / "latest").mkdir(parents=True)  # a run that died before its first checkpoint
    with pytest.raises(ConfigError, match="sft/a/latest/config.json does not exist"):
        previous_output("grpo", tmp_path, "a")


@pytest.mark.parametrize("argv, rest, verbose", [
    (["--verbose", "--n", "1"], ["--n", "1"], True),
    (["--n", "1", "--verbose"], ["--n", "1"], True),
    (["--verbose=false", "--n", "1"], ["--n", "1"], False),
    (["--verbose", "true"], [], True),
    (["--n", "1"], ["--n", "1"], False),
])
def test_verbose_is_taken_from_any_job_command_line(argv, rest, verbose, monkeypatch):
    monkeypatch.setattr(common._output, "verbose", False)
    assert common._take_verbose(argv) == rest
    assert common.is_verbose() is verbose


CHILD = """
import logging, os, sys, warnings
from jobs.common import log_to_run_folder, run_main
def body(argv):
    log_to_run_folder(sys.argv[1])
    print("stage line")
    logging.getLogger("some.library").warning("a library WARNING")
    warnings.warn("a Python warning")
    os.write(2, b"[E core_worker.cc:1] native stderr\\n")
    if argv[1:] == ["fail"]:
        raise RuntimeError("boom")
    print("result table")
sys.exit(run_main(body, sys.argv[1:]))
"""


@pytest.mark.parametrize("extra", [[], ["--verbose"], ["fail"]])
def test_library_and_native_output_go_to_job_log(tmp_path, subprocess_env, extra):
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *extra], cwd=REPO, env=subprocess_env,
                            capture_output=True, text=True, timeout=60, check=False)
    log = tmp_path / "job.log"
    if extra == ["--verbose"]:  # everything on the terminal, no log
        assert result.returncode == 0 and not log.exists()
        assert "a library WARNING" in result.stderr and "core_worker" in result.stderr
        return
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"logs: {log}")
    text = log.read_text()
    assert "a library WARNING" in text and "a Python warning" in text and "native stderr" in text
    if extra == ["fail"]:  # an unexpected error: its traceback on the terminal's stderr and in the log
        assert result.returncode == 1 and lines[1:] == ["stage line"]
        assert "RuntimeError: boom" in result.stderr and "RuntimeError: boom" in text
        return
    assert result.returncode == 0 and lines[1:] == ["stage line", "result table"]
    assert result.stderr == ""
    assert "stage line" in text and "result table" in text  # the job's own lines are in the log too
