"""vigorl_core.evals.evaluation: scoring in both frames, metrics, exactly-once files, the original's eval files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vigorl_core.evals import evaluation as E
from vigorl_core.evals import original_eval
from vigorl_core.evals.benchmarks import BENCHMARKS, get_benchmark
from vigorl_core.data import DataError
from vigorl_core.frames import FrameMap
from vigorl_core.records import SOURCES, RolloutRecord, Sample
from vigorl_core.rewards import JUDGES, REWARDS, Truth, ci95

FRAME = FrameMap((800, 600), (252, 168))  # the tiny profile's frame of an 800x600 image: sx 0.315, sy 0.28
BOX = (400.0, 300.0, 480.0, 360.0)  # original frame; model frame (126, 84, 151.2, 100.8)


def grounding(id_="g1", **kw) -> Sample:
    fields = dict(id=id_, task="grounding", source="screenspot_v2", images=["/nowhere/g.png"],
                  question="Click OK.", answer="(400, 300, 480, 360)", bbox=BOX, category="icon")
    return Sample(**{**fields, **kw})


def spatial(id_="s1", answer="left", **kw) -> Sample:
    fields = dict(id=id_, task="spatial", source="sat2", images=["/nowhere/s.png"], question="Where?",
                  options=["left", "right"], answer=answer)
    return Sample(**{**fields, **kw})


def single(answer: str, think: str = "The button is at (130, 90).") -> str:
    return f"<think>{think}</think>\n<answer> {answer} </answer>"


def zoom_turn(x: int, y: int, think: bool = True) -> str:
    call = f'<tool_call>\n{{"name": "search_coordinate", "arguments": {{"coordinate": [{x}, {y}]}}}}\n</tool_call>'
    return (f"<think> look at ({x}, {y}) </think>\n" if think else "") + call


OBS = "\n<observation>\nHere is the crop of the image centered on the coordinate:\n\n</observation>\n"


# ---------------------------------------------------------------------------------------------- benchmarks


def test_benchmarks_cover_every_source_and_synthetic_task():
    assert set(SOURCES) - {"synthetic"} <= set(BENCHMARKS)
    assert {"synthetic_visual_search", "synthetic_grounding", "synthetic_spatial"} <= set(BENCHMARKS)
    for name, b in BENCHMARKS.items():
        assert (b.task, b.mode) in REWARDS, name
        assert all(j in JUDGES for j in b.judges), name
    assert BENCHMARKS["vstar"].mode == "multiturn" and BENCHMARKS["sat2"].paper["ViGoRL-7B"] == (67.5, 1.5)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; expected one of sat2"):
        get_benchmark("nope")


def test_benchmark_and_category_of_samples():
    assert E.benchmark_of(spatial()) == "sat2"
    assert E.benchmark_of(spatial(source="synthetic")) == "synthetic_spatial"
    assert E.category_of(grounding()) == "icon"
    assert E.category_of(spatial(metadata={"question_type": "counting"})) == "counting"
    assert E.category_of(spatial(images=["/d/vstar/relative_position/x.jpg"])) == "relative_position"
    assert E.category_of(spatial()) is None


# ------------------------------------------------------------------------------------------------ scoring


def test_grounding_box_is_rescaled_into_the_model_frame():
    hit = E.make_prediction(grounding(), single("(130, 90)"), mode="grounded", frame=FRAME)
    assert hit.truth_box == pytest.approx((126.0, 84.0, 151.2, 100.8))
    assert (hit.score, hit.score_original, hit.reward["overall"]) == (1.0, 1.0, 1.0)
    # the box centre written in ORIGINAL pixels misses: the model writes model-frame pixels
    miss = E.make_prediction(grounding(), single("(440, 330)", "It is at (440, 330)."), mode="grounded", frame=FRAME)
    assert (miss.score, miss.score_original) == (0.0, 0.0)
    assert hit.points[0].model_dump() == {"x": 130.0, "y": 90.0, "frame": "model"}
    assert (hit.points_original[0].x, hit.points_original[0].y) == pytest.approx((130 / 0.315, 90 / 0.28))
    assert hit.points_original[0].frame == "original" and hit.answer_point.frame == "model"
    assert (hit.answer_point_original.x, hit.answer_point_original.y) == pytest.approx((412.698, 321.429), abs=1e-3)
    assert (hit.original_size, hit.model_size, hit.frame()) == ((800, 600), (252, 168), FRAME)


def test_grounding_needs_a_frame_and_point_truths_use_point_match():
    with pytest.raises(ValueError, match="sample 'g1': grounding needs the model frame"):
        E.score_prediction(grounding(), single("(130, 90)"), None, "grounded")
    s = E.score_prediction(grounding(bbox=None, point=(440.0, 330.0)), single("(150, 100)"), FRAME, "grounded")
    assert s.judges == ("point_match", "point_match") and s.score == 1.0  # 14 px from (138.6, 92.4)
    with pytest.raises(ValueError, match="needs task="):
        E.score_prediction(Truth("left"), single("left"), None, "grounded")


@pytest.mark.parametrize("answer, score, original", [
    ("left", 1.0, 1.0),
    ("Left.", 1.0, 1.0),
    ("A. left", 1.0, 1.0),  # the strict key drops an option letter; the original finds "left" in "aleft"
    ("the left one", 0.0, 1.0),  # substring credit only in the original judge
    ("left or right", 0.0, 1.0),
    ("right", 0.0, 0.0),
])
def test_string_score_is_strict_and_score_original_lenient(answer, score, original):
    p = E.make_prediction(spatial(), single(answer), mode="grounded", frame=None)
    assert (p.score, p.score_original, p.judge, p.judge_original) == (score, original, "string_match",
                                                                       "string_match_original")


def test_metrics_report_the_multiturn_format_as_a_reward_and_a_rate_and_round_floats():
    """Two zooms earn a format term of 1.2: metrics name its mean format_reward; format_rate is a share."""
    good = zoom_turn(10, 20) + OBS + zoom_turn(100, 120) + OBS + "<think> red (100, 120) </think>\n<answer>red</answer>"
    sample = spatial(answer="red", task="visual_search", source="vstar")
    preds = [E.make_prediction(sample.model_copy(update={"id": f"v{i}"}), text, mode="multiturn", frame=FRAME,
                               timing={"seconds": 1 / 3})
             for i, text in enumerate([good, good, "no tags at all"])]
    vstar = E.compute_metrics(preds)["benchmarks"]["vstar"]
    assert vstar["format_reward"] == pytest.approx(2.4 / 3) and vstar["format_rate"] == 0.666667
    assert "format" not in vstar and vstar["seconds_mean"] == 0.333333 and vstar["score"]["mean"] == 0.666667
    assert E.round_floats({"a": [1e-7 / 3, 2.0, 5], "b": (0.1 + 0.2,)}) == {"a": [3.33333e-08, 2.0, 5], "b": (0.3,)}


def test_multiturn_original_format_gate_and_reward():
    good = zoom_turn(10, 20) + OBS + zoom_turn(100, 120) + OBS + "<think> red (100, 120) </think>\n<answer>red</answer>"
    p = E.make_prediction(spatial(answer="red", task="visual_search", source="vstar"), good, mode="multiturn",
                          frame=FRAME)
    assert (p.score, p.score_original, p.pred_answer) == (1.0, 1.0, "red")
    assert p.reward == pytest.approx({"overall": 0.6 + 0.4 * 1.2, "format": 1.2, "accuracy": 1.0})
    assert [c.coordinate for c in p.trace.tool_calls] == [(10, 20), (100, 120)]
    # a turn without <think> fails the original harness's node check: its judge_score would be 0
    bad = zoom_turn(10, 20, think=False) + OBS + "<think> red </think>\n<answer> red </answer>"
    q = E.make_prediction(spatial(answer="red", task="visual_search", source="vstar"), bad, mode="multiturn",
                          frame=None)
    assert (q.score, q.score_original) == (1.0, 0.0)
    assert E.split_turns(good)[1].startswith("<think> look at (100, 120)")


def test_original_format_gate_rules():
    assert E.original_format_ok([])
    assert E.original_format_ok(["<think>a</think>", "<answer> x </answer>"])
    assert not E.original_format_ok(["<think>a", "<answer> x </answer>"])
    assert not E.original_format_ok(["<think>a</think>", "b <think> c <answer> x </answer>"])
    assert E.original_format_ok(["<think>a</think>", "b <answer> x </answer>"])  # no think: no node


def test_answer_only_mode_scores_without_reward():
    p = E.make_prediction(spatial(), "<answer> left </answer>", mode="answer_only", frame=None)
    assert (p.score, p.score_original, p.reward) == (1.0, 1.0, {})


def test_prediction_round_trips_and_rescore_is_identical():
    p = E.make_prediction(grounding(), single("(130, 90)"), mode="grounded", frame=FRAME, timing={"seconds": 2.0},
                          policy="tiny", policy_version=3)
    back = E.Prediction.model_validate_json(p.model_dump_json())
    assert back == p and E.rescore(back) == p
    moved = E.rescore(back, grounding(bbox=(0.0, 0.0, 10.0, 10.0), answer="(0, 0, 10, 10)", category="text"))
    assert (moved.score, moved.answer, moved.category) == (0.0, "(0, 0, 10, 10)", "text")


def test_prediction_from_rollout_keeps_trace_finish_timing_and_version():
    from vigorl_core.protocol import parse_response

    text = single("(130, 90)")
    record = RolloutRecord(sample_id="g1", task="grounding", mode="grounded", engine_ids=[1], train_ids=[1],
                           loss_mask=[0], logprobs=[0.0], prompt_len=1, images=["h"], image_tokens=[4], text=text,
                           trace=parse_response(text), finish="answer", num_turns=1, policy_versions=[2, 3],
                           timings={"seconds": 1.5, "engine_seconds": 1.2})
    p = E.prediction_from_rollout(grounding(), record, FRAME, policy="runs/models/tiny")
    assert (p.score, p.finish, p.policy_version, p.policy) == (1.0, "answer", 3, "runs/models/tiny")
    assert p.timing == {"seconds": 1.5, "engine_seconds": 1.2} and p.trace == record.trace
    assert p.key == ("screenspot_v2", "g1") == E.sample_key(grounding())


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_per_benchmark_and_category_with_wilson_intervals():
    answers = [("a", "left", "left"), ("a", "left", "right"), ("b", "left", "the left one"), ("b", "right", "right")]
    preds = [E.make_prediction(spatial(f"s{i}", gt, category=cat), single(ans), mode="grounded", frame=None,
                               timing={"seconds": 1.0 + i})
             for i, (cat, gt, ans) in enumerate(answers)]
    preds.append(E.make_prediction(grounding(), single("(130, 90)"), mode="grounded", frame=FRAME))
    m = E.compute_metrics(preds)
    assert m["n"] == 5 and list(m["benchmarks"]) == ["sat2", "screenspot_v2"]
    sat = m["benchmarks"]["sat2"]
    mean, low, high = ci95([1, 0, 0, 1])
    assert sat["score"] == {"mean": 0.5, "ci95": E.round_floats([low, high]), "n": 4}
    assert (low, high) == pytest.approx((0.1500, 0.8500), abs=1e-4)  # Wilson 2/4
    assert "Wilson" in m["ci95"] and m["schema_version"] == 2
    assert sat["score_original"]["mean"] == 0.75
    assert sat["categories"]["a"]["score"]["mean"] == 0.5 and sat["categories"]["b"]["score_original"]["mean"] == 1.0
    assert sat["finish"] == {"answer": 4} and sat["seconds_mean"] == 2.5 and sat["modes"] == {"grounded": 4}
    assert sat["format_rate"] == 1.0 and sat["format_reward"] == 1.0 and sat["published"]["ViGoRL-7B"] == (67.5, 1.5)
    assert m["benchmarks"]["screenspot_v2"]["categories"]["icon"]["n"] == 1
    json.dumps(m)  # JSON-ready


# ------------------------------------------------------------------------------------- exactly-once files


def _preds(n: int) -> list[E.Prediction]:
    return [E.make_prediction(spatial(f"s{i}"), single("left" if i % 2 else "right"), mode="grounded", frame=None)
            for i in range(n)]


def test_writer_is_exactly_once_across_a_kill_mid_line(tmp_path: Path):
    preds, path = _preds(8), tmp_path / "run" / "predictions.jsonl"
    with E.PredictionWriter(path) as w:
        assert (w.keys, w.repaired) == (set(), None)
        assert w.write(preds[:3]) == 3
    with open(path, "ab") as f:  # the job is killed while writing the 4th line
        f.write(preds[3].model_dump_json().encode()[:41])
    partial = E.read_predictions(path)
    assert [p.id for p in partial.predictions] == ["s0", "s1", "s2"]
    assert partial.truncated == f"{path}:4: dropped an incomplete last line (41 bytes; a killed writer)"
    with E.PredictionWriter(path) as w:  # resume
        assert w.repaired == partial.truncated and w.keys == {p.key for p in preds[:3]}
        todo = [p for p in preds if p.key not in w.keys]
        assert w.write(todo[:2] + preds[:2]) == 2  # re-delivered finished samples are not written again
        assert w.write(todo) == 3
    done = E.read_predictions(path)
    assert sorted(p.id for p in done.predictions) == [f"s{i}" for i in range(8)]
    assert (done.duplicates, done.truncated) == ([], None)
    assert len(path.read_text().splitlines()) == 8


def test_writer_adds_a_missing_final_newline_and_locks(tmp_path: Path):
    preds, path = _preds(3), tmp_path / "predictions.jsonl"
    path.write_text(preds[0].model_dump_json())  # complete record, no newline
    with E.PredictionWriter(path) as w:
        assert w.repaired is None and w.write(preds) == 2
        with pytest.raises(DataError, match="another process is writing these predictions"):
            E.PredictionWriter(path)
    assert [p.id for p in E.read_predictions(path).predictions] == ["s0", "s1", "s2"]


def test_read_predictions_errors_and_duplicates(tmp_path: Path):
    a, b = _preds(2)
    path = tmp_path / "predictions.jsonl"
    path.write_text(f"{a.model_dump_json()}\n{{broken\n{b.model_dump_json()}\n")
    with pytest.raises(DataError, match=r"predictions.jsonl:2: invalid JSON"):
        E.read_predictions(path)
    bad = json.loads(b.model_dump_json())
    del bad["score"]
    path.write_text(f"{a.model_dump_json()}\n{json.dumps(bad)}\n")
    with pytest.raises(DataError, match=r"predictions.jsonl:2: field 'score': Field required"):
        E.read_predictions(path)
    path.write_text(f"{a.model_dump_json()}\n\n{a.model_dump_json()}\n{b.model_dump_json()}\n")
    f = E.read_predictions(path)
    assert [p.id for p in f.predictions] == ["s0", "s1"] and f.duplicates == ["sat2/s0 on line 3 (first on line 1)"]
    with pytest.raises(DataError, match="file not found"):
        E.read_predictions(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------- the original project's eval files


def orig(id_, true_answer, final, judge_score, thoughts=("<think> the chair is at (10, 20). </think>",),
         image="/data/spatial_reasoning/sat2_test/images/1.png") -> dict:
    """A record as single_path_rollouts.py writes it (format_search_output, then the id)."""
    return {"question": "<image>\nWhich is closer to the camera?", "image": image, "true_answer": true_answer,
            "thoughts": list(thoughts), "final_answer": final, "system_prompt": "...", "judge_score": judge_score,
            "scale_factor": 1.0, "id": id_}


def write_lines(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# judge_score values are what the original Judge returns for these records (worked out from its code).
SAT2_RECORDS = [
    orig(0, "chair", "chair", 1.0), orig(1, "chair", "Chair.", 1.0), orig(2, "chair", "the chair", 1.0),
    orig(3, "chair", "table", 0.0), orig(4, "chair", None, None, thoughts=["<think> a </think>"] * 5),
    orig("5", "Chair", "A. chair", 1.0),
]


def test_original_sat2_rollouts_rescore_to_the_stored_judge_score(tmp_path: Path):
    f = write_lines(tmp_path / "rollouts_sat2_20250601_worker0_final.jsonl", SAT2_RECORDS)
    preds, notes = original_eval.read_original_rollouts(f, "sat2")
    assert notes == []
    assert [p.score_original for p in preds] == [float(r["judge_score"] or 0) for r in SAT2_RECORDS]
    assert [p.score for p in preds] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # strict: no substring credit
    p = preds[0]
    assert (p.origin, p.benchmark, p.task, p.mode, p.question) == ("vlmsearch", "sat2", "spatial", "grounded",
                                                                    "Which is closer to the camera?")
    assert p.points[0].x == 10 and p.points_original == [] and p.frame() is None
    assert p.metadata["judge_score"] == 1.0 and p.metadata["file"].endswith("final.jsonl:1")
    assert preds[4].finish == "no_answer" and preds[4].pred_answer is None
    assert all(E.rescore(q) == q for q in preds)


def test_original_folder_with_args_multiturn_gate_duplicates_and_partial_line(tmp_path: Path):
    run = tmp_path / "ViGoRL-Multiturn-7b_vstar_20250601_120000"
    (run / "args.json").parent.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"judge": "string_match", "check_for_crop": True, "multicrop": True,
                                               "pretrained": "gsarch/ViGoRL-Multiturn-7b-Visual-Search"}))
    attr = "/data/visual_search/vstar/direct_attributes/sa_1.jpg"
    good = [zoom_turn(5, 6), "<think> it is red </think>"]
    write_lines(run / "rollouts_vstar_worker0_ckpt10.jsonl", [
        orig(1, "red", "red", 1.0, good, attr),
        orig(2, "red", "red", 0.0, [zoom_turn(5, 6, think=False), "<think> red </think>"], attr),  # gate
    ])
    write_lines(run / "rollouts_vstar_worker1_final.jsonl", [
        orig(1, "red", "blue", 0.0, good, attr), orig(3, "blue", "blue", 1.0, good, "/d/relative_position/x.jpg"),
        '{"question": "cut sh'])
    write_lines(run / "errors_vstar_worker1_final.jsonl", [{"id": 9, "error": "timeout"}])
    preds, notes = original_eval.read_original_rollouts(run, "vstar")
    assert [p.id for p in preds] == ["1", "2", "3"]
    assert [p.score_original for p in preds] == [1.0, 0.0, 1.0] and [p.score for p in preds] == [1.0, 1.0, 1.0]
    assert [p.category for p in preds] == ["direct_attributes", "direct_attributes", "relative_position"]
    assert preds[0].mode == "multiturn" and preds[0].policy == "gsarch/ViGoRL-Multiturn-7b-Visual-Search"
    assert [c.coordinate for c in preds[0].trace.tool_calls] == [(5, 6)]
    assert "rollouts_vstar_worker1_final.jsonl:1: id '1' again (first at rollouts_vstar_worker0_ckpt10.jsonl:1)" \
        in notes[1] and "dropped an incomplete last line" in notes[0]


def test_original_grounding_and_web_action_judges(tmp_path: Path):
    f = write_lines(tmp_path / "ss" / "rollouts_x.jsonl", [
        orig(1, "(100, 200, 300, 400)", "(150, 250)", 1.0), orig(2, "(100, 200, 300, 400)", "(150.5, 250)", 0.0),
        orig(3, "(100, 200, 300, 400)", "(99, 250)", 0.0)])
    preds, _ = original_eval.read_original_rollouts(f, "screenspot_pro")
    assert [p.score_original for p in preds] == [1.0, 0.0, 0.0] == [p.score for p in preds]
    assert preds[0].truth_box == (100, 200, 300, 400) and preds[0].answer_point.x == 150
    assert preds[0].answer_point_original is None
    f = write_lines(tmp_path / "vwa" / "rollouts_y.jsonl", [
        orig(1, "click [12]", "click [12]", 1.0), orig(2, "scroll [down]", "scroll [up]", 1.0),
        orig(3, "type [5] [hello world]", "type [5] [hello world]", 0.0)])
    preds, _ = original_eval.read_original_rollouts(f, "vwa")
    assert [p.score_original for p in preds] == [1.0, 1.0, 0.0] and [p.score for p in preds] == [1.0, 0.0, 1.0]


def test_original_files_errors(tmp_path: Path):
    f = write_lines(tmp_path / "a" / "rollouts_a.jsonl", [orig(1, "x", "x", 1.0), {"id": 2, "final_answer": "x"}])
    with pytest.raises(DataError, match=r"rollouts_a.jsonl:2: field 'true_answer': missing"):
        original_eval.read_original_rollouts(f, "sat2")
    f = write_lines(tmp_path / "b" / "rollouts_b.jsonl", [{**orig(1, "x", "x", 1.0), "thoughts": "oops"}])
    with pytest.raises(DataError, match=r"rollouts_b.jsonl:1: field 'thoughts': expected list, got str"):
        original_eval.read_original_rollouts(f, "sat2")
    f = write_lines(tmp_path / "c" / "rollouts_c.jsonl", [orig(1, "click here", "(1, 2)", 0.0)])
    with pytest.raises(DataError, match=r"rollouts_c.jsonl:1: field 'true_answer': expected a box"):
        original_eval.read_original_rollouts(f, "screenspot_v2")
    (tmp_path / "a" / "args.json").write_text(json.dumps({"judge": "gpt4o"}))
    with pytest.raises(DataError, match="an LLM judge cannot be rescored"):
        original_eval.read_original_rollouts(tmp_path / "a", "sat2")
    with pytest.raises(DataError, match="no rollouts_"):
        original_eval.read_original_rollouts(tmp_path, "sat2")


def test_detect_format(tmp_path: Path):
    ours = tmp_path / "run" / "predictions.jsonl"
    with E.PredictionWriter(ours) as w:
        w.write(_preds(1))
    original = write_lines(tmp_path / "orig" / "rollouts_1.jsonl", SAT2_RECORDS[:1])
    assert [original_eval.detect_format(p) for p in (ours, ours.parent, original, original.parent)] == \
        ["vigorl", "vigorl", "vlmsearch", "vlmsearch"]
    other = write_lines(tmp_path / "x.jsonl", [{"a": 1}])
    with pytest.raises(DataError, match=r"x.jsonl:1: unknown predictions format with keys \['a'\]"):
        original_eval.detect_format(other)
