"""Rollout driver on real vLLM (tiny model): token parity with the HF processor and an HF forward,
budgets, malformed tool calls, group sampling, weight updates."""


import pytest
import torch

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Sampling
from vigorl_core.rollout.planned import ANSWER_TURN, PlannedTurnsEngine
from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
from vigorl_core.synthetic.tasks import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokens.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def visual_search():
    return generate("visual_search", 8, seed=1)


class ForcedTurns(PlannedTurnsEngine):
    """Planned engine whose turn t is forced to regexes[t] (then answers)."""

    def __init__(self, engine, tokenizer, regexes):
        super().__init__(engine, tokenizer)
        self.regexes = regexes

    def regex_for(self, prompt_ids):
        turn, _, _ = self._turn_and_plan(prompt_ids)
        forced = super().regex_for(prompt_ids)
        if forced.startswith(" "):  # forced-final continuation
            return forced
        return self.regexes[turn] if turn < len(self.regexes) else ANSWER_TURN


def _rollouts(vllm_engine, engine, chat, config, data):
    driver = RolloutDriver(engine, chat, config)

    async def collect():
        return [r for group in [g async for g in driver.run([driver.prepare(s, [im]) for s, im in data])]
                for r in group]

    return vllm_engine.run(collect())


def _segments(rollout):
    """Split train_ids into (kind, ids) runs by loss mask: prompt/observation (0) and generated (1)."""
    rec = rollout.record
    runs, start = [], 0
    for i in range(1, len(rec.loss_mask) + 1):
        if i == len(rec.loss_mask) or rec.loss_mask[i] != rec.loss_mask[start]:
            runs.append((rec.loss_mask[start], rec.train_ids[start:i]))
            start = i
    return runs


def test_multiturn_parity_with_hf_processor_and_forward(vllm_engine, chat, processor, tiny_model_dir, visual_search):
    from transformers import AutoModelForImageTextToText

    engine = PlannedTurnsEngine(vllm_engine.engine, chat.tokenizer, max_zooms=4)
    config = RolloutConfig(mode="multiturn", group_size=2, seed=0, max_tokens_per_turn=96)
    rollouts = _rollouts(vllm_engine, engine, chat, config, visual_search)
    multi = [r for r in rollouts if len(r.images) >= 3]
    assert multi, "the plan gives some conversations several crops"
    assert {r.record.num_turns for r in rollouts} != {1}, "turn counts vary"
    tokenizer = processor.tokenizer
    for rollout in rollouts:
        rec = rollout.record
        assert rec.constrained_logprobs, "a grammar-constrained engine's log-probs are marked"
        assert len(rec.train_ids) == len(rec.loss_mask) == len(rec.logprobs)
        assert rec.has_logprobs is False and not any(rec.logprobs)  # not asked for (RolloutConfig.logprobs)
        # Per-image pad counts equal the processor's.
        grids = processor.image_processor(images=rollout.images, return_tensors="pt")["image_grid_thw"]
        assert rec.image_tokens == (grids.prod(-1) // 4).tolist()
        assert rec.train_ids.count(chat.image_pad_id) == sum(rec.image_tokens)
        assert rec.engine_ids.count(chat.image_pad_id) == len(rollout.images)
        assert chat.expand(rec.engine_ids, rollout.images) == rec.train_ids
        # Template and observation runs equal the processor's tokenization of the same text + images;
        # generated runs carry log-probs, masked runs carry none.
        image_iter = iter(rollout.images)
        for masked_in, ids in _segments(rollout):
            if masked_in:
                continue
            text = tokenizer.decode(ids, skip_special_tokens=False)
            images = [next(image_iter) for _ in range(text.count("<|vision_start|>"))]
            ref = processor(text=[_collapse_pads(text)], images=images or None, return_tensors="pt")
            assert ref["input_ids"][0].tolist() == ids
        assert rec.text.count("<observation>") == len(rollout.images) - 1 + rec.text.count("could not be executed")
    # The engine, given the finished conversation's engine_ids and images, expands them to exactly
    # train_ids, and an HF forward on train_ids reproduces its teacher-forced log-probs (fp32), crops included.
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    rollout = max(multi, key=lambda r: len(r.images))
    rec = rollout.record
    engine_ids, engine_lp = vllm_engine.run(vllm_engine.engine.score(rec.engine_ids, rollout.images))
    assert engine_ids == rec.train_ids
    hf = _hf_logprobs(model, processor, rec.train_ids, rollout.images, chat.image_pad_id)
    positions = [i for i, m in enumerate(rec.loss_mask) if m]
    assert max(abs(hf[i] - engine_lp[i]) for i in positions) < 2e-3


@pytest.mark.parametrize("grammar_tail", [True, False])
def test_free_thought_turns_on_real_vllm(vllm_engine, chat, visual_search, grammar_tail):
    """think_lengths (the scheduling benchmark's long tail of turn lengths): each turn opens with `<think> `, then
    exactly its planned number of letter tokens sampled under a logits mask (no grammar), then the tail grammar's
    point and zoom call or answer (or, grammar_tail=False, sampled point digits and the forced rest); every
    conversation answers, and token parity holds as for one-call turns."""
    import re

    engine = PlannedTurnsEngine(vllm_engine.engine, chat.tokenizer, max_zooms=2, think_lengths=(12,),
                                grammar_tail=grammar_tail)
    config = RolloutConfig(mode="multiturn", group_size=2, seed=0, max_tokens_per_turn=160)
    rollouts = _rollouts(vllm_engine, engine, chat, config, visual_search[:3])
    letters, opening = set(engine.letters), engine.think_open
    assert {r.record.num_turns for r in rollouts} != {1}, "some conversations zoom"
    for rollout in rollouts:
        rec = rollout.record
        assert rec.finish == "answer" and chat.expand(rec.engine_ids, rollout.images) == rec.train_ids
        turns = [ids for generated, ids in _segments(rollout) if generated]
        assert len(turns) == rec.num_turns
        for ids in turns:
            assert ids[:len(opening)] == opening and all(t in letters for t in ids[len(opening):len(opening) + 12])
            text = chat.tokenizer.decode(ids)
            assert re.match(r"<think> [a-z ]+ \(\d+, \d+\)\. </think>\n(<tool_call>|<answer>)", text), text


def _hf_logprobs(model, processor, train_ids, images, image_pad_id):
    """log p(train_ids[i] | train_ids[:i]) from an HF forward (index 0 is meaningless)."""
    pixels = processor.image_processor(images=images, return_tensors="pt")
    ids = torch.tensor([train_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"],
                       mm_token_type_ids=(ids == image_pad_id).long()).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return [0.0] + [logprobs[i - 1, train_ids[i]].item() for i in range(1, len(train_ids))]


def test_single_turn_sampling_logprobs_match_hf_forward(vllm_engine, chat, processor, tiny_model_dir):
    """Unconstrained sampling: the log-probs returned with each generated token are raw (before
    temperature and the vision-token bias) and match an HF forward on train_ids."""
    from transformers import AutoModelForImageTextToText

    data = generate("grounding", 2, seed=4)
    config = RolloutConfig(mode="grounded", group_size=3, seed=1, temperature=1.0, max_tokens_per_turn=24,
                           logprobs=True)
    rollouts = _rollouts(vllm_engine, vllm_engine.engine, chat, config, data)
    assert len(rollouts) == 6 and {r.record.group_index for r in rollouts} == {0, 1, 2}
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    for rollout in rollouts[:2]:
        rec = rollout.record
        assert rec.finish in ("length", "answer", "no_answer") and rec.num_turns == 1
        assert rec.constrained_logprobs is False and rec.has_logprobs
        hf = _hf_logprobs(model, processor, rec.train_ids, rollout.images, chat.image_pad_id)
        positions = [i for i, m in enumerate(rec.loss_mask) if m]
        assert positions and positions[0] == rec.prompt_len
        assert max(abs(hf[i] - rec.logprobs[i]) for i in positions) < 2e-3


def _collapse_pads(text):
    """Runs of expanded <|image_pad|> back to one per image, as a user would write the text."""
    import re

    return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text)


def test_conversation_pieces_equal_the_chat_template(chat, processor):
    """prompt + assistant turn + <|im_end|> + observation (+ forced prefix) is exactly what the model's chat
    template renders for the same messages, so SFT data, RL rollouts and serving share one convention."""
    from vigorl_core.prompts import observation_text
    from vigorl_core.protocol import FORCED_FINAL_PREFIX, render_turn

    turn1 = render_turn("The target is near (30, 40).", tool_call=(30, 40))
    turn2 = " red </answer>"
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": turn1},
        {"role": "user", "content": [{"type": "text", "text": observation_text(True)}, {"type": "image"},
                                     {"type": "text", "text": "\n</observation>"}]},
        {"role": "assistant", "content": FORCED_FINAL_PREFIX + turn2},
    ]
    rendered = processor.apply_chat_template(messages)
    ours = (chat.prompt_text("SYS", "Q?", 1) + turn1 + "<|im_end|>" + chat.observation_text(True)
            + FORCED_FINAL_PREFIX + turn2 + "<|im_end|>\n")
    assert ours == rendered


ZOOM = (r'<think> [a-z ]{4,20} \((?:0|[1-9]\d{0,2}), (?:0|[1-9]\d{0,2})\)\. </think>\n<tool_call>\n'
        r'\{"name": "search_coordinate", "arguments": \{"coordinate": \[COORD\]\}\}\n</tool_call>')


def _zoom_at(coord: str) -> str:
    return ZOOM.replace("COORD", coord)


def _one(vllm_engine, chat, regexes, data, **config):
    engine = ForcedTurns(vllm_engine.engine, chat.tokenizer, regexes)
    config = RolloutConfig(mode="multiturn", seed=0, max_tokens_per_turn=96, **config)
    return _rollouts(vllm_engine, engine, chat, config, data)


def test_image_budget_forces_the_final_answer(vllm_engine, chat, visual_search):
    zooms = [_zoom_at(r"1\d, 2\d"), _zoom_at(r"5\d, 6\d"), _zoom_at(r"9\d, 9\d"), _zoom_at(r"3\d, 3\d")]
    [rollout] = _one(vllm_engine, chat, zooms, visual_search[:1], max_images=3)
    rec = rollout.record
    assert len(rollout.images) == 3  # original + 2 crops, then the forced final answer
    assert rec.text.count("<tool_call>") == 2
    assert "I'll now provide my final answer. </think>\n<answer>" in rec.text and rec.finish == "answer"
    assert rec.trace.answer and rec.num_turns == 3
    # The forced prefix and the observations are masked: only generated tokens carry loss.
    forced = chat.forced_final_ids
    start = next(i for i in range(len(rec.train_ids)) if rec.train_ids[i:i + len(forced)] == forced)
    assert set(rec.loss_mask[start:start + len(forced)]) == {0}
    assert rec.reward is not None and rec.reward_details["unique_points"] == 2, rec.text


def test_turn_budget_and_response_budget(vllm_engine, chat, visual_search):
    zooms = [_zoom_at(r"1\d, 2\d")] * 6
    [rollout] = _one(vllm_engine, chat, zooms, visual_search[:1], max_turns=2)
    assert rollout.record.num_turns == 2 and len(rollout.images) == 2
    assert "final answer. </think>\n<answer>" in rollout.record.text
    [rollout] = _one(vllm_engine, chat, zooms, visual_search[:1], max_response_tokens=120)
    rec = rollout.record
    assert rec.finish == "response_budget"
    assert len(rec.train_ids) - rec.prompt_len <= 120


def test_malformed_and_out_of_image_tool_calls_are_handled(vllm_engine, chat, visual_search):
    bad_json = (r'<think> [a-z ]{4,10} \(1, 2\)\. </think>\n<tool_call>\n'
                r'\{"name": "search_coordinate", "arguments": \{"coordinate": \[5\]\}\}\n</tool_call>')
    [rollout] = _one(vllm_engine, chat, [bad_json, _zoom_at("900, 950")], visual_search[:1])
    rec = rollout.record
    assert "The tool call could not be executed" in rec.text
    assert len(rollout.images) == 2  # the malformed call cut no crop; the out-of-image one was clamped
    assert any("outside the 224x224 image, clamped to [223, 223]" in e for e in rec.trace.errors)
    assert rec.trace.tool_calls[0].error and rec.trace.tool_calls[1].coordinate == (900, 950)
    assert rec.finish == "answer" and rec.num_turns == 3


def test_weight_update_changes_outputs_and_bumps_the_version(vllm_engine, tiny_model_dir, processor):
    """Load other weights into the running engine: greedy output changes, equals HF greedy with those
    weights for a prompt already in the prefix cache, and every generation is labelled with the version of
    the weights it ran on, also when it arrived during the update; then restore."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    engine = vllm_engine.engine
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True)
    ids = processor.tokenizer(text)["input_ids"]
    image = Image.new("RGB", (112, 112), (250, 200, 0))
    greedy = Sampling(max_tokens=10, temperature=0)
    [before] = vllm_engine.run(engine.generate(ids, [image], greedy))
    version = engine.version
    torch.manual_seed(7)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}

    async def update_during_generation():
        """A request admitted before the update runs on the old weights; one that arrives while the update
        waits for it is held at the gate, runs on the new weights and says so."""
        import asyncio

        long_one = asyncio.ensure_future(engine.generate(ids, [image], Sampling(max_tokens=200, temperature=0)))
        await asyncio.sleep(0.05)
        update = asyncio.ensure_future(engine.update_weights(perturbed, version=version + 1))
        while engine._open.is_set():  # the update has written its weights file and closed the gate
            await asyncio.sleep(0.001)
        during = asyncio.ensure_future(engine.generate(ids, [image], greedy))
        return await long_one, await update, await during

    [old_run], new_version, [during] = vllm_engine.run(update_during_generation())
    assert new_version == version + 1 and old_run.policy_version == version
    try:
        [after] = vllm_engine.run(engine.generate(ids, [image], greedy))
        assert after.policy_version == version + 1 and before.policy_version == version
        assert during.policy_version == version + 1 and during.token_ids == after.token_ids
        assert after.token_ids != before.token_ids
        model.load_state_dict(perturbed)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        hf = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert hf.tolist() == after.token_ids
    finally:
        vllm_engine.run(engine.update_weights(original, version=version + 2))
    [restored] = vllm_engine.run(engine.generate(ids, [image], greedy))
    assert restored.token_ids == before.token_ids and engine.version == version + 2
