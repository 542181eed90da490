"""Tree linearization into SFT chains (vigorl_core.search.linearize) on hand-built trees."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vigorl_core.data import load_samples, write_jsonl
from vigorl_core.frames import PROFILES, resize_to_model
from vigorl_core.search.linearize import (
    CORRECTION, Chain, LinearizeConfig, chain_stats, linearize, split_of, to_multiturn, to_sharegpt, tree_stats,
    write_json,
)
from vigorl_core.search.trees import TreeNode, TreeRecord, TreeRollout
from vigorl_core.protocol import FORCED_FINAL_PREFIX, render_tool_call
from vigorl_core.zoom import point_crop, zoom_settings

Q = "What colour is the mug?\nOptions:\nA. red\nB. blue\nC. green"
MUG, RED, LID, SHELF, SAYS_RED = ("Look at the mug (10, 20).", "The mug is red (30, 40).", "The lid is blue (50, 60).",
                                  "Check the shelf (70, 80).", "It is red (90, 90).")


def think(s: str) -> str:
    return f"<think> {s} </think>"


def rollout(texts: list[str], answer: str, reward: float, depth: int = 1) -> TreeRollout:
    return TreeRollout(final_answer=answer, reward=reward, ephemeral_texts=[Q, *texts, f"<answer> {answer} </answer>"],
                       depth=depth, ephemeral_depth=len(texts) + 1)


def tree_record(image_path: str = "/data/mug.png", id_: str = "t1", reverse: bool = False) -> TreeRecord:
    """root -> A (mug): rollouts red (1), lid/blue (0), red again (a duplicate)
            -> B (shelf): rollout green (0)
            -> T (terminal "red", judged 1: its think block is a step)."""
    a = TreeNode(thought_text=think(MUG), value=2 / 3, visit_count=3, rollouts=[
        rollout([think(MUG), think(RED)], "red", 1.0), rollout([think(MUG), think(LID)], "blue", 0.0),
        rollout([think(MUG), think(RED)], "red", 1.0)])
    b = TreeNode(thought_text=think(SHELF), visit_count=1, rollouts=[rollout([think(SHELF)], "green", 0.0)])
    t = TreeNode(thought_text="red", is_terminal=True, value=1.0, visit_count=1, reward=1.0, rollouts=[
        TreeRollout(final_answer="red", reward=1.0, ephemeral_texts=[Q, think(SAYS_RED) + "\n<answer> red </answer>"],
                    depth=1, ephemeral_depth=1)])
    children = [a, b, t][::-1] if reverse else [a, b, t]
    root = TreeNode(thought_text=Q, value=0.6, visit_count=5, children=children)
    return TreeRecord(id=id_, question="What colour is the mug?", options=["red", "blue", "green"], image=image_path,
                      images=[image_path], true_answer="red", tree=root, task="visual_search", source="synthetic",
                      original_size=(448, 448), model_size=(224, 224), global_search_time=12.0)


def by_kind(chains: list[Chain], kind: str) -> dict[tuple[str, ...], Chain]:
    return {tuple(c.steps): c for c in chains if c.kind == kind}


def test_direct_and_backtracking_chains_share_the_prefix_once():
    chains = linearize(tree_record())
    direct = by_kind(chains, "direct")
    assert set(direct) == {(MUG, RED), (SAYS_RED,)}  # the duplicate rollout gives one chain
    assert direct[(MUG, RED)].text == f"<think>\n{MUG} {RED}\n</think>\n<answer> red </answer>"
    back = by_kind(chains, "backtrack")
    assert set(back) == {
        (MUG, LID, CORRECTION, RED),               # branched after the mug: the shared step written once
        (MUG, LID, CORRECTION, SAYS_RED),          # different first steps: nothing shared
        (SHELF, CORRECTION, MUG, RED),
        (SHELF, CORRECTION, SAYS_RED),
    }
    c = back[(MUG, LID, CORRECTION, RED)]
    assert (c.shared_steps, c.wrong_steps, c.answer) == (1, 1, "red")
    assert c.text.count(MUG) == 1 and "blue" not in c.text.split("</think>")[1]  # the wrong answer is dropped
    assert all(ch.answer == "red" and ch.gt_answer == "red" and ch.tree_value == 0.6 for ch in chains)
    assert len({ch.id for ch in chains}) == len(chains)
    assert Chain.model_validate_json(c.model_dump_json()) == c


def test_caps_are_deterministic_and_independent_of_tree_order():
    cfg = LinearizeConfig(max_direct=1, max_backtrack=2)
    first = linearize(tree_record(), cfg)
    assert [c.kind for c in first] == ["direct", "backtrack", "backtrack"]
    assert linearize(tree_record(), cfg) == first
    assert [c.steps for c in linearize(tree_record(reverse=True), cfg)] == [c.steps for c in first]
    other_seed = [linearize(tree_record(), cfg.model_copy(update={"seed": s})) for s in range(1, 8)]
    assert any([c.steps for c in o] != [c.steps for c in first] for o in other_seed)
    assert linearize(tree_record(), LinearizeConfig(max_direct=0, max_backtrack=0)) == []
    # min_steps drops answer-only chains; a threshold above every reward leaves nothing correct
    no_steps = tree_record()
    no_steps.tree.children[2].rollouts[0].ephemeral_texts = [Q, "<answer> red </answer>"]
    assert () not in by_kind(linearize(no_steps), "direct")
    assert linearize(tree_record(), LinearizeConfig(correct_threshold=1.5)) == []


def test_modal_first_point_keeps_the_chains_that_start_where_the_teacher_points_most():
    # first points of the five attempts: the mug (10, 20) three times, the shelf once, "It is red" (90, 90) once
    chains = linearize(tree_record(), LinearizeConfig(modal_first_point=True))
    assert set(by_kind(chains, "direct")) == {(MUG, RED)}  # (SAYS_RED,) reached red from another point
    assert set(by_kind(chains, "backtrack")) == {(MUG, LID, CORRECTION, RED), (MUG, LID, CORRECTION, SAYS_RED)}
    # without points in any attempt there is no mode and nothing is dropped
    pointless = tree_record()
    for node in pointless.nodes():
        for r in node.rollouts:
            r.ephemeral_texts = [t.replace("(", "[").replace(")", "]") for t in r.ephemeral_texts]
    assert len(linearize(pointless, LinearizeConfig(modal_first_point=True))) == len(linearize(pointless))


def test_points_are_rescaled_to_the_student_frame():
    # teacher frame 224x224 (tiny); the qwen2.5-vl student sees the 448x448 file unresized: points x2
    chains = linearize(tree_record(), profile=PROFILES["qwen2.5-vl"])
    assert ("Look at the mug (20, 40).", "The mug is red (60, 80).") in by_kind(chains, "direct")
    assert by_kind(linearize(tree_record(), profile=PROFILES["tiny"]), "direct").keys() == \
        by_kind(linearize(tree_record()), "direct").keys()


def test_split_is_deterministic_by_sample():
    assert split_of("abc", 0.3) == split_of("abc", 0.3)
    ids = [f"s{i}" for i in range(2000)]
    share = sum(split_of(i, 0.2) == "val" for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert {split_of(i, 0.0) for i in ids} == {"train"} and {split_of(i, 1.0) for i in ids} == {"val"}
    chains = linearize(tree_record(), LinearizeConfig(val_fraction=0.5))
    assert len({c.split for c in chains}) == 1 and chains[0].split == split_of("t1", 0.5)


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    y, x = np.mgrid[0:448, 0:448]
    img = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))  # no two crops alike
    path = tmp_path / "mug.png"
    img.save(path)
    return str(path)


def test_sharegpt_single_turn_is_read_back_by_the_loader(tmp_path, image_path):
    chains = linearize(tree_record(image_path))
    path = tmp_path / "chains.json"
    assert write_json([to_sharegpt(c) for c in chains], path) == len(chains)
    samples = load_samples(path, task="visual_search", source="synthetic")
    assert [s.id for s in samples] == [c.id for c in chains]
    s = samples[0]
    assert s.images == [image_path] and s.answer == "red" and s.options == ["red", "blue", "green"]
    assert "<think>" in s.metadata["system"] and s.metadata["kind"] == chains[0].kind
    rec = to_sharegpt(chains[0])
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"] == "<image>" + Q


def test_multiturn_turns_points_into_zoom_calls_with_table_crops(tmp_path, image_path):
    chains = linearize(tree_record(image_path))
    chain = by_kind(chains, "backtrack")[(MUG, LID, CORRECTION, RED)]
    profile = PROFILES["tiny"]
    [rec] = to_multiturn([chain], profile, tmp_path / "crops")
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]
    turns = [m["content"] for m in rec["messages"][2:]]
    assert turns[0] == f"<think> {MUG} </think>\n{render_tool_call(10, 20)}"
    assert turns[2] == f"<think> {LID} </think>\n{render_tool_call(50, 60)}"
    assert turns[4] == f"<think> {CORRECTION} {RED} </think>\n{render_tool_call(30, 40)}"
    observation = "<observation>\nHere is the crop of the image centered on the coordinate:\n<image>\n</observation>"
    assert turns[1] == turns[3] == turns[5] == observation
    assert turns[6] == f"{FORCED_FINAL_PREFIX} red </answer>"
    # crops: cut from the tiny model frame with the visual_search x tiny settings (the RL/serving table)
    model_image, _ = resize_to_model(Image.open(image_path), profile)
    settings = zoom_settings("visual_search", "tiny")
    assert rec["images"][0] == image_path and len(rec["images"]) == 4
    for path, point in zip(rec["images"][1:], [(10, 20), (50, 60), (30, 40)], strict=True):
        crop = Image.open(path)
        assert crop.size == (settings.crop_size, settings.crop_size)
        assert crop.tobytes() == point_crop(model_image, *point, settings).image.tobytes()
    # the loader reads it back (the question's image only)
    path = tmp_path / "multiturn.json"
    write_json([rec], path)
    [sample] = load_samples(path, task="visual_search", source="synthetic")
    assert sample.images == [image_path] and sample.answer == "red"


def test_multiturn_budget_repeats_reasoning_only_and_outside_points(tmp_path, image_path):
    chains = linearize(tree_record(image_path))
    chain = by_kind(chains, "backtrack")[(MUG, LID, CORRECTION, RED)]
    # max_images 3: two zooms, then the forced final turn (the rest of the reasoning is not used)
    [rec] = to_multiturn([chain], PROFILES["tiny"], tmp_path / "crops", max_images=3)
    assert len(rec["images"]) == 3 and rec["messages"][-1]["content"] == f"{FORCED_FINAL_PREFIX} red </answer>"
    # no point: one final turn with the reasoning and the answer; a repeated point adds no zoom
    plain = chain.model_copy(update={"steps": ["No points here.", "Again (10, 20).", "Still (10, 20)."]})
    [rec] = to_multiturn([plain], PROFILES["tiny"], tmp_path / "crops")
    assert len(rec["images"]) == 2
    assert rec["messages"][-1]["content"] == "<think> Still (10, 20). </think>\n<answer> red </answer>"
    # a point outside the 224x224 model frame drops the chain
    outside = chain.model_copy(update={"steps": ["Far away (500, 20)."]})
    assert to_multiturn([outside, chain], PROFILES["tiny"], tmp_path / "crops")[0]["id"] == chain.id
    assert len(to_multiturn([outside, chain], PROFILES["tiny"], tmp_path / "crops")) == 1


def test_original_trees_linearize(tmp_path):
    line = {
        "question": "<image>\nWhich side is the cup on?", "image": "/abs/img.png", "true_answer": "left", "id": 3,
        "tree": {"thought_text": "<image>\nWhich side is the cup on?", "is_terminal": False, "value": 0.5,
                 "visit_count": 2, "used_coords": [], "rollouts": [], "children": [{
                     "thought_text": "<think> The cup is at (12, 40). </think>", "is_terminal": False, "value": 0.5,
                     "visit_count": 2, "used_coords": ["(12, 40)"], "children": [], "rollouts": [
                         {"final_answer": "left", "reward": True, "ephemeral_texts": [
                             "<image>\nWhich side is the cup on?", "<think> The cup is at (12, 40). </think>",
                             "left"], "ephemeral_depth": 2, "depth": 1},
                         {"final_answer": "right", "reward": 0, "ephemeral_texts": [
                             "<image>\nWhich side is the cup on?", "<think> The cup is at (12, 40). </think>",
                             "<think> No, the table (80, 40). </think>", "right"], "ephemeral_depth": 3,
                          "depth": 1}]}]},
    }
    chains = linearize(TreeRecord.from_original(line, task="spatial"))
    # the wrong attempt continues the correct one's only step, so the correct one has nothing after the
    # shared prefix to follow a correction with: no backtracking chain
    assert [c.kind for c in chains] == ["direct"]
    direct = by_kind(chains, "direct")
    assert set(direct) == {("The cup is at (12, 40).",)} and direct[("The cup is at (12, 40).",)].answer == "left"
    assert chains[0].question == "Which side is the cup on?" and chains[0].images == ["/abs/img.png"]


def test_statistics():
    solved, unsolved = tree_record(), tree_record(id_="t2")
    unsolved.tree.value = 0.0
    stats = tree_stats([solved, unsolved])
    assert stats["trees"] == 2 and stats["root_correct_ratio"] == 0.5 and stats["solved_ratio"] == 1.0
    assert stats["nodes_mean"] == 4 and stats["depth_max"] == 1 and stats["seconds_mean"] == 12.0
    assert stats["rollouts"] == 10 and stats["rollout_accuracy"] == pytest.approx(6 / 10)
    assert stats["status"] == {"ok": 2}
    chains = linearize(solved) + linearize(unsolved)
    cs = chain_stats(chains)
    assert cs["chains"] == 12 and cs["kind"] == {"direct": 4, "backtrack": 8} and cs["samples_with_chains"] == 2
    assert tree_stats([])["trees"] == 0 and chain_stats([])["chains"] == 0


def test_sft_reader_takes_both_formats(tmp_path, image_path):
    from vigorl_core.train.sft_data import conversation_mode, read_conversations

    chains = linearize(tree_record(image_path))
    write_json([to_sharegpt(c) for c in chains], tmp_path / "single.json")
    write_json(to_multiturn(chains, PROFILES["tiny"], tmp_path / "crops"), tmp_path / "multi.json")
    single, multi = read_conversations(tmp_path / "single.json"), read_conversations(tmp_path / "multi.json")
    assert len(single) == len(multi) == len(chains)
    assert {conversation_mode(c) for c in single} == {"grounded"} and {c.task for c in single} == {"visual_search"}
    assert "multiturn" in {conversation_mode(c) for c in multi}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_chain_files_travel_relative_paths_and_readable_modes(tmp_path, image_path, umask_022):
    """Written with the umask's mode (0644, not mkstemp's 0600: a shared runs folder must read them) and with
    image paths relative to the file's folder, so the run folder and its data move together."""
    from vigorl_core.train.sft_data import read_conversations

    run = tmp_path / "runs" / "chains" / "r"
    chains = linearize(tree_record(image_path))
    write_json([to_sharegpt(c) for c in chains], run / "train.json")
    write_json(to_multiturn(chains, PROFILES["tiny"], run / "crops"), run / "train_multiturn.json")
    write_jsonl([{"images": [image_path]}], run / "chains.jsonl")
    files = [run / "train.json", run / "train_multiturn.json", run / "chains.jsonl", *(run / "crops").iterdir()]
    assert len(files) > 3 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}
    assert not [f for f in run.iterdir() if f.name.endswith(".tmp")]
    records = json.loads((run / "train_multiturn.json").read_text())
    images = {p for r in records for p in r["images"]}
    assert "../../../mug.png" in images and all(not os.path.isabs(p) for p in images)
    assert any(p.startswith("crops/") for p in images)
    moved = tmp_path / "elsewhere"  # another machine: the data and the runs folder, side by side as before
    moved.mkdir()
    shutil.move(tmp_path / "runs", moved / "runs")
    shutil.move(image_path, moved / "mug.png")
    convs = read_conversations(moved / "runs" / "chains" / "r" / "train_multiturn.json")  # checks every image
    assert convs[0].images[0] == str(moved / "mug.png") and len(convs) == len(chains)
    assert len(read_conversations(moved / "runs" / "chains" / "r" / "train.json")) == len(chains)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "train.json"
    write_json([{"id": 1, "images": []}], path)
    with pytest.raises(TypeError):
        write_json([{"id": 2, "images": [], "bad": object()}], path)
    assert json.loads(path.read_text()) == [{"id": 1, "images": []}] and os.listdir(tmp_path) == ["train.json"]
