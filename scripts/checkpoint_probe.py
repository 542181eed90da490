"""Diagnostic: does a checkpoint read the image? Scores a model folder on a `colour` samples file without Ray or vLLM.

Two measures on the first N samples (synthetic `colour` samples.jsonl: question, options, answer, bbox, point):
- `generate`: greedy transformers generation under the grounded system prompt with the options in the question;
  prints accuracy, format (an <answer> block) and how many answers put every point inside the square;
- `base`: the base model's two skills (vigorl_core.synthetic.base) under its own system prompt: the first point
  it names after the question and options (inside the square?) and "What is the colour of the square?" (the
  exact colour);
- `crops` (on `zoom_colour` samples): the colour of the small square in the crop of its named quadrant, shown as
  the zoom tool's observation under the base's system prompt, answered as a zoom conversation's last turn (how
  the base data teaches it and where the zoom chains need it);
- `options`: teacher forcing. Each option is scored as the answer after one fixed thought that names the square's
  centre, and the most likely option is the prediction. This separates "reads the colour" from "writes its own
  chain", and the spread of predictions shows a model that answers one colour for every image.

    .venv/bin/python scripts/checkpoint_probe.py generate runs/sft/quickstart-s12/latest \\
        runs/data/quickstart-s12/colour-heldout/samples.jsonl
    .venv/bin/python scripts/checkpoint_probe.py base runs/sft/quickstart-s16a-base/best \\
        runs/data/quickstart-s16a/colour-heldout/samples.jsonl
    .venv/bin/python scripts/checkpoint_probe.py crops runs/sft/quickstart-s16a-base/best \\
        runs/data/quickstart-s16a/zoom_colour-heldout/samples.jsonl
    .venv/bin/python scripts/checkpoint_probe.py options runs/sft/quickstart-s12/latest \\
        runs/data/quickstart-s12/colour-heldout/samples.jsonl --system short

docs/tiny_learning.md (sixth round) has what it measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHORT_SYSTEM = "Point to the element. Answer (x, y)."


def _question(rec: dict, with_options: bool) -> str:
    from vigorl_core.prompts import user_text

    return user_text(rec["question"], rec["options"] if with_options else ())


def _in_box(points: list[tuple[int, int]], box: list[float]) -> bool:
    return bool(points) and all(box[0] <= x < box[2] and box[1] <= y < box[3] for x, y in points)


def _load(model_dir: str):
    """(processor, model) for greedy generation: fp32, left padding."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    return proc, AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def _greedy(args, loaded, system: str, records: list[dict], question) -> list[str]:
    """Greedy transformers generation for each record: `question(record)` under `system`, with its image."""
    import torch
    from PIL import Image

    proc, model = loaded
    texts = []
    for start in range(0, len(records), 16):
        part = records[start:start + 16]
        prompts = [proc.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": question(r)}]}], tokenize=False, add_generation_prompt=True)
            for r in part]
        images = [[Image.open(Path(args.samples).parent / r["images"][0]).convert("RGB")] for r in part]
        enc = proc(text=prompts, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_tokens, do_sample=False)
        texts += [proc.tokenizer.decode(ids[enc.input_ids.shape[1]:], skip_special_tokens=True) for ids in out]
    return texts


def _points(text: str) -> list[tuple[int, int]]:
    return [(int(x), int(y)) for x, y in re.findall(r"\((\d+), (\d+)\)", text)]


def generate(args, system: str, records: list[dict]) -> None:
    hits = formatted = grounded = 0
    texts = _greedy(args, _load(args.model), system, records, lambda r: _question(r, not args.no_options))
    for rec, text in zip(records, texts):
        answer = re.search(r"<answer>\s*(.*?)\s*</answer>", text)
        formatted += bool(answer)
        hits += bool(answer) and answer.group(1) == rec["answer"]
        grounded += _in_box(_points(text), rec["bbox"])
    n = len(records)
    print(json.dumps({"model": args.model, "n": n, "accuracy": hits / n, "format": formatted / n,
                      "all_points_in_box": grounded / n, "last_output": texts[-1][:160]}))


def base(args, _system: str, records: list[dict]) -> None:
    from vigorl_core.synthetic.base import BASE_SYSTEM, COLOUR_QUESTION

    loaded = _load(args.model)
    points = _greedy(args, loaded, BASE_SYSTEM, records, lambda r: _question(r, True))
    colours = _greedy(args, loaded, BASE_SYSTEM, records, lambda r: COLOUR_QUESTION)
    n = len(records)
    pointed = sum(_in_box(_points(t)[:1], r["bbox"]) for r, t in zip(records, points))
    print(json.dumps({"model": args.model, "n": n, "first_point_in_box": pointed / n,
                      "colour_accuracy": sum(t.strip() == r["answer"] for r, t in zip(records, colours)) / n,
                      "last_outputs": [points[-1][:40], colours[-1][:40]]}))


def crops(args, _system: str, records: list[dict]) -> None:
    import torch
    from PIL import Image

    from vigorl_core.frames import get_profile, resize_to_model
    from vigorl_core.prompts import observation_text
    from vigorl_core.records import Sample
    from vigorl_core.synthetic.base import BASE_SYSTEM
    from vigorl_core.synthetic.chains import quadrant_point
    from vigorl_core.zoom import OBSERVATION_TAIL, point_crop, zoom_settings

    proc, model = _load(args.model)
    settings, profile = zoom_settings("visual_search", "tiny"), get_profile("tiny")
    texts = []
    for rec in records:
        image = Image.open(Path(args.samples).parent / rec["images"][0]).convert("RGB")
        model_image, frame = resize_to_model(image, profile)
        crop = point_crop(model_image, *quadrant_point(Sample.model_validate(rec), image.size, frame), settings)
        prompt = proc.apply_chat_template([{"role": "system", "content": BASE_SYSTEM}, {"role": "user", "content": [
            {"type": "text", "text": observation_text(settings.draw_dot)}, {"type": "image"},
            {"type": "text", "text": OBSERVATION_TAIL}]}], tokenize=False, add_generation_prompt=True)
        enc = proc(text=[prompt], images=[[crop.image]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_tokens, do_sample=False)
        texts.append(proc.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    answers = [re.search(r"<answer>\s*(.*?)\s*</answer>", t) for t in texts]
    n = len(records)
    print(json.dumps({"model": args.model, "n": n, "format": sum(bool(a) for a in answers) / n,
                      "accuracy": sum(bool(a) and a.group(1) == r["answer"] for a, r in zip(answers, records)) / n,
                      "last_output": texts[-1][:60]}))


def options(args, system: str, records: list[dict]) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.train.sft_data import Conversation, SFTDataset, collate, encode_conversation

    chat = ChatTokens.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    answer_tag = chat.encode("<answer>")
    hits, predictions = 0, collections.Counter()
    for rec in records:
        image = str(Path(args.samples).parent / rec["images"][0])
        x, y = (int(v) for v in rec["point"])
        items, spans = [], []
        for option in rec["options"]:
            chain = f"<think>\nThe square is at ({x}, {y}).\n</think>\n<answer> {option} </answer>"
            conv = Conversation(id=rec["id"], messages=[("system", system), ("user", "<image>" + _question(
                rec, not args.no_options)), ("assistant", chain)], images=[image], task="visual_search")
            example = encode_conversation(conv, chat)
            ids = example.input_ids.tolist()
            start = max(i for i in range(len(ids) - len(answer_tag)) if ids[i:i + len(answer_tag)] == answer_tag)
            start += len(answer_tag)
            spans.append((start, start + len(chat.encode(f" {option} ")), ids))
            items.append(SFTDataset([example], processor.image_processor, chat.profile)[0])
        batch = collate(items, 0, chat.image_pad_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"]).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        scores = {option: sum(logprobs[k, i - 1, ids[i]].item() for i in range(s, e))
                  for k, (option, (s, e, ids)) in enumerate(zip(rec["options"], spans))}
        best = max(scores, key=scores.get)
        predictions[best] += 1
        hits += best == rec["answer"]
    print(json.dumps({"model": args.model, "n": len(records), "accuracy": hits / len(records),
                      "predictions": dict(predictions.most_common())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=["generate", "options", "base", "crops"])
    parser.add_argument("model", help="model folder (a checkpoint's latest/)")
    parser.add_argument("samples", help="synthetic colour samples.jsonl (crops: zoom_colour)")
    parser.add_argument("--n", type=int, default=64, help="first N samples")
    parser.add_argument("--system", choices=["full", "short"], default="full",
                        help="the project's grounded visual-search prompt, or a one-line one (the plain loop's)")
    parser.add_argument("--no_options", action="store_true", help="leave the options out of the question")
    parser.add_argument("--max_tokens", type=int, default=120, help="generate: new tokens per answer")
    args = parser.parse_args()
    from vigorl_core.prompts import system_prompt

    system = system_prompt("visual_search", "grounded") if args.system == "full" else SHORT_SYSTEM
    records = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()][:args.n]
    {"generate": generate, "options": options, "base": base, "crops": crops}[args.measure](args, system, records)


if __name__ == "__main__":
    main()
