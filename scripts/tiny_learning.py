"""Diagnostic: does the tiny Qwen2.5-VL learn to read an image? A plain transformers SFT loop, no Ray, no vLLM.

The quickstart needs the tiny model to learn its synthetic tasks on 2 CPU cores. This script isolates the visual
part from the pipeline: 112-px images with coloured squares, fresh samples every step, greedy evaluation on 64
held-out images every 100 steps (one JSON line each), and linear probes of the untrained model.

    .venv/bin/python -m jobs.tiny --out /tmp/tiny
    .venv/bin/python scripts/tiny_learning.py train --model /tmp/tiny --task colour --steps 800
    .venv/bin/python scripts/tiny_learning.py train --model /tmp/tiny --task point --squares 3 --steps 1500
    .venv/bin/python scripts/tiny_learning.py probe --model /tmp/tiny

Tasks: `colour` ("What colour is the square?", one square; chance 1/7) and `point` ("Point to the <colour>
square.", answer (x, y); a hit is a point inside the square; each evaluation line also says what answering the
image's centre would score). `quadrant` is the quickstart's `zoom_colour` task (the colour of a small square in a
named quadrant, 4 options) on the full view, `quadrant_crop` on the zoom into that quadrant. `--side A,B` sizes
the squares (SIZE/A to SIZE/B pixels). `--background gradient`
shades the background with x and y, so a patch's own pixels say where it is (`through`: under the squares
too); `--system full` uses the project's grounded system prompt (about 250 tokens, 5-10x slower per step)
instead of a one-line one.

Measured on 2 cores (2026-12-02, tiny preset, 16 samples a step, lr 2e-3): `colour` stays at chance for 800
steps, `point` for 1,500 (with and without the gradient, with 1 or 3 squares, with 4 layers); the `probe`
subcommand reads the colour from the untrained model's last hidden state at about 84% and the square's position
from its own vision token no better than the mean (without the gradient). `colour --side 3,2` (37-56 px squares,
rope_theta 1e4) reached 100% at step 100 (43 s) on the same 2 cores. docs/tiny_learning.md has every measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PALETTE = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (130, 40, 170), "orange": (240, 120, 20), "cyan": (20, 180, 200)}
COLOURS = list(PALETTE)
SIZE = 112  # --size overrides
SHORT_SYSTEM = "Point to the element. Answer (x, y)."


def sample(rng: random.Random, squares: int, background: str, side=(7, 5)):
    """(image, colour asked about, its box x1, y1, x2, y2) with `squares` squares of distinct colours, each
    SIZE // side[0] to SIZE // side[1] pixels wide, on a `background` of "plain" grey, a "gradient" whose red and
    blue channels follow x and y, "through": that gradient also shows through the squares (60% colour), or the
    quickstart's tint per 28-px vision token (tasks.cell_tinted) under the squares ("cells"), inside 7-px outlined
    squares ("hollow"), or also as 3-px cell frames ("grid") or 8-px cell-centre patches ("dots") drawn over them."""
    from PIL import Image, ImageDraw

    from vigorl_core.synthetic.tasks import cell_tinted

    tints = cell_tinted((SIZE, SIZE))
    if background in ("cells", "grid", "hollow", "dots"):
        img = tints.copy()
    elif background != "plain":
        img = Image.new("RGB", (SIZE, SIZE))
        img.putdata([(90 + 150 * x // SIZE, 200, 90 + 150 * y // SIZE) for y in range(SIZE) for x in range(SIZE)])
    else:
        img = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    colours, boxes = rng.sample(COLOURS, squares), []
    for colour in colours:
        for _ in range(100):
            width = rng.randint(SIZE // side[0], SIZE // side[1])
            x, y = rng.randint(2, SIZE - width - 2), rng.randint(2, SIZE - width - 2)
            box = (x, y, x + width, y + width)
            if all(box[2] + 3 <= o[0] or o[2] + 3 <= box[0] or box[3] + 3 <= o[1] or o[3] + 3 <= box[1] for o in boxes):
                break
        boxes.append(box)
        if background == "hollow":  # a 7-px outline: the cells' tint shows inside the square
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=PALETTE[colour], width=7)
        elif background == "dots":  # each cell's tint as an 8-px patch at its centre, over the squares too
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PALETTE[colour])
            for cy in range(0, SIZE, 28):
                for cx in range(0, SIZE, 28):
                    draw.rectangle([cx + 10, cy + 10, cx + 17, cy + 17], fill=tints.getpixel((cx, cy)))
        elif background == "grid":  # each cell's tint as a 3-px frame drawn over everything, squares too
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PALETTE[colour])
            for cy in range(0, SIZE, 28):
                for cx in range(0, SIZE, 28):
                    draw.rectangle([cx, cy, cx + 27, cy + 27], outline=tints.getpixel((cx, cy)), width=3)
        elif background == "through":
            square = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), PALETTE[colour])
            img.paste(Image.blend(square, img.crop(box), 0.4), box[:2])
        else:
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PALETTE[colour])
    i = rng.randrange(squares)
    return img, colours[i], boxes[i], None


def quadrant_sample(rng: random.Random, crop: bool):
    """The quickstart's `zoom_colour` task (vigorl_core.synthetic.tasks): the colour of an 18-24 px square in a named
    quadrant of a 112-px image, as (image, colour, box, question). `crop`: instead of the full view, the zoom
    into that quadrant the quickstart's multi-turn arm gets (56-px window magnified 2x: the square 36-48 px)."""
    from vigorl_core.synthetic.tasks import generate, quadrant_box
    from vigorl_core.zoom import point_crop, zoom_settings

    item, img = generate("zoom_colour", 1, rng.randrange(1 << 30))[0]
    box = tuple(int(v) for v in item.bbox)
    question = item.question + " Options: " + ", ".join(item.options) + "."
    if crop:
        x1, y1, x2, y2 = quadrant_box(item.metadata["quadrant"], img.size)
        img = point_crop(img, (x1 + x2) // 2, (y1 + y2) // 2, zoom_settings("visual_search", "tiny")).image
    return img, item.answer, box, question


class Setup:
    def __init__(self, args):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        from vigorl_core.prompts import system_prompt

        torch.set_num_threads(args.threads)
        self.args = args
        self.system = system_prompt("grounding", "grounded") if args.system == "full" else SHORT_SYSTEM
        self.proc = AutoProcessor.from_pretrained(args.model)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).to(args.device)

    def messages(self, colour: str, answer: str | None = None, question: str | None = None) -> list[dict]:
        question = question or ("What colour is the square?" if self.args.task == "colour"
                                else f"Point to the {colour} square.")
        if self.args.pad:  # 0-8 filler words before the question, fixed per question: the distance varies
            question = "Look. " * random.Random(question + colour).randrange(9) + question
        m = [{"role": "system", "content": self.system},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return m + ([{"role": "assistant", "content": answer}] if answer else [])

    def answer(self, colour: str, box) -> str:
        if self.args.task != "point":
            return self.colour_chain(colour, box)
        x, y = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        if self.args.point == "token":  # the vision-token centre nearest the square's centre (chains.token_point)
            x, y = min(((14 + 28 * i, 14 + 28 * j) for i in range(SIZE // 28) for j in range(SIZE // 28)),
                       key=lambda c: (c[0] - x) ** 2 + (c[1] - y) ** 2)
        return f"<think> The {colour} square is at ({x}, {y}). </think>\n<answer> ({x}, {y}) </answer>"

    def colour_chain(self, colour: str, box) -> str:
        """--chain named: the thought names the colour; answer_only: it names the square's centre and the
        answer alone names the colour (the quickstart's written chains); noisy: as the quickstart's MCTS chains,
        a backtracking thought at random points (fixed per image: seeded by its box), then the answer."""
        if self.args.chain == "named":
            return f"<think> It is {colour}. </think>\n<answer> {colour} </answer>"
        x, y = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        if self.args.chain == "answer_only":
            return f"<think>\nThe square is at ({x}, {y}).\n</think>\n<answer> {colour} </answer>"
        r = random.Random(str(box))
        p = [(r.randrange(SIZE), r.randrange(SIZE)) for _ in range(4)]
        return (f"<think>\nThe square is at {p[0]}. I read the colour of the square at {p[1]}. Wait, this seems off. "
                f"Let's try something else. The square is at {p[2]}. I read the colour of the square at {p[3]}.\n"
                f"</think>\n<answer> {colour} </answer>")

    def batch(self, items):
        """Right-padded training batch; labels only on the assistant's tokens."""
        self.proc.tokenizer.padding_side = "right"
        texts = [self.proc.apply_chat_template(self.messages(c, self.answer(c, b), q), tokenize=False)
                 for _, c, b, q in items]
        enc = self.proc(text=texts, images=[[im] for im, *_ in items], return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        for k, (im, c, _, q) in enumerate(items):
            prompt = self.proc.apply_chat_template(self.messages(c, None, q), tokenize=False,
                                                   add_generation_prompt=True)
            labels[k, :len(self.proc(text=[prompt], images=[[im]]).input_ids[0])] = -100
        labels[enc.attention_mask == 0] = -100
        enc["labels"] = labels
        return enc.to(self.args.device)

    def evaluate(self, held) -> tuple[float, str]:
        import torch

        self.proc.tokenizer.padding_side = "left"
        self.model.eval()
        hits, text = 0, ""
        for j in range(0, len(held), 16):
            part = held[j:j + 16]
            prompts = [self.proc.apply_chat_template(self.messages(c, None, q), tokenize=False,
                                                     add_generation_prompt=True) for _, c, _, q in part]
            enc = self.proc(text=prompts, images=[[im] for im, *_ in part], return_tensors="pt",
                            padding=True).to(self.args.device)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=40 if self.args.chain == "named" else 400,
                                          do_sample=False)
            for (_, colour, box, _), ids in zip(part, out):
                text = self.proc.tokenizer.decode(ids[enc.input_ids.shape[1]:], skip_special_tokens=True)
                if self.args.task != "point":
                    hits += f"<answer> {colour} </answer>" in text
                elif m := re.search(r"<answer>\s*\((\d+),\s*(\d+)\)", text):
                    x, y = int(m.group(1)), int(m.group(2))
                    hits += box[0] <= x < box[2] and box[1] <= y < box[3]
        self.model.train()
        return hits / len(held), text


def train(args) -> None:
    import torch

    s = Setup(args)
    squares = 1 if args.task == "colour" else args.squares
    def draw(rng):
        if args.task.startswith("quadrant"):
            return quadrant_sample(rng, crop=args.task == "quadrant_crop")
        return sample(rng, squares, args.background, args.side)

    held = [draw(random.Random(f"held{i}")) for i in range(64)]
    centre = SIZE // 2  # what answering the image's centre every time scores: the bar pointing must clear
    centre_hits = sum(b[0] <= centre < b[2] and b[1] <= centre < b[3] for _, _, b, _ in held) / len(held)
    rng = random.Random(args.seed)
    pool = [draw(rng) for _ in range(args.pool)]  # --pool N: N fixed training images instead of fresh ones
    opt = torch.optim.AdamW(s.model.parameters(), lr=args.lr, weight_decay=0.0)
    started = time.perf_counter()
    s.model.train()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        items = [rng.choice(pool) if pool else draw(rng) for _ in range(args.batch)]
        loss = s.model(**s.batch(items)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps:
            accuracy, last = s.evaluate(held)
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "heldout_accuracy": accuracy,
                              **({"centre_answer_accuracy": centre_hits} if args.task == "point" else {}),
                              "seconds": round(time.perf_counter() - started), "last_output": last[:80]}), flush=True)
    if args.save:
        s.model.save_pretrained(args.save)
        s.proc.save_pretrained(args.save)


def _linear_probe_accuracy(x, y, classes: int) -> float:
    import torch

    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = len(x) * 3 // 4
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    opt = torch.optim.Adam([w], 1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(x[:n] @ w, y[:n]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[n:] @ w).argmax(1) == y[n:]).float().mean().item()


def _ridge_mae(x, y) -> tuple[list[float], list[float]]:
    import torch

    n = len(x) * 5 // 6
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(a[:n].T @ a[:n] + 0.1 * torch.eye(a.shape[1]), a[:n].T @ y[:n])
    mae = (a[n:] @ w - y[n:]).abs().mean(0)
    baseline = (y[n:] - y[:n].mean(0)).abs().mean(0)
    return mae.tolist(), baseline.tolist()


def probe(args) -> None:
    """Linear probes of the untrained model: colour from the last hidden state at the answer position, and the
    square's centre from the vision token that holds it (alone) and from all 16 vision tokens."""
    import torch

    args.task = "colour"
    s = Setup(args)
    rng = random.Random(args.seed)
    prompt = s.proc.apply_chat_template(s.messages("red"), tokenize=False, add_generation_prompt=True)
    last, own, every, colours, centres = [], [], [], [], []
    for _ in range(400):
        img, colour, box, _ = sample(rng, 1, args.background)
        enc = s.proc(text=[prompt], images=[[img]], return_tensors="pt")
        with torch.no_grad():
            out = s.model(**enc, output_hidden_states=True)
            vision = s.model.model.visual(enc.pixel_values, grid_thw=enc.image_grid_thw)
        vision = getattr(vision, "pooler_output", vision)
        vision = vision[0] if isinstance(vision, tuple) else vision
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        last.append(out.hidden_states[-1][0, -1])
        own.append(vision[int(cy // 28) * (SIZE // 28) + int(cx // 28)])
        every.append(vision.flatten())
        colours.append(COLOURS.index(colour))
        centres.append([cx, cy])
    centres_t = torch.tensor(centres)
    print(json.dumps({
        "colour_from_last_hidden_state": _linear_probe_accuracy(torch.stack(last), torch.tensor(colours), 7),
        "centre_mae_from_own_token": _ridge_mae(torch.stack(own), centres_t)[0],
        "centre_mae_from_all_tokens": _ridge_mae(torch.stack(every), centres_t)[0],
        "centre_mae_of_the_mean": _ridge_mae(torch.stack(own), centres_t)[1],
    }))


def _build(args) -> None:
    """A tiny-preset model with the given language-model changes (vision tower unchanged)."""
    from vigorl_core.synthetic import tiny

    text = tiny.PRESETS["tiny"]["text"]
    if args.hidden:
        text.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    if args.layers:
        text["num_hidden_layers"] = args.layers
    if args.heads:
        text.update(num_attention_heads=args.heads, num_key_value_heads=args.heads)
    if args.rope_theta:
        text["rope_parameters"] = dict(text["rope_parameters"], rope_theta=args.rope_theta)
    tiny.build_tiny_model(args.build)
    args.model = args.build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["train", "probe"])
    parser.add_argument("--model", help="a tiny model folder (python -m jobs.tiny --out DIR)")
    parser.add_argument("--task", choices=["colour", "point", "quadrant", "quadrant_crop"], default="colour")
    parser.add_argument("--squares", type=int, default=1, help="squares per image (point task)")
    parser.add_argument("--side", type=lambda v: tuple(int(p) for p in v.split(",")), default=(7, 5),
                        help="square side from SIZE/A to SIZE/B pixels, as A,B (default 7,5: 16-22 px at 112)")
    parser.add_argument("--background", default="plain",
                        choices=["plain", "gradient", "through", "cells", "grid", "hollow", "dots"])
    parser.add_argument("--point", choices=["centre", "token"], default="centre",
                        help="point task: answer the square's centre, or the vision-token centre nearest it")
    parser.add_argument("--pad", action="store_true",
                        help="0-8 filler words before the question, so the image-to-answer distance varies")
    parser.add_argument("--system", choices=["short", "full"], default="short")
    parser.add_argument("--chain", choices=["named", "answer_only", "noisy"], default="named",
                        help="the colour task's target text (see Setup.colour_chain)")
    parser.add_argument("--pool", type=int, default=0, help="train on this many fixed images (0: fresh ones)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="fresh samples per step")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (a multiple of 28, <= 224)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", metavar="DIR", help="save the trained model and processor here")
    parser.add_argument("--build", metavar="OUT", help="first build a tiny model into OUT (then --model is OUT); "
                        "--hidden/--layers/--heads/--rope_theta change the tiny preset's language model")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--rope_theta", type=float)
    args = parser.parse_args()
    global SIZE
    SIZE = args.size
    if args.build:
        _build(args)
    (train if args.what == "train" else probe)(args)


if __name__ == "__main__":
    main()
