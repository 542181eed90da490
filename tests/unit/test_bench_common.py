"""bench.common: results go to --out (default runs/bench/, git-ignored), never to bench/results/ by default."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench import common

BENCH = Path(common.__file__).parent


def test_write_result_default_folder_a_chosen_folder_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_OUT", tmp_path / "default")
    monkeypatch.setattr(common, "_gpu_name", lambda: None)
    assert common.write_result("mcts", "expansions", {"ratio": 2.0}) == tmp_path / "default" / "mcts_expansions.json"
    in_b = common.write_result("mcts", "expansions", {"ratio": 2.0}, tmp_path / "b")
    assert in_b == tmp_path / "b/mcts_expansions.json"
    path = common.write_result("mcts", "expansions", {"ratio": 3.0}, str(tmp_path / "x.json"))
    assert path == tmp_path / "x.json" and json.loads(path.read_text())["ratio"] == 3.0
    assert "commit" in json.loads(path.read_text())


def test_the_default_is_a_git_ignored_run_folder_not_the_committed_results():
    parser = argparse.ArgumentParser()
    common.add_out_argument(parser)
    default = Path(parser.parse_args([]).out)
    root = BENCH.parent
    assert default == root / "runs" / "bench" and common.RESULTS not in (default, *default.parents)
    assert "runs/" in (root / ".gitignore").read_text().split()
    assert parser.parse_args(["--out", "bench/results"]).out == "bench/results"


def test_every_bench_that_writes_a_result_takes_out_and_passes_it():
    """A bench writing without --out would overwrite the committed results on every trial run."""
    writers = [p for p in BENCH.glob("*.py") if p.name != "common.py" and "write_result(" in p.read_text()]
    assert len(writers) >= 9
    for path in writers:
        text = path.read_text()
        calls = re.findall(r"write_result\((.*)\)", text)
        assert "add_out_argument(parser)" in text, path.name
        assert calls and all("args.out" in call for call in calls), (path.name, calls)


def test_percentile_is_a_nearest_rank_value():
    assert common.percentile([5, 1, 3, 2, 4], 0.5) == 3
    assert common.percentile(list(range(100)), 0.99) == 98 and common.percentile(list(range(100)), 1.0) == 99
    assert common.percentile([7], 0.1) == 7


def test_stack_sampler_counts_busy_and_idle_samples_of_the_thread_that_entered_it():
    import asyncio
    import time

    from bench.common import StackSampler

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def main():
        with StackSampler(interval=0.001) as sampler:
            spin(0.15)  # busy on the loop thread
            await asyncio.sleep(0.15)  # idle: the loop waits in selectors
        return sampler.report()

    report = asyncio.run(main())
    assert report["samples"] > 20 and 0.2 < report["busy"] < 0.9
    assert any(name.endswith(":spin") for name in report["self"])
    assert any(name.endswith(":main") for name in report["inclusive"])


def test_gc_pauses_are_timed_while_inside():
    import gc

    from bench.common import GcPauses

    with GcPauses() as pauses:
        gc.collect()
    gc.collect()
    report = pauses.report()
    assert report["gc_collections"] == 1 and report["gc_seconds"] >= report["gc_max_seconds"] > 0
