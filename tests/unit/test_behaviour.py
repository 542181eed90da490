"""vigorl_core.evals.behaviour on hand-written traces: regions, revisits, zooms, points in the box, phrase counts,
the table, the file formats it reads, the judge's <count>N parser; and `vigorl behaviour` on a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import behaviour as job
from vigorl_core.evals import behaviour as B
from vigorl_core.evals import evaluation as E
from vigorl_core.frames import FrameMap
from vigorl_core.protocol import parse_response
from vigorl_core.records import Sample

ZOOM = '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [%d, %d]}}\n</tool_call>'


def info(text: str, box=None, correct=None) -> B.TraceInfo:
    return B.TraceInfo("t", parse_response(text), correct=correct, box=box)


def test_regions_and_revisits_follow_the_stated_radius():
    # A at 0; B 100 px away; back near A (revisit); stays at A (a dwell, not a revisit); C; B again (revisit).
    points = [(0, 0), (100, 0), (10, 10), (5, 0), (300, 300), (110, 5)]
    assert B.regions(points, radius=20) == (3, 2)
    assert B.regions(points, radius=150) == (2, 1)  # A and B merge; C is new; B->A... only C->A/B returns
    assert B.regions([], radius=20) == (0, 0)
    assert B.regions([(0, 0), (30, 0)], radius=30) == (1, 0)  # the radius is inclusive


def test_trace_counts_on_a_single_turn_trace():
    text = ("<think> The cup is at (40, 40). Wait, that is a shadow; the cup is at (200, 120). "
            "Let me double-check (205, 118): yes, I can confirm it is a cup. </think>\n<answer> cup </answer>")
    counts = B.trace_counts(info(text, box=(190, 110, 230, 140)), radius=28)
    assert counts == {"points": 3, "regions": 2, "revisits": 0, "zooms": 0, "in_box": pytest.approx(2 / 3),
                      "backtracking": 1, "verification": 2}
    assert B.trace_counts(info(text))["in_box"] is None  # no ground-truth box


def test_phrases_match_whole_words_only():
    counts = B.trace_counts(info("<think> Awaiting the confirmation, actually factually. </think><answer>a</answer>"))
    assert counts["backtracking"] == 1 and counts["verification"] == 0  # "actually"; not Awaiting/factually


def test_zooms_count_one_executed_call_per_turn():
    turns = [f"<think> look at (10, 10) </think>\n{ZOOM % (10, 10)}",
             f"<think> closer at (300, 300) </think>\n{ZOOM % (300, 300)}",
             "<think> Based on it </think>\n<answer> red </answer>"]
    from vigorl_core.protocol import parse_conversation

    counts = B.trace_counts(B.TraceInfo("m", parse_conversation(turns)), radius=50)
    assert counts["zooms"] == 2 and counts["points"] == 2 and counts["regions"] == 2


def test_table_means_and_correct_only():
    right = info("<think> at (1, 1). verify (2, 2). </think><answer>a</answer>", correct=True)
    wrong = info("<think> at (500, 500). wait. </think><answer>b</answer>", correct=False)
    table = B.behaviour_table({"m": [right, wrong]}, radius=10)
    assert table["m"]["traces"] == 2 and table["m"]["points"] == 1.5 and table["m"]["backtracking"] == 0.5
    assert table["m"]["in_box"] is None
    only = B.behaviour_table({"m": [right, wrong]}, radius=10, correct_only=True)["m"]
    assert only["traces"] == 1 and only["verification"] == 1 and only["backtracking"] == 0
    md = B.markdown_table({"SFT": table["m"], "RL": only})
    assert md.splitlines()[0] == "| | SFT | RL |" and "| points per trace | 1.50 | 2.00 |" in md
    assert "| points in the truth box (%) | - | - |" in md
    assert "SFT" in B.format_table({"SFT": table["m"]})


def test_judge_prompt_and_count_parser():
    prompt = B.judge_prompt("backtracking", "Which is red?", "step one (1, 2)")
    assert "backtracking" in prompt and prompt.endswith("<|im_start|>assistant\n") and "(1, 2)" in prompt
    assert B.parse_count("<count>3</count>") == 3 and B.parse_count("<count> 12") == 12
    assert B.parse_count("three") is None


def _prediction(tmp_path: Path, id_: str, answer: str) -> E.Prediction:
    sample = Sample(id=id_, task="grounding", source="screenspot_v2", images=[str(tmp_path / "x.png")],
                    question="Click OK", answer="(400, 300, 480, 360)", bbox=(400.0, 300.0, 480.0, 360.0),
                    category="icon")
    text = f"<think> The OK button is at (130, 100). Let me verify (135, 101). </think>\n<answer> {answer} </answer>"
    return E.make_prediction(sample, text, mode="grounded", frame=FrameMap((800, 600), (252, 189)))


def test_files_of_each_format_and_the_cli(tmp_path: Path, capsys):
    run = tmp_path / "runs" / "eval" / "sft"
    run.mkdir(parents=True)
    preds = [_prediction(tmp_path, "a", "(140, 105)"), _prediction(tmp_path, "b", "(10, 10)")]
    (run / "predictions.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in preds) + '{"id": "cut')
    traces = B.load_traces(run)  # the run folder; the partial last line is dropped
    assert [t.correct for t in traces] == [True, False] and traces[0].box is not None
    assert B.trace_counts(traces[0])["in_box"] == 1.0  # truth box in the model frame: (126, 94.5, 151.2, 113.4)
    rollouts = tmp_path / "runs" / "grpo" / "rl" / "rollouts.jsonl"
    rollouts.parent.mkdir(parents=True)
    rollouts.write_text(json.dumps({"step": 3, "sample_id": "s", "group_index": 1, "reward": 1.2,
                                    "details": {"accuracy": 1.0}, "finish": "answer", "versions": [3],
                                    "text": f"<think> (5, 5) </think>\n{ZOOM % (5, 5)}\n<observation>\nx\n"
                                            "</observation>\n<think> ok </think>\n<answer> a </answer>",
                                    "points": [[5, 5]]}) + "\n")
    [rollout] = B.load_traces(rollouts)
    assert rollout.id == "s#1@3" and rollout.correct and B.trace_counts(rollout)["zooms"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n{"hello": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        B.load_traces(bad)

    out = tmp_path / "out"
    assert job.main(["--files", f"[{run / 'predictions.jsonl'}, {rollouts}]", "--correct_only", "true",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "correct traces" in printed and "sft" in printed and "rl" in printed
    saved = json.loads((out / "behaviour.json").read_text())
    assert saved["table"]["sft"]["traces"] == 1 and saved["table"]["rl"]["zooms"] == 1
    assert "| regions explored |" in (out / "behaviour.md").read_text()
    assert job.main(["--files", f"[{bad}]"]) == 2 and "bad.jsonl:1" in capsys.readouterr().err


class FakeCritic:
    """A Critic handle whose judge answers by prompt: 2 for backtracking, none for regions, else 1."""

    class _Method:
        def __init__(self):
            self.prompts = []

        def remote(self, prompt: str):
            self.prompts.append(prompt)
            reply = "<count>2</count>" if "(backtracking)" in prompt else "no" if "(regions" in prompt else "<count>1"

            class Response:
                def result(self):
                    return B.parse_count(reply)

            return Response()

    def __init__(self):
        self.count = self._Method()


def test_judge_rows_ask_every_count_of_each_trace():
    critic = FakeCritic()
    traces = [info("<think> a (1, 1). b (2, 2). </think><answer>x</answer>") for _ in range(3)]
    rows = job.judge_rows(critic, {"SFT": traces, "RL": traces[:1]}, limit=2)
    assert len(critic.count.prompts) == 4 * (2 + 1)  # four questions, up to `limit` traces per column
    assert "a (1, 1).\nb (2, 2)." in critic.count.prompts[0]
    assert rows == {"judge: verification": {"SFT": 1.0, "RL": 1.0}, "judge: backtracking": {"SFT": 2.0, "RL": 2.0},
                    "judge: subgoals": {"SFT": 1.0, "RL": 1.0}, "judge: regions": {}}
    md = B.markdown_table(B.behaviour_table({"SFT": traces, "RL": traces[:1]}), rows)
    assert "| judge: backtracking | 2.00 | 2.00 |" in md and "| judge: regions | - | - |" in md
