"""MCTS arithmetic and bookkeeping on a scripted deterministic teacher (vigorl_core.search.mcts); no vLLM, no Ray.

The teacher reads the prompt it is given (a byte tokenizer makes ids <-> text exact), finds the previous
thoughts and whether the final answer is forced, and answers from a script; so every visit count and
value below can be checked by hand.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re

import pytest
from PIL import Image

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.data import DataError
from vigorl_core.rollout.engine import Generation
from vigorl_core.frames import PROFILES
from vigorl_core.search.mcts import FORCED_FINAL_USER, MCTS, MCTSConfig
from vigorl_core.search.trees import TreeRecord, load_trees
from vigorl_core.records import Sample

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<tool_call>", "</tool_call>"]
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL))


class ByteTokenizer:
    """One token per UTF-8 byte, plus Qwen's special tokens as single ids (256, 257, ...)."""

    def __init__(self):
        self.ids = {t: 256 + i for i, t in enumerate(SPECIAL)}
        self.tokens = {i: t for t, i in self.ids.items()}

    def encode(self, text, add_special_tokens=False):
        out, pos = [], 0
        for m in _SPECIAL_RE.finditer(text):
            out += list(text[pos:m.start()].encode()) + [self.ids[m.group(0)]]
            pos = m.end()
        return out + list(text[pos:].encode())

    def decode(self, ids, skip_special_tokens=False):
        out, run = [], []
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode(errors="replace") + self.tokens[i])
            run = []
        return "".join(out) + bytes(run).decode(errors="replace")

    def convert_tokens_to_ids(self, token):
        return self.ids[token]


def make_chat() -> ChatTokens:
    return ChatTokens(ByteTokenizer(), PROFILES["tiny"])


_THOUGHT_RE = re.compile(r"Previous thought (\d+): (.*?)(?=\n\nPrevious thought|<\|im_end\|>)", re.DOTALL)


class ScriptedTeacher:
    """PolicyEngine fake: `script(thoughts, forced, n, k) -> response text` for sample k of an n-call."""

    version = 0

    def __init__(self, chat, script, delay: float = 0.0, fail_on_call: int | None = None):
        self.chat, self.script, self.delay, self.fail_on_call = chat, script, delay, fail_on_call
        self.calls: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        prompt = self.chat.decode(prompt_ids)
        matches = _THOUGHT_RE.findall(prompt)
        assert [int(i) for i, _ in matches] == list(range(1, len(matches) + 1)), "thoughts numbered 1, 2, ..."
        thoughts = [t.strip() for _, t in matches]
        forced = FORCED_FINAL_USER in prompt
        self.calls.append({"prompt": prompt, "thoughts": thoughts, "forced": forced, "n": sampling.n,
                           "images": list(images)})
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("engine died")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        outs = [self.script(thoughts, forced, sampling.n, k) for k in range(sampling.n)]
        return [Generation(token_ids=self.chat.encode(o) + [self.chat.im_end_id], text=o, logprobs=None,
                           finish_reason="stop") for o in outs]


def sample(id_="s1", answer="red", task="visual_search", **kw) -> Sample:
    return Sample(id=id_, task=task, source="synthetic", images=[f"/data/{id_}.png"],
                  question="What colour is the small circle?", options=["red", "blue", "green"], answer=answer, **kw)


IMAGE = Image.new("RGB", (448, 448), (200, 200, 200))


def run_search(mcts: MCTS, *samples: Sample) -> list[TreeRecord]:
    async def go():
        return await asyncio.gather(*(mcts.search(mcts.prepare(s, [IMAGE])) for s in samples))

    return asyncio.run(go())


def think(text: str) -> str:
    return f"<think> {text} </think>"


def answer(text: str) -> str:
    return f"<answer> {text} </answer>"


# Root -> A (10, 10), B (20, 20), C (30, 30). Rollouts: from A both red (1), from B both blue (0), from C red
# and blue. Expanding A: a repeat of (10, 10) (discarded), D (40, 40) and a terminal "red"; rollouts from D:
# E then red (1), green (0). Expanding C: three repeats of (30, 30), all discarded.
def hand_script(thoughts, forced, n, k):
    assert not forced
    key = tuple(t.split(" ")[2] for t in thoughts)  # "Look at A (10, 10)." -> "A"
    table = {
        ((), 3): [think("Look at A (10, 10)."), think("Look at B (20, 20)."), think("Look at C (30, 30).")],
        (("A",), 2): [answer("red"), answer("red")],
        (("B",), 2): [answer("blue"), answer("A. blue")],
        (("C",), 2): [answer("red"), answer("blue")],
        (("A",), 3): [think("Look at A (10, 10) again."), think("Look at D (40,40)."), answer("B. red")],
        (("A", "D"), 2): [think("Look at E (50, 50)."), answer("green")],
        (("A", "D", "E"), 1): [answer("red")],
        (("C",), 3): [think("Look at C (30, 30) again.")] * 3,
    }
    return table[(key, n)][k]


def test_selection_expansion_backup_by_hand():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, hand_script)
    [rec] = run_search(MCTS(teacher, chat, config=MCTSConfig(simulations=3)), sample())
    assert rec.status == "ok", rec.error
    root = rec.tree
    a, b, c = root.children
    # simulation 1: three children, two rollouts each (rewards A: 1, 1; B: 0, 0; C: 1, 0)
    assert (b.visit_count, b.value) == (2, 0.0)
    assert (c.visit_count, c.value) == (2, 0.5)
    # simulation 2: UCT at the root (N = 6): A 1 + 2*sqrt(ln 7 / 3) beats C 0.5 + ... and B 0 + ...
    # A expands to D (the repeat of (10, 10) is discarded) and a terminal "red" (judged once: 1);
    # D's rollouts give 1 (E then red) and 0 (green).
    d, t = a.children
    assert (d.visit_count, d.value) == (2, 0.5)
    assert t.is_terminal and t.thought_text == "red" and t.reward == 1.0 and t.visit_count == 1
    assert (a.visit_count, a.value) == (5, pytest.approx(4 / 5))
    assert (root.visit_count, root.value) == (9, pytest.approx(5 / 9))
    # simulation 3: UCT at the root (N = 9): A 0.8 + 2*sqrt(ln 10 / 6) = 2.039, B 1.753, C 0.5 + 1.752 = 2.252
    uct = {name: n.value + 2.0 * math.sqrt(math.log(root.visit_count + 1) / (n.visit_count + 1))
           for name, n in zip("ABC", (a, b, c), strict=True)}
    assert max(uct, key=uct.get) == "C"
    assert c.children == [] and rec.stats["discarded_repeats"] == 4  # 1 under A + 3 under C
    assert rec.stats["expansions"] == 3 and rec.stats["simulations"] == 3
    assert rec.stats["nodes"] == 6
    assert rec.stats["rollouts"] == 8  # A, B, C, D: 2 each (the terminal is judged, not rolled out)
    # teacher calls: expansions with n=3, first rollout steps with n=2, later rollout steps with n=1
    assert [call["n"] for call in teacher.calls] == [3, 2, 2, 2, 3, 2, 1, 3]
    # rollout records (the original's fields)
    rollout = next(r for r in d.rollouts if r.reward == 1.0)
    assert rollout.ephemeral_texts == [root.thought_text, think("Look at A (10, 10)."), think("Look at D (40,40)."),
                                       think("Look at E (50, 50)."), answer("red")]
    assert (rollout.depth, rollout.ephemeral_depth, rollout.final_answer) == (2, 4, "red")
    assert (rollout.num_same_points, rollout.num_different_points) == (0, 1)
    assert sorted(r.final_answer for r in b.rollouts) == ["blue", "blue"]  # "A. " prefix stripped
    assert d.used_coords == ["(10, 10)", "(40, 40)"] and d.points == [(40, 40)]


def test_prompts_are_token_in_with_thought_tags_cut_and_model_frame_images():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, hand_script)
    mcts = MCTS(teacher, chat, config=MCTSConfig(simulations=2, min_thoughts=(4, 4)))
    run_search(mcts, sample())
    first = teacher.calls[0]["prompt"]
    assert first.startswith("<|im_start|>system\n") and "There should be at least 4 thoughts" in first
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour is the small circle?\nOptions:\nA. red" in first
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n")
    deep = next(c["prompt"] for c in teacher.calls if len(c["thoughts"]) == 3)
    assert ("\n\nPrevious thought 1:  Look at A (10, 10). \n\nPrevious thought 2:  Look at D (40,40). "
            "\n\nPrevious thought 3:  Look at E (50, 50). <|im_end|>") in deep
    # every prompt extends the root prompt head (prefix caching), images are the 224x224 model frame
    head = first.removesuffix("<|im_end|>\n<|im_start|>assistant\n")
    assert all(c["prompt"].startswith(head) for c in teacher.calls)
    assert all([im.size for im in c["images"]] == [(224, 224)] for c in teacher.calls)


def counting_script():
    """Every response names a new point; a forced response answers red (k even) or blue (k odd)."""
    counter = itertools.count(1)

    def script(thoughts, forced, n, k):
        if forced:
            return answer("red" if k % 2 == 0 else "blue")
        i = next(counter)
        return think(f"Step {i} at ({i}, {i}).")

    return script


def test_forced_final_answer_at_max_depth():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, counting_script())
    config = MCTSConfig(simulations=12, max_depth=2, rollout_max_steps=20)
    [rec] = run_search(MCTS(teacher, chat, config=config), sample())
    assert rec.status == "ok", rec.error
    nodes = list(rec.nodes())
    assert max(n.depth for n in nodes) == 3
    for n in nodes:
        assert (n.depth == 3) == n.forced
        if n.depth == 3:
            assert n.is_terminal and n.answer in ("red", "blue")
    # a prompt is forced exactly when it holds max_depth thoughts (expansions and rollouts alike)
    assert all(c["forced"] == (len(c["thoughts"]) >= 2) for c in teacher.calls)
    for n in nodes:
        for r in n.rollouts:
            assert r.ephemeral_depth <= 3 and r.final_answer in ("red", "blue")


def test_rollouts_stop_after_rollout_max_steps():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, counting_script())
    [rec] = run_search(MCTS(teacher, chat, config=MCTSConfig(simulations=2, rollout_max_steps=3)), sample())
    rollouts = [r for n in rec.nodes() for r in n.rollouts]
    assert rollouts and all(r.ephemeral_depth - r.depth == 3 for r in rollouts)  # 2 thoughts + forced answer
    assert all(r.ephemeral_texts[-1].startswith("<answer>") for r in rollouts)


def test_repeated_coordinates_are_discarded_even_when_written_differently():
    chat = make_chat()

    def script(thoughts, forced, n, k):
        if not thoughts and n == 3:
            return think("Start (7, 8).")
        if n == 3:  # expanding the child: every sample repeats its point, spaced differently
            return think(["Again ( 7,8 ).", "Again (7.0, 8).", "Elsewhere (9, 9) and (7, 8)."][k])
        return answer("red")

    [rec] = run_search(MCTS(ScriptedTeacher(chat, script), chat, config=MCTSConfig(simulations=2)), sample())
    first = rec.tree.children[0]
    assert first.children == []
    assert rec.stats["discarded_repeats"] == 3
    # without avoidance they are kept
    [rec] = run_search(MCTS(ScriptedTeacher(chat, script), chat,
                            config=MCTSConfig(simulations=2, avoid_repeat_coords=False)), sample())
    assert len(rec.tree.children[0].children) == 3


def test_time_limit_keeps_the_partial_tree():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, counting_script())
    calls = 0

    async def generate(prompt_ids, images, sampling, request_id=None):
        nonlocal calls
        calls += 1
        if calls > 1:  # the root expansion answers, then the engine hangs
            await asyncio.Event().wait()
        return await ScriptedTeacher.generate(teacher, prompt_ids, images, sampling)

    teacher.generate = generate
    [rec] = run_search(MCTS(teacher, chat, config=MCTSConfig(time_limit_s=0.3)), sample())
    assert rec.status == "timeout" and rec.error == "time limit 0.3 s reached after 0 simulations"
    assert len(rec.tree.children) == 3 and rec.stats["expansions"] == 1 and rec.tree.visit_count == 0
    assert 0.3 <= rec.global_search_time < 30


def test_errors_are_recorded_per_sample():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, counting_script(), fail_on_call=3)
    [rec] = run_search(MCTS(teacher, chat, config=MCTSConfig(simulations=5)), sample())
    assert rec.status == "error" and rec.error == "RuntimeError: engine died"
    assert len(rec.tree.children) == 3  # the expansion before the failure is kept
    # a reward that fails (a grounding judge without a box) and an image that does not exist
    [rec] = run_search(MCTS(ScriptedTeacher(chat, counting_script()), chat, config=MCTSConfig(simulations=2)),
                       sample(task="grounding", answer="(1, 2, 3, 4)"))
    assert rec.status == "error" and "Truth.box" in rec.error
    mcts = MCTS(ScriptedTeacher(chat, counting_script()), chat)
    rec = asyncio.run(mcts.search(sample(id_="missing")))
    assert rec.status == "error" and "FileNotFoundError" in rec.error and rec.id == "missing"


def test_many_trees_run_concurrently_and_async_rewards_work():
    chat = make_chat()
    teacher = ScriptedTeacher(chat, counting_script(), delay=0.01)
    seen = []

    async def critic(task, text, truth):  # the Critic deployment is async
        seen.append((task, truth.answer))
        await asyncio.sleep(0)
        return 1.0 if "red" in text else 0.0

    mcts = MCTS(teacher, chat, reward=critic, config=MCTSConfig(simulations=3, max_depth=3))
    records = run_search(mcts, *(sample(id_=f"s{i}") for i in range(6)))
    assert [r.id for r in records] == [f"s{i}" for i in range(6)] and all(r.status == "ok" for r in records)
    assert teacher.max_in_flight >= 6  # requests of different trees overlap, so the engine can batch them
    assert seen and all(s == ("visual_search", "red") for s in seen)
    # forced answers come only from n=1 rollout steps (k = 0: "red"), so every reward is 1
    assert all(r.tree.visit_count == r.stats["rollouts"] == 18 and r.tree.value == 1.0 for r in records)


def test_tree_record_round_trip_and_jsonl(tmp_path):
    chat = make_chat()
    [rec] = run_search(MCTS(ScriptedTeacher(chat, hand_script), chat, config=MCTSConfig(simulations=2)), sample())
    assert TreeRecord.model_validate_json(rec.model_dump_json()) == rec
    assert rec.model_size == (224, 224) and rec.original_size == (448, 448) and rec.image == "/data/s1.png"
    path = tmp_path / "trees.jsonl"
    path.write_text(rec.model_dump_json() + "\n")
    assert load_trees(path) == [rec]


ORIGINAL_LINE = {
    "question": "<image>\nWhich side is the cup on?", "image": "/abs/img.png", "true_answer": "left", "id": 17,
    "system_prompt": "sys", "global_search_time": 1260.5,
    "tree": {
        "thought_text": "<image>\nWhich side is the cup on?", "is_terminal": False, "value": 0.5, "visit_count": 2,
        "used_coords": [], "rollouts": [], "prior": 0.3,
        "children": [{
            "thought_text": "<think> The cup is at (12, 40). </think>", "is_terminal": False, "value": 0.5,
            "visit_count": 2, "used_coords": ["(12, 40)"], "children": [],
            "rollouts": [
                {"final_answer": "left", "reward": True, "ephemeral_texts": ["<image>\nWhich side is the cup on?",
                 "<think> The cup is at (12, 40). </think>", "<answer> left </answer>"], "ephemeral_depth": 2,
                 "depth": 1, "num_same_points": 0, "num_different_points": 1, "extra_field": "x"},
                {"final_answer": "right", "reward": 0, "ephemeral_texts": [], "ephemeral_depth": 2, "depth": 1,
                 "num_same_points": 0, "num_different_points": 1}]}],
    },
}


def test_reads_original_trees(tmp_path):
    rec = TreeRecord.from_original(json.loads(json.dumps(ORIGINAL_LINE)), task="spatial", source="sat2")
    assert rec.id == "17" and rec.images == ["/abs/img.png"] and rec.model_size is None
    assert rec.tree.metadata == {"prior": 0.3}
    child = rec.tree.children[0]
    assert [r.reward for r in child.rollouts] == [1.0, 0.0] and child.rollouts[0].metadata == {"extra_field": "x"}
    path = tmp_path / "rollouts_worker0_final.jsonl"
    path.write_text(json.dumps(ORIGINAL_LINE) + "\n" + json.dumps({"id": 18, "error": "timeout"}) + "\n")
    with pytest.raises(DataError, match="pass task="):
        load_trees(path)
    loaded = load_trees(path, task="spatial")
    assert loaded[0] == rec.model_copy(update={"source": "unknown"})
    assert (loaded[1].status, loaded[1].error, loaded[1].tree.children) == ("error", "timeout", [])
