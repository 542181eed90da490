"""Loaders and writers for our sample JSONL and the original schemas A/B/C (vigorl_core.data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from vigorl_core.data import (
    DataError, infer_task_source, load_samples, parse_options, read_jsonl, to_rl_record,
    to_vlmsearch_record, write_jsonl, write_samples_jsonl,
)
from vigorl_core.records import Sample

# ------------------------------------------------------------------------------------------- fixtures


def png(path: Path, size: tuple[int, int] = (8, 6)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return str(path)


def jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw strings for broken lines) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A DATA_ROOT like the original release, with a few tiny images."""
    r = tmp_path / "root"
    png(r / "vstar" / "direct_attributes" / "a.png")
    png(r / "vstar" / "relative_position" / "b.png")
    png(r / "img" / "one.png")
    png(r / "img" / "two.png")
    png(r / "img" / "crop.png")
    return r


def vlm(id_, image="img/one.png", question="<image>\nWhat colour?", answer="red", **extra) -> dict:
    return {"id": id_, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}], **extra}


def rl(problem="<image>Which is closer? (A) chair (B) table", answer="chair", images=("img/one.png",)) -> dict:
    return {"problem": problem, "answer": answer, "images": list(images)}


def sft(question="<image>Find the cup.", chain="<think> (3, 4) here </think>\n<answer> cup </answer>",
        images=("img/one.png",), **extra) -> dict:
    return {"messages": [{"role": "system", "content": "Think with points."},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": chain}], "images": list(images), **extra}


def raises(fn, *parts: str) -> DataError:
    with pytest.raises(DataError) as info:
        fn()
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    return info.value


# ----------------------------------------------------------------------------------- schema A (vlmsearch)


def test_vlmsearch_vstar_infers_task_category_options(root: Path):
    q = "<image>\nWhat is the colour of the bag?\nAnswer Choices:\n(A) red\n(B) blue\n(C) green"
    f = jsonl(root / "visual_search" / "vstar" / "vstarbench_test.jsonl", [
        vlm(7, "vstar/direct_attributes/a.png", q, "red", extra_key=[1, 2]),
        vlm("x8", "vstar/relative_position/b.png", "<image> Is the cup left of the dog?\nA. yes\nB. no", "yes"),
    ])
    a, b = load_samples(f, data_root=root)
    assert (a.id, a.task, a.source, a.category) == ("7", "visual_search", "vstar", "direct_attributes")
    assert a.question == "What is the colour of the bag?\nAnswer Choices:\n(A) red\n(B) blue\n(C) green"
    assert a.options == ["red", "blue", "green"] and a.answer == "red"
    assert a.images == [str(root / "vstar" / "direct_attributes" / "a.png")] and os.path.isabs(a.images[0])
    assert a.metadata == {"extra_key": [1, 2]}
    assert b.category == "relative_position" and b.options == ["yes", "no"] and b.bbox is None


def test_vlmsearch_grounding_parses_box_and_point(root: Path):
    f = jsonl(root / "web_grounding" / "ScreenSpot-Pro" / "screenspot_pro_test.jsonl",
              [vlm(1, answer="(10, 20, 30, 40)"), vlm(2, answer="(5.5, 6)")])
    box, point = load_samples(f, data_root=root)
    assert (box.task, box.source, box.bbox, box.point) == ("grounding", "screenspot_pro", (10, 20, 30, 40), None)
    assert point.point == (5.5, 6.0) and point.bbox is None
    bad = jsonl(root / "ScreenSpot-V2" / "screenspot_v2_test.jsonl",
                [vlm(1, answer="(1, 2, 3, 4)"), vlm(2, answer="click OK")])
    raises(lambda: load_samples(bad, data_root=root), "screenspot_v2_test.jsonl:2:",
           "field 'conversations[1].value'", "(x1, y1, x2, y2)")


def test_wrong_type_message_format(root: Path):
    record = vlm(11)
    record["conversations"][1]["value"] = 3
    f = jsonl(root / "spatial_reasoning" / "sat2_test" / "sat2_test.jsonl", [vlm(i) for i in range(11)] + [record])
    err = raises(lambda: load_samples(f, data_root=root))
    assert str(err) == f"{f}:12: field 'conversations[1].value': expected a string, got int"
    assert (err.file, err.line, err.field) == (str(f), 12, "conversations[1].value")


# ---------------------------------------------------------------------------------------- schema B (RL)


def test_rl_ids_from_line_numbers_and_inline_options(root: Path):
    f = root / "spatial_reasoning" / "vigorl_sat2_val_RL.jsonl"
    jsonl(f, [rl(), "", rl(answer="table", images=["img/two.png"])])
    a, b = load_samples(f, data_root=root)
    assert (a.id, b.id) == ("vigorl_sat2_val_RL:1", "vigorl_sat2_val_RL:3")
    assert (a.task, a.source) == ("spatial", "sat2")
    assert a.question == "Which is closer? (A) chair (B) table" and a.options == ["chair", "table"]
    assert b.images == [str(root / "img" / "two.png")]


def test_rl_placeholder_count_must_match_images(root: Path):
    f = jsonl(root / "blink" / "blink_validation.jsonl", [rl(problem="<image><image>Same?")])
    raises(lambda: load_samples(f, data_root=root), "blink_validation.jsonl:1:", "field 'images'", "2 <image>")


# --------------------------------------------------------------------------------------- schema C (SFT)


def test_sft_json_array_multiturn(root: Path):
    records = [sft(id="0_0", images=["img/one.png", "img/crop.png"], metadata={"k": 1}),
               sft(gt_answer="mug")]
    f = root / "misc" / "set" / "chains_train.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(records, indent=2))
    a, b = load_samples(f, data_root=root, task="visual_search", source="synthetic")
    assert (a.id, a.question, a.answer) == ("0_0", "Find the cup.", "cup")
    assert a.images == [str(root / "img" / "one.png")]  # crops of the chain are not the question's images
    assert a.metadata == {"k": 1, "system": "Think with points."}
    assert (b.id, b.answer) == ("chains_train:2", "mug")


def test_sft_json_array_errors_name_the_element_line(root: Path):
    f = root / "misc" / "set" / "sharegpt.json"
    f.parent.mkdir(parents=True)
    records = [sft(id="a"), sft(id="b", chain="no tags here")]
    f.write_text(json.dumps(records, indent=2))
    second = f.read_text().splitlines().index("  {", 2) + 1
    raises(lambda: load_samples(f, data_root=root, task="spatial", source="sat2"),
           f"sharegpt.json:{second}:", "field 'gt_answer'", "<answer>")
    f.write_text('[\n' + json.dumps(sft()) + '\n{"messages": []}]')
    raises(lambda: load_samples(f, task="spatial", source="sat2"), "sharegpt.json:3:", "invalid JSON")


def test_sft_parquet_and_jsonl(root: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": r["messages"], "images": r["images"]} for r in (sft(), sft(question="<image>Find it."))]
    f = root / "misc" / "set" / "multiturn.parquet"
    f.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), f)
    a, b = load_samples(f, data_root=root, task="visual_search", source="synthetic")
    assert (a.id, b.id, b.question, b.answer) == ("multiturn:1", "multiturn:2", "Find it.", "cup")
    g = jsonl(root / "misc" / "set" / "chains.jsonl", [sft(id=1)])
    assert load_samples(g, data_root=root, task="spatial", source="sat2")[0].id == "1"


# -------------------------------------------------------------------------------------- broken files


def test_bad_json_on_line_3(root: Path):
    f = jsonl(root / "vstar" / "vstarbench_test.jsonl", [vlm(1), vlm(2), '{"id": 3, "image": ', vlm(4)])
    err = raises(lambda: load_samples(f, data_root=root), "vstarbench_test.jsonl:3:", "invalid JSON")
    assert err.line == 3
    raises(lambda: list(read_jsonl(f)), "vstarbench_test.jsonl:3:")


def test_missing_answer(root: Path):
    broken = rl()
    del broken["answer"]
    f = jsonl(root / "spatial_reasoning" / "vigorl_sat2_train_RL.jsonl", [rl(), broken])
    err = raises(lambda: load_samples(f, data_root=root), "vigorl_sat2_train_RL.jsonl:2:", "field 'answer'",
                 "missing")
    assert err.field == "answer"


def test_wrong_type_images(root: Path):
    f = jsonl(root / "spatial_reasoning" / "vigorl_sat2_train_RL.jsonl", [rl(images=["img/one.png", 4])])
    raises(lambda: load_samples(f, data_root=root), "RL.jsonl:1:", "field 'images[1]'", "expected a string, got int")


def test_missing_images_are_collected(root: Path):
    records = [vlm(i, image=f"nope/{i}.png") for i in range(12)] + [vlm(99)]
    f = jsonl(root / "vstar" / "vstarbench_test.jsonl", records)
    err = raises(lambda: load_samples(f, data_root=root), "12 image file(s) not found",
                 "vstarbench_test.jsonl:1: ", "nope/0.png", "vstarbench_test.jsonl:10: ", "and 2 more")
    assert "nope/10.png" not in str(err) and err.line is None
    assert len(load_samples(f, data_root=root, check_images=False)) == 13


def test_duplicate_id_names_both_lines(root: Path):
    f = jsonl(root / "vstar" / "vstarbench_test.jsonl", [vlm(1), vlm(2), vlm("1")])
    raises(lambda: load_samples(f, data_root=root), "vstarbench_test.jsonl:3:", "field 'id'", "'1'", "line 1")


def test_unknown_schema_and_mixed_schemas(root: Path):
    f = jsonl(root / "vstar" / "vstarbench_test.jsonl", [{"question": "q", "label": 1}])
    raises(lambda: load_samples(f, data_root=root), "vstarbench_test.jsonl:1:", "unknown schema", "'label'")
    g = jsonl(root / "vstar" / "vstarbench_test.jsonl", [vlm(1), rl()])
    raises(lambda: load_samples(g, data_root=root), "vstarbench_test.jsonl:2:", "field 'conversations'",
           "line 1", "vlmsearch")


def test_task_and_source_needed_when_path_says_nothing(root: Path):
    f = jsonl(root / "misc" / "set" / "questions.jsonl", [vlm(1)])
    raises(lambda: load_samples(f, data_root=root), "questions.jsonl:1:", "task=", "source=")
    sa = jsonl(root / "vstar" / "vigorl_SA_MCTS.jsonl", [vlm(1)])
    raises(lambda: load_samples(sa, data_root=root), "field 'source'")  # SA_ names the task only
    assert load_samples(sa, data_root=root, source="synthetic")[0].task == "visual_search"
    raises(lambda: load_samples(f, task="nope", source="x"), "field 'task'", "spatial")


def test_ours_validation_error_names_field_path(root: Path):
    good = Sample(id="s", task="spatial", source="sat2", images=[str(root / "img/one.png")], question="q",
                  answer="a")
    bad = json.loads(good.model_dump_json()) | {"id": "t", "images": ["img/one.png", 5]}
    f = jsonl(root / "misc" / "set" / "ours.jsonl", [json.loads(good.model_dump_json()), bad])
    raises(lambda: load_samples(f), "ours.jsonl:2:", "field 'images[1]'", "got int")
    newer = json.loads(good.model_dump_json()) | {"schema_version": 99}
    raises(lambda: load_samples(jsonl(f, [newer])), "ours.jsonl:1:", "field 'schema_version'")
    raises(lambda: load_samples(jsonl(f, [good.model_dump()]), task="grounding"), "field 'task'")


def test_infer_task_source_rules():
    assert infer_task_source("d/web_grounding/vigorl_osatlas_train_RL.jsonl") == ("grounding", "osatlas")
    assert infer_task_source("d/ScreenSpot-V2/test.jsonl") == ("grounding", "screenspot_v2")
    assert infer_task_source("d/web_action/vigorl_ical_train_RL.jsonl") == ("web_action", "vwa")
    assert infer_task_source("d/spatial_reasoning/robospatial.jsonl") == ("spatial", "robospatial")
    assert infer_task_source("d/spatial/vertical_physical.jsonl") == (None, None)


def test_parse_options():
    assert parse_options("Q?\nA. left\nB. right\nAnswer with a letter.") == ["left", "right"]
    assert parse_options("Q? (A) left, (B) right, (C) up") == ["left", "right", "up"]
    assert parse_options("A. Smith wrote it.") == [] and parse_options("Pick (B) x (C) y") == []


# ------------------------------------------------------------------------------------- writers, round trip


def test_ours_round_trip(root: Path, tmp_path: Path):
    samples = [
        Sample(id="a", task="grounding", source="screenspot_v2", images=[str(root / "img/one.png")],
               question="Click OK", answer="(1, 2, 3, 4)", bbox=(1, 2, 3, 4), metadata={"x": [1, {"y": 2}]}),
        Sample(id="b", task="spatial", source="synthetic", images=[str(root / "img/one.png"),
               str(root / "img/two.png")], question="Same?", options=["yes", "no"], answer="yes",
               point=(0.5, 1.5), category="pairs"),
    ]
    out = tmp_path / "out" / "samples.jsonl"
    assert write_samples_jsonl(samples, out) == 2
    assert load_samples(out) == samples
    assert os.listdir(out.parent) == ["samples.jsonl"]


def test_vlmsearch_round_trip(root: Path, tmp_path: Path):
    q = "<image>\nWhich is bigger?\nAnswer Choices:\n(A) cat\n(B) dog"
    f = jsonl(root / "visual_search" / "vstar" / "vstarbench_test.jsonl",
              [vlm(1, "vstar/direct_attributes/a.png", q, "cat", note="n"), vlm(2, answer="blue")])
    loaded = load_samples(f, data_root=root)
    records = [to_vlmsearch_record(s, data_root=root) for s in loaded]
    assert records[0]["image"] == "vstar/direct_attributes/a.png" and records[0]["note"] == "n"
    out = root / "copy" / "vstar" / "vstarbench_test.jsonl"
    write_jsonl(records, out)
    assert load_samples(out, data_root=root) == loaded
    with pytest.raises(ValueError, match="one image"):
        to_vlmsearch_record(loaded[0].model_copy(update={"images": loaded[0].images * 2}))


def test_rl_round_trip_and_options_kept_in_text(root: Path):
    f = jsonl(root / "spatial_reasoning" / "vigorl_sat2_val_RL.jsonl",
              [rl(), rl(problem="<image><image>Same object?", answer="no", images=["img/one.png", "img/two.png"])])
    loaded = load_samples(f, data_root=root)
    out = root / "spatial_reasoning" / "copy_sat2_RL.jsonl"
    write_jsonl((to_rl_record(s, data_root=root) for s in loaded), out)
    assert [r["images"] for _, r in read_jsonl(out)] == [["img/one.png"], ["img/one.png", "img/two.png"]]
    again = load_samples(out, data_root=root)
    assert [s.model_copy(update={"id": o.id}) for s, o in zip(again, loaded)] == loaded
    # options stored apart from the question are written into the text the original tools read
    s = loaded[0].model_copy(update={"question": "Closer?", "options": ["chair", "table"]})
    assert to_rl_record(s)["problem"].endswith("Closer?\nAnswer Choices:\n(A) chair\n(B) table")
    assert to_rl_record(s)["images"] == s.images  # absolute without data_root


def test_write_jsonl_is_atomic(tmp_path: Path):
    out = tmp_path / "x.jsonl"
    write_jsonl([{"a": 1}], out)

    def boom():
        yield {"a": 2}
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_jsonl(boom(), out)
    assert list(read_jsonl(out)) == [(1, {"a": 1})] and os.listdir(tmp_path) == ["x.jsonl"]
