"""SFT data and training helpers (vigorl_core.train.sft_data, sft_train): the loss mask of a multi-turn chain with
crops, parity with the rollout driver's token layout and the HF processor, record errors, batching,
collate, schedule, loss and checkpoint helpers. Runs on the tiny model's tokenizer and processor."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.data import DataError
from vigorl_core.frames import resize_to_model
from vigorl_core.prompts import observation_text, system_prompt, user_text
from vigorl_core.protocol import render_single_turn, render_turn
from vigorl_core.train.sft_data import (
    IGNORE_INDEX,
    BatchPlan,
    SFTDataset,
    collate,
    conversation_mode,
    encode_conversation,
    eval_batches,
    read_conversations,
)
from vigorl_core.synthetic.chains import write_synthetic_chains
from vigorl_core.train.sft_train import (
    chat_template_with_system,
    cosine_lr,
    deepspeed_config,
    exact_matches,
    loss_positions,
    point_latest,
    prepare_for_training,
    token_nll,
    truncate_log,
)
from vigorl_core.zoom import OBSERVATION_TAIL, point_crop, zoom_settings


@pytest.fixture(scope="module")
def chat(tiny_model_dir) -> ChatTokens:
    return ChatTokens.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _png(path: Path, size=(448, 448), colour=(200, 200, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


TURN_1 = render_turn("The sign may say it; I zoom in at (60, 40).", tool_call=(60, 40))
TURN_2 = render_turn("Zooming again near the door at (150, 170).", tool_call=(150, 170))
TURN_3 = render_turn("Both crops show a red sign.", answer="red")
QUESTION = user_text("What colour is the sign?", ["red", "blue"])


@pytest.fixture
def multiturn(tmp_path, chat):
    """A two-zoom chain: original 448x448 image (224x224 in the tiny model frame) plus two real crops."""
    original = _png(tmp_path / "img" / "scene.png")
    model_image, _ = resize_to_model(Image.open(original), chat.profile)
    settings = zoom_settings("visual_search", "tiny")
    crops = []
    for i, (x, y) in enumerate([(60, 40), (150, 170)]):
        crops.append(tmp_path / "img" / f"crop{i}.png")
        point_crop(model_image, x, y, settings).image.save(crops[-1])
    obs = observation_text(settings.draw_dot) + "<image>" + OBSERVATION_TAIL
    record = {"id": "mt-1", "task": "visual_search", "images": ["img/scene.png", "img/crop0.png", "img/crop1.png"],
              "messages": [{"role": "system", "content": "old prompt"},
                           {"role": "user", "content": "<image>" + QUESTION},
                           {"role": "assistant", "content": TURN_1}, {"role": "user", "content": obs},
                           {"role": "assistant", "content": TURN_2}, {"role": "user", "content": obs},
                           {"role": "assistant", "content": TURN_3}]}
    path = tmp_path / "chains.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [conv] = read_conversations(path)
    return conv, [model_image] + [Image.open(c) for c in crops], settings


def test_multiturn_mask_only_assistant_tokens_carry_loss(multiturn, chat, processor):
    conv, images, settings = multiturn
    system = system_prompt("visual_search", conversation_mode(conv))
    ex = encode_conversation(conv, chat, system)
    assert conversation_mode(conv) == "multiturn" and ex.image_tokens == [64, 16, 16]
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()

    # The same ids the rollout driver builds: prompt, generated turns, observation turns (chat_tokens.py).
    im_end = chat.im_end_id
    observation = chat.encode(chat.observation_text(settings.draw_dot))
    pieces = [(chat.encode(chat.prompt_text(system, QUESTION, 1)), False),
              (chat.encode(TURN_1) + [im_end], True), (observation, False),
              (chat.encode(TURN_2) + [im_end], True), (observation, False),
              (chat.encode(TURN_3) + [im_end], True), (chat.encode("\n"), False)]
    engine_ids = [t for piece, _ in pieces for t in piece]
    assert ids == chat.expand(engine_ids, images)
    expected, remaining = [], list(images)
    for piece, in_loss in pieces:
        n = piece.count(chat.image_pad_id)
        expanded, remaining = chat.expand(piece, remaining[:n]), remaining[n:]
        expected += expanded if in_loss else [IGNORE_INDEX] * len(expanded)
    assert labels == expected

    # Labelled tokens are exactly the three assistant turns, each with its <|im_end|>, in three runs.
    labelled = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert chat.decode(labelled) == f"{TURN_1}<|im_end|>{TURN_2}<|im_end|>{TURN_3}<|im_end|>"
    runs = sum(1 for i, label in enumerate(labels)
               if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
    assert runs == 3
    masked_ids = {t for t, label in zip(ids, labels) if label == IGNORE_INDEX}
    for token in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>"):
        assert chat.tokenizer.convert_tokens_to_ids(token) in masked_ids
        assert chat.tokenizer.convert_tokens_to_ids(token) not in labelled
    obs_text = observation_text(settings.draw_dot)
    assert obs_text.strip() not in chat.decode(labelled) and "system" not in chat.decode(labelled)
    assert "old prompt" not in chat.decode(ids)  # replaced by the project's prompt

    # Parity with the HF processor on the same text and images: ids and per-image pad counts.
    text = chat.decode(engine_ids)
    hf = processor(text=[text], images=[resize_to_model(Image.open(p), chat.profile)[0] for p in conv.images],
                   return_tensors="pt")
    assert hf["input_ids"][0].tolist() == ids


def test_dataset_and_collate_feed_the_model(multiturn, chat, processor, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    conv, _, _ = multiturn
    ex = encode_conversation(conv, chat, system_prompt("visual_search", "multiturn"))
    single = write_synthetic_chains(Path(conv.images[0]).parent.parent / "synth", 1, 0, chat.profile, ("grounding",))
    ex2 = encode_conversation(read_conversations(single)[0], chat, system_prompt("grounding", "grounded"))
    data = SFTDataset([ex, ex2], processor.image_processor, chat.profile)
    batch = collate([data[1], data[0]], pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id)
    width = max(ex.length, ex2.length)
    assert batch["input_ids"].shape == (2, width) and batch["attention_mask"][0].sum() == ex2.length
    assert (batch["labels"][0, ex2.length:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, ex2.length:] == chat.tokenizer.pad_token_id).all()
    assert batch["mm_token_type_ids"].sum() == sum(ex.image_tokens) + sum(ex2.image_tokens)
    assert batch["image_grid_thw"].shape == (4, 3)  # grounding image, then the chain's three images
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()

    # The positions computed while collating are the model's own: its rotary positions (two rows of different
    # lengths, four images) and the columns whose next token is labelled.
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    assert torch.equal(batch["position_ids"], want)
    positions = loss_positions(batch["labels"])
    assert torch.equal(batch["loss_positions"], positions)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_positions")}
    without = {k: v for k, v in inputs.items() if k != "position_ids"}
    assert torch.allclose(model(**inputs).logits, model(**without).logits, atol=1e-6)

    # The loss on kept positions equals the model's own mean loss over the same labels.
    nll, count = token_nll(model(**inputs, logits_to_keep=positions).logits, batch["labels"], positions)
    full = model(**inputs, labels=batch["labels"]).loss
    assert count == ex.label_tokens + ex2.label_tokens
    assert torch.allclose(nll / count, full, atol=1e-5)
    nll.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_frozen_vision_tower_stays_out_of_autograd_with_checkpointing(multiturn, chat, processor, tiny_model_dir):
    """transformers' gradient checkpointing makes the patch embedding's output require grad; with the tower
    frozen that would recompute and backpropagate every ViT block (most of a 3B step on GPU)."""
    from transformers import AutoModelForImageTextToText

    conv, _, _ = multiturn
    ex = encode_conversation(conv, chat, system_prompt("visual_search", "multiturn"))
    batch = collate([SFTDataset([ex], processor.image_processor, chat.profile)[0]],
                    pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    trainable = prepare_for_training(model, gradient_checkpointing=True)
    model.train()
    block_inputs = []
    model.model.visual.blocks[0].register_forward_hook(lambda m, args, out: block_inputs.append(args[0].requires_grad))
    positions = batch["loss_positions"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_positions")}
    nll, _ = token_nll(model(**inputs, logits_to_keep=positions).logits, batch["labels"], positions)
    nll.backward()
    visual = model.model.visual
    assert block_inputs == [False]
    assert all(p.grad is None for p in visual.blocks.parameters()) and visual.patch_embed.proj.weight.grad is None
    assert all(p.grad is not None for p in visual.merger.parameters())
    assert model.model.language_model.embed_tokens.weight.grad is not None
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in visual.blocks.parameters())


def _write(tmp_path: Path, records, name="c.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(**kw):
    rec = {"messages": [{"role": "user", "content": "<image>Where?"},
                        {"role": "assistant", "content": "<answer> x </answer>"}],
           "images": ["a.png"]}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("record, field, reason", [
    (_rec(messages=[{"role": "user", "content": "<image>q"}, {"role": "robot", "content": "a"}]),
     "messages[1].role", "expected one of system, user, assistant"),
    (_rec(messages=[{"role": "user", "content": "<image>q"}, {"role": "user", "content": "q"}]),
     "messages[1].role", "expected 'assistant'"),
    (_rec(messages=[{"role": "user", "content": "<image>q"}]), "messages", "ending with an assistant turn"),
    (_rec(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}]),
     "messages[1].content", "<image> may only appear in user messages"),
    (_rec(messages=[{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]),
     "messages[0].content", "expected a string, got int"),
    (_rec(images=["a.png", "a.png"]), "images", "1 <image> placeholders but the record lists 2 images"),
    (_rec(images=["missing.png"]), "images", "1 image file(s) not found"),
    (_rec(task="cooking"), "task", "expected one of"),
    ({"problem": "q", "answer": "a"}, "messages", "missing; expected sharegpt records"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, field, reason):
    _png(tmp_path / "a.png", (32, 32))
    path = _write(tmp_path, [_rec(), record])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)
    assert reason in err.value.reason


def test_original_json_array_without_placeholders_and_data_root(tmp_path, chat):
    _png(tmp_path / "root" / "imgs" / "a.png", (56, 56))
    chain = render_single_turn(["The cup is at (10, 20)."], "cup")
    records = [{"id": "0_1", "metadata": {}, "gt_answer": "cup", "images": ["imgs/a.png"],
                "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Find the cup."},
                             {"role": "assistant", "content": chain}]}]
    path = tmp_path / "data" / "osatlas_train_MCTS_linearized_chains.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records, indent=2))
    [conv] = read_conversations(path, data_root=tmp_path / "root")
    assert conv.messages[1] == ("user", "<image>Find the cup.") and conv.id == "0_1" and conv.task is None
    assert conv.images == [str(tmp_path / "root" / "imgs" / "a.png")]
    kept = encode_conversation(conv, chat, "ours", replace_system=False)
    assert "<|im_start|>system\nsys<|im_end|>" in chat.decode(kept.input_ids.tolist())
    replaced = encode_conversation(conv, chat, "ours")
    assert "<|im_start|>system\nours<|im_end|>" in chat.decode(replaced.input_ids.tolist())
    assert replaced.image_tokens == [4]


def test_batch_plan_is_length_grouped_disjoint_and_resumable():
    lengths = [10 + (i * 37) % 500 for i in range(100)]
    plan = BatchPlan(lengths, global_batch=8, micro_batch=2, world_size=2, seed=3, group_batches=4)
    assert (plan.accumulation, plan.steps_per_epoch) == (2, 12)
    epoch = [plan.step_batch(s) for s in range(12)]
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == 96
    for batch in epoch:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        ranks = [plan.micro_batches(epoch.index(batch), r) for r in range(2)]
        assert sorted(i for r in ranks for mb in r for i in mb) == sorted(batch)
        assert all(len(r) == 2 and all(len(mb) == 2 for mb in r) for r in ranks)
    # Grouping: a global batch spans far less of the length range than a random batch would.
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch])
    assert spread < 0.5 * (max(lengths) - min(lengths))
    assert plan.step_batch(12) != plan.step_batch(0)  # the next epoch reshuffles
    again = BatchPlan(lengths, global_batch=8, micro_batch=2, world_size=2, seed=3, group_batches=4)
    assert again.rank_batches(1, 0, 20)[10:] == plan.rank_batches(1, 5, 20)  # resume: no step repeated
    with pytest.raises(ValueError, match="multiple of micro_batch_size x workers"):
        BatchPlan(lengths, global_batch=6, micro_batch=2, world_size=2)


def test_eval_batches_give_every_rank_the_same_number_of_passes():
    lengths = list(range(11))
    per_rank = [eval_batches(lengths, micro_batch=2, world_size=4, rank=r) for r in range(4)]
    assert {len(b) for b in per_rank} == {2}
    counted = sorted(i for b in per_rank for idx, ok in b if ok for i in idx)
    assert counted == list(range(11))


def test_exact_matches_says_which_rows_greedy_decoding_reproduces():
    """Row 0: both labelled tokens are the argmax; row 1: its second one is not; row 2 has no labels."""
    import torch

    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 2:4] = torch.tensor([1, 2])
    labels[1, 2:4] = torch.tensor([1, 3])
    positions = loss_positions(labels)  # columns 1 and 2 predict columns 2 and 3
    assert positions.tolist() == [1, 2]
    logits = torch.zeros(3, 2, 4)
    logits[:, 0, 1] = 1.0  # every row's first kept position prefers token 1
    logits[:, 1, 2] = 1.0  # and its second token 2
    assert exact_matches(logits, labels, positions).tolist() == [1, 0, -1]


def test_cosine_schedule():
    lrs = [cosine_lr(s, 100, 1e-3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and 0 < lrs[-1] < 1e-5
    assert cosine_lr(99, 100, 1e-3, 0.0, min_lr_ratio=0.1) > 1e-4 and cosine_lr(0, 100, 1e-3, 0.0) == 1e-3


def test_deepspeed_config_batch_arithmetic():
    ds = deepspeed_config(3, micro_batch=1, accumulation=4, world_size=8, bf16=True, max_grad_norm=1.0, gpu=True)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] and ds["bf16"]["enabled"]
    assert not deepspeed_config(2, 2, 2, 2, False, 1.0)["zero_optimization"]["overlap_comm"]


def test_chat_template_carries_the_task_prompt(processor):
    prompt = system_prompt("visual_search", "multiturn")
    assert '{"name": "search_coordinate"' in prompt  # braces survive the Jinja raw block
    template = chat_template_with_system(processor.chat_template, prompt)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    text = processor.tokenizer.apply_chat_template(user, chat_template=template, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\n")
    given = processor.tokenizer.apply_chat_template([{"role": "system", "content": "S"}] + user,
                                                    chat_template=template, tokenize=False)
    assert given.startswith("<|im_start|>system\nS<|im_end|>") and prompt not in given
    grounded = system_prompt("visual_search", "grounded")  # SFT of a fine-tuned checkpoint replaces its prompt
    again = processor.tokenizer.apply_chat_template(user, chat_template=chat_template_with_system(template, grounded),
                                                    tokenize=False)
    assert again.startswith(f"<|im_start|>system\n{grounded}<|im_end|>\n<|im_start|>user\n") and prompt not in again
    with pytest.raises(ValueError, match="no default system message"):
        chat_template_with_system(processor.chat_template.replace("You are a helpful assistant.", "X"), prompt)


def test_latest_pointer_and_log_truncation(tmp_path):
    for step in (5, 10):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        point_latest(tmp_path, tmp_path / "checkpoints" / f"step-{step}")
    assert (tmp_path / "latest").resolve() == (tmp_path / "checkpoints" / "step-10").resolve()
    assert str((tmp_path / "latest").readlink()) == "checkpoints/step-10"
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in
                           [{"event": "start", "step": 0}] + [{"step": s, "loss": 1.0} for s in range(1, 8)]))
    assert truncate_log(log, 5) == 6
    assert [json.loads(x).get("step") for x in log.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    superseded = (tmp_path / "log.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in superseded] == [6, 7]
