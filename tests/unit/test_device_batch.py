"""A training batch without host waits (vigorl_core.train.device_batch): the grid stays on the host, the model gets
no attention mask and gives the same logits for every real token of a right-padded batch, and the asynchronous
placeholder check gives transformers' masks and still fails on a mismatch. Tiny model, on CPU."""

from __future__ import annotations

import pytest
import torch

from vigorl_core.train.device_batch import check_placeholders_async, model_inputs, to_device
from vigorl_core.train.sft_data import SFTDataset, collate, encode_conversation, read_conversations
from vigorl_core.train.sft_train import deepspeed_config, prepare_for_training


@pytest.fixture(scope="module")
def padded_batch(tiny_model_dir, tmp_path_factory):
    """Two chains of different lengths (a grounding and a visual-search chain), collated: one row is padded."""
    from transformers import AutoProcessor

    from vigorl_core.prompts import system_prompt
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.synthetic.chains import write_synthetic_chains

    chat = ChatTokens.from_pretrained(tiny_model_dir)
    path = write_synthetic_chains(tmp_path_factory.mktemp("chains"), 1, 0, chat.profile)
    convs = read_conversations(path)
    examples = [encode_conversation(c, chat, system_prompt(c.task, "grounded")) for c in convs]
    assert len({e.length for e in examples}) == 2
    data = SFTDataset(examples, AutoProcessor.from_pretrained(tiny_model_dir).image_processor, chat.profile)
    return collate([data[0], data[1]], pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id)


def test_to_device_leaves_the_grid_on_the_host(padded_batch):
    moved = to_device(padded_batch, "meta")
    assert moved["image_grid_thw"] is padded_batch["image_grid_thw"]
    assert all(v.device.type == "meta" for k, v in moved.items() if k != "image_grid_thw")
    assert set(model_inputs(moved)) == set(moved) - {"labels", "loss_positions", "attention_mask"}


def test_no_attention_mask_gives_every_real_token_the_same_logits(padded_batch, tiny_model_dir):
    """Right padding under causal attention: no real token sees a pad, so the mask changes no real token's logits
    (the prepared model, with its placeholder check and batched tower, as the trainers run it)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    prepare_for_training(model)
    mask = padded_batch["attention_mask"].bool()
    assert not mask.all()  # one row is padded
    with torch.no_grad():
        inputs = model_inputs(padded_batch)
        masked = model(**inputs, attention_mask=padded_batch["attention_mask"]).logits
        unmasked = model(**inputs).logits
    assert torch.allclose(masked[mask], unmasked[mask], atol=1e-5)


def test_async_placeholder_check_gives_the_same_masks_and_fails_on_a_mismatch(padded_batch, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    ids = padded_batch["input_ids"]
    embeds = model.model.get_input_embeddings()(ids)
    tokens = int((ids == model.config.image_token_id).sum())
    features = torch.zeros(tokens, embeds.shape[-1])
    want = model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    assert check_placeholders_async(model)
    got = model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(RuntimeError, match="image features and image tokens do not match"):
        model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features[1:])
    assert not check_placeholders_async(torch.nn.Linear(2, 2))


def test_deepspeed_throughput_timer_is_off():
    """It would synchronize the device at every forward and step()."""
    assert deepspeed_config(2, 2, 8, 1, True, 1.0, gpu=True)["timers"] == {"throughput": {"enabled": False}}
