"""The quickstart's wall time: stages that ran side by side count once."""

from jobs.quickstart import _wall_seconds


def test_overlapping_stages_count_once_and_old_markers_by_their_seconds():
    stages = [{"stage": "sft", "seconds": 100.0, "started": 0.0, "ended": 100.0},
              {"stage": "eval_a", "seconds": 60.0, "started": 110.0, "ended": 170.0},
              {"stage": "eval_b", "seconds": 50.0, "started": 120.0, "ended": 170.0},  # inside eval_a
              {"stage": "eval_c", "seconds": 40.0, "started": 160.0, "ended": 200.0},  # overlaps by 10 s
              {"stage": "base", "seconds": 30.0}]  # a marker from before the times were recorded
    assert _wall_seconds(stages) == 100.0 + 60.0 + 30.0 + 30.0


def test_sequential_stages_add_up():
    stages = [{"stage": s, "seconds": 10.0, "started": 10.0 * i, "ended": 10.0 * i + 10} for i, s in enumerate("abc")]
    assert _wall_seconds(stages) == 30.0
