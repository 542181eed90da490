"""jobs.training.RunLog: the metrics.jsonl lines people read hold rounded floats (and an unrounded clock)."""

from __future__ import annotations

import json
import logging

from jobs.training import RunLog


def test_run_log_rounds_floats_but_keeps_small_values_and_the_time(tmp_path):
    log = RunLog(tmp_path / "metrics.jsonl", 0, 10, 1, logging.getLogger("test"), ("loss",), lambda r: "")
    log.step({"step": 1, "loss": 1 / 3, "lr": 1.234567891e-6, "tokens": 12345678}, show=False)
    log.close()
    start, step = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert start["event"] == "start"
    assert (step["loss"], step["lr"], step["tokens"]) == (0.333333, 1.23457e-06, 12345678)
    assert step["time"] > 1.7e9 and step["time"] != round(step["time"], -4)
