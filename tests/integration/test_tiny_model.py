"""The `vigorl tiny` folder loads with the stock transformers Auto classes and in vLLM, and generates."""

import hashlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vigorl_core.rollout.engine import Sampling

pytestmark = pytest.mark.slow


def _prompt(processor, question="What is the colour of the small circle?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_folder_loads_with_auto_classes_and_generates_with_an_image(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    tokenizer = processor.tokenizer
    for token in ("<tool_call>", "</tool_call>", "<|image_pad|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    image = Image.new("RGB", (300, 200), (200, 30, 30))  # resized by the processor to 252x168
    inputs = processor(text=[_prompt(processor)], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 18]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 12 * 18 // 4
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 12
    # The image matters: another image gives other logits.
    other = processor(text=[_prompt(processor)], images=[Image.new("RGB", (300, 200), (0, 0, 255))],
                      return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0, -1], model(**other).logits[0, -1])


def test_vllm_generates_with_an_image_and_matches_hf_greedy(tiny_model_dir, vllm_engine):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    image = Image.new("RGB", (224, 168), (30, 160, 60))  # already a model-frame size
    text = _prompt(processor)
    ids = processor.tokenizer(text)["input_ids"]  # one <|image_pad|>: vLLM expands it
    [gen] = vllm_engine.run(vllm_engine.engine.generate(ids, [image], Sampling(max_tokens=12, temperature=0)))
    assert len(gen.token_ids) == 12 and len(gen.logprobs) == 12 and gen.finish_reason == "length"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    hf = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert hf.tolist() == gen.token_ids


def test_build_is_deterministic(tmp_path, tiny_model_dir, subprocess_env):
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "jobs.tiny", "--out", str(out)], check=True, env=subprocess_env,
                   capture_output=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        first = (tiny_model_dir / name).read_bytes()
        assert hashlib.sha256(first).digest() == hashlib.sha256((out / name).read_bytes()).digest(), name
