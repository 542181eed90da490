"""SFT data: conversations -> token ids with assistant-only labels, length-grouped batches, padded collate.

`read_conversations(path)` reads sharegpt records `{messages: [{role, content}], images: [...]}` as
LLaMA-Factory uses them: the original's released chain files (`*_reasoning_chains_{train,val}.json`,
`..._MULTITURN.json`), `jobs.chains` output and our own JSONL (the same keys plus optional `task`), as a
JSON array, JSONL or parquet through vigorl_core.data's readers. `<image>` in a user message marks where
the next image of `images` goes (crops of multi-turn chains too); a record with images and no placeholder
gets them at the start of its first user message, as the original writes `<image>` before the question.
Bad records raise `DataError` naming file, line and field.

`encode_conversation` lays the conversation out exactly as the rollout driver does (chat_tokens.py):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{image}{question}<|im_end|>\\n<|im_start|>assistant\\n
    {turn 1}<|im_end|>  \\n<|im_start|>user\\n<observation>\\n...{crop}\\n</observation><|im_end|>\\n
    <|im_start|>assistant\\n
    {turn 2}<|im_end|>  \\n

Labels are the ids of the assistant turns (their text and their `<|im_end|>`) and -100 everywhere else:
system, question and observation turns, role headers, image pads, the newline after `<|im_end|>`. Each
`<|image_pad|>` is expanded to the processor's count for the image resized to the model frame
(frames.resize_to_model), so `SFTDataset` hands the processor images it does not resize again.

    convs = read_conversations("chains/train.jsonl")
    examples = [encode_conversation(c, chat, system_prompt("grounding", conversation_mode(c))) for c in convs]
    plan = BatchPlan([e.length for e in examples], global_batch=32, micro_batch=1, world_size=8)
    loader = DataLoader(SFTDataset(examples, processor.image_processor, chat.profile),
                        batch_sampler=plan.rank_batches(rank, first, last), collate_fn=partial(collate, pad_id=..))
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vigorl_core.rollout.chat_tokens import IMAGE_PLACEHOLDER, ChatTokens
from vigorl_core.data import IMAGE_TOKEN, DataError, absolute_path, read_records, record_id, RecordLocation
from vigorl_core.frames import ModelProfile, resize_to_model
from vigorl_core.records import TASKS

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch cross_entropy's default ignore_index)
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One SFT record: `messages` as (role, content) with `<image>` placeholders, absolute image paths."""

    id: str
    messages: list[tuple[str, str]]
    images: list[str]
    task: str | None = None
    file: str = ""
    line: int = 0


def conversation_mode(conv: Conversation) -> str:
    """Prompt mode the conversation was made for: `multiturn` when an assistant turn calls the zoom tool."""
    return "multiturn" if any(r == "assistant" and "<tool_call>" in c for r, c in conv.messages) else "grounded"


def read_conversations(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                       check_images: bool = True) -> list[Conversation]:
    """All records of one sharegpt file. Relative image paths resolve against `data_root` (default: the
    file's folder). With `check_images`, every missing image file is listed in one DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    root = Path(data_root) if data_root is not None else path.parent
    convs, missing = [], []
    for line, number, rec in read_records(path):
        conv = _parse_record(rec, RecordLocation(path, line), f"{path.stem}:{number}")
        conv.images = [absolute_path(p, root) for p in conv.images]
        if check_images:
            missing += [(line, f"images[{i}]", p) for i, p in enumerate(conv.images) if not os.path.isfile(p)]
        convs.append(conv)
    if missing:
        listed = "\n".join(f"  {path}:{line}: {field}: {p}" for line, field, p in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(path, missing[0][0], "images", f"{len(missing)} image file(s) not found (data root {root}; "
                        f"pass data_root=):\n{listed}{more}")
    if not convs:
        raise DataError(path, None, None, "no records")
    return convs


def _parse_record(rec: dict, at: RecordLocation, default_id: str) -> Conversation:
    if "messages" not in rec:
        raise at.error("messages", f"missing; expected sharegpt records {{messages: [{{role, content}}], images: "
                       f"[...]}}, got keys {sorted(rec)}")
    messages = []
    for i, m in enumerate(at.get(rec, "messages", list)):
        if not isinstance(m, dict):
            raise at.error(f"messages[{i}]", f"expected an object, got {type(m).__name__}")
        role = at.get(m, "role", str, f"messages[{i}]")
        content = at.get(m, "content", str, f"messages[{i}]")
        if role not in ROLES:
            raise at.error(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got '{role}'")
        if IMAGE_TOKEN in content and role != "user":
            raise at.error(f"messages[{i}].content", f"{IMAGE_TOKEN} may only appear in user messages")
        messages.append((role, content))
    # An optional system message, then user/assistant alternating, ending with an assistant turn.
    start = 1 if messages and messages[0][0] == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i][0] != expected:
            raise at.error(f"messages[{i}].role", f"expected '{expected}' (after an optional system message, turns "
                           f"alternate user, assistant), got '{messages[i][0]}'")
    if len(messages) - start < 2 or messages[-1][0] != "assistant":
        raise at.error("messages", "expected at least one user turn followed by an assistant turn, ending with an "
                       "assistant turn")
    images = at.strings(rec, "images") if rec.get("images") is not None else []
    placeholders = sum(c.count(IMAGE_TOKEN) for _, c in messages)
    if placeholders == 0 and images:
        role, content = messages[start]
        messages[start] = (role, IMAGE_TOKEN * len(images) + content)
    elif placeholders != len(images):
        raise at.error("images", f"the messages hold {placeholders} {IMAGE_TOKEN} placeholders but the record lists "
                       f"{len(images)} images")
    task = at.get(rec, "task", str, optional=True)
    if task is not None and task not in TASKS:
        raise at.error("task", f"expected one of {', '.join(TASKS)}, got '{task}'")
    return Conversation(id=record_id(rec, at) or default_id, messages=messages, images=images, task=task,
                        file=str(at.file), line=at.line)


# -------------------------------------------------------------------------------------------- encoding

@dataclass
class Example:
    """A tokenized conversation. `input_ids` [L] hold every image's pads expanded; `labels` [L] align with
    them (int32 arrays: a dataset of long chains crosses process boundaries as buffers, not Python ints)."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str]
    image_tokens: list[int]  # expanded pad count of each image (model frame)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def encode_conversation(conv: Conversation, chat: ChatTokens, system: str | None = None,
                        replace_system: bool = True) -> Example:
    """Token ids and labels of `conv` (module docstring). `system` replaces the record's system message
    (or only fills a missing one when `replace_system` is False)."""
    messages = list(conv.messages)
    if system is not None:
        if messages[0][0] == "system":
            if replace_system:
                messages[0] = ("system", system)
        else:
            messages.insert(0, ("system", system))
    # (text, in_loss) runs; masked runs are tokenized whole, as the rollout driver tokenizes its prompt
    # and observation turns, so template and observation ids equal the driver's.
    runs: list[tuple[str, bool]] = []
    for role, content in messages:
        content = content.replace(IMAGE_TOKEN, IMAGE_PLACEHOLDER)
        if role == "assistant":
            pieces = [("<|im_start|>assistant\n", False), (content + "<|im_end|>", True), ("\n", False)]
        else:
            pieces = [(f"<|im_start|>{role}\n{content}<|im_end|>\n", False)]
        for text, in_loss in pieces:
            if runs and runs[-1][1] == in_loss:
                runs[-1] = (runs[-1][0] + text, in_loss)
            else:
                runs.append((text, in_loss))
    counts = []
    for i, image_path in enumerate(conv.images):
        try:
            with Image.open(image_path) as im:
                counts.append(chat.profile.image_tokens(im.width, im.height))
        except (OSError, ValueError) as e:
            raise DataError(conv.file, conv.line, f"images[{i}]", f"cannot read {image_path}: {e}") from None
    ids: list[int] = []
    labels: list[int] = []
    k = 0
    for text, in_loss in runs:
        for token in chat.encode(text):
            if token == chat.image_pad_id:  # only in masked runs: <image> is refused outside user turns
                ids += [token] * counts[k]
                labels += [IGNORE_INDEX] * counts[k]
                k += 1
            else:
                ids.append(token)
                labels.append(token if in_loss else IGNORE_INDEX)
    if k != len(counts):
        raise DataError(conv.file, conv.line, "messages", f"{k} image pad tokens after tokenization but "
                        f"{len(counts)} images (does a message contain a literal <|image_pad|>?)")
    return Example(conv.id, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), list(conv.images),
                   counts)


class SFTDataset:
    """Map-style dataset over encoded examples: loads each example's images, resizes them to the model
    frame and runs the image processor (a fixed point: it does not resize them again)."""

    def __init__(self, examples: Sequence[Example], image_processor: Any, profile: ModelProfile):
        self.examples = examples
        self.image_processor = image_processor
        self.profile = profile

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        ex = self.examples[index]
        item = {"input_ids": torch.tensor(ex.input_ids, dtype=torch.long),
                "labels": torch.tensor(ex.labels, dtype=torch.long)}
        if ex.images:
            images = []
            for p in ex.images:
                with Image.open(p) as im:
                    images.append(resize_to_model(im, self.profile)[0])
            vision = self.image_processor(images=images, return_tensors="pt")
            grid = vision["image_grid_thw"]
            got = (grid.prod(-1) // self.profile.merge_size ** 2).tolist()
            if got != ex.image_tokens:
                raise ValueError(f"example {ex.id}: the image processor gives {got} tokens per image, the "
                                 f"encoding expanded {ex.image_tokens} "
                                 "(processor size settings differ from the profile?)")
            item["pixel_values"], item["image_grid_thw"] = vision["pixel_values"], grid
        return item


def mrope_position_ids(input_ids, attention_mask, mm_token_type_ids, image_grid_thw, merge_size: int = 2):
    """[3, B, L] multimodal rotary positions (temporal, height, width) of a right-padded Qwen2.5-VL batch, as
    transformers' `get_rope_index` computes them: text continues one by one, an image's tokens take its merged
    grid offset by the position where it starts, and the text after it starts max(h, w) further on; padding
    gets 0. Computed on the CPU while the batch is collated: the model's own computation runs on the GPU tensors
    and waits on the GPU about ten times a micro-batch (`.tolist()`, `.item()`, masked assignment)."""
    import torch

    rows, width = input_ids.shape
    position_ids = torch.zeros(3, rows, width, dtype=torch.long)
    grids = iter(image_grid_thw.tolist())
    for row in range(rows):
        keep = attention_mask[row].bool()
        types = mm_token_type_ids[row][keep].tolist()
        pieces, position, start = [], 0, 0
        while start < len(types):
            end = start
            while end < len(types) and types[end] == types[start]:
                end += 1
            if types[start] == 0:
                pieces.append(torch.arange(position, position + end - start).expand(3, -1))
                position += end - start
            else:  # one image, or several whose pads touch (no text between them)
                covered = start
                while covered < end:
                    t, h, w = next(grids)
                    h, w = h // merge_size, w // merge_size
                    axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                    pieces.append(torch.stack(axes).reshape(3, -1) + position)
                    position, covered = position + max(h, w), covered + t * h * w
            start = end
        position_ids[:, row, keep] = torch.cat(pieces, dim=1)
    return position_ids


def collate(items: list[dict[str, Any]], pad_id: int, image_pad_id: int, merge_size: int = 2) -> dict[str, Any]:
    """Right-pad a micro-batch. Returns input_ids, labels, attention_mask, mm_token_type_ids [B, L],
    loss_positions [K] (sft_train.loss_positions) and, when any image is present, pixel_values
    [sum patches, C*T*P*P], image_grid_thw [num images, 3] in order and position_ids [3, B, L]
    (mrope_position_ids; `merge_size` is the vision config's spatial_merge_size). `mm_token_type_ids` (1 on
    image pads) must reach forward too: transformers checks it. What can be computed from the token ids is
    computed here, on the CPU, so that the forward on a GPU need not wait for it."""
    import torch

    from vigorl_core.train.sft_train import loss_positions

    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n], labels[row, :n], attention[row, :n] = it["input_ids"], it["labels"], 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
             "mm_token_type_ids": (input_ids == image_pad_id).int() * attention,
             "loss_positions": loss_positions(labels)}
    with_images = [it for it in items if "pixel_values" in it]
    if with_images:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
        batch["position_ids"] = mrope_position_ids(input_ids, attention, batch["mm_token_type_ids"],
                                                   batch["image_grid_thw"], merge_size)
    return batch


# -------------------------------------------------------------------------------------------- batching

class BatchPlan:
    """Which examples each optimizer step trains on, and how a step splits over ranks and micro-steps.

    An epoch shuffles the examples (seeded by seed and epoch), cuts them into megabatches of
    `group_batches` global batches, sorts each megabatch by length and cuts it into global batches of
    `global_batch` examples (the remainder of the epoch is dropped), then shuffles the batch order. Within a
    step, the length-sorted batch is cut into `world_size * accumulation` micro-batches of `micro_batch`
    examples; micro-batch j goes to rank j % world_size at micro-step j // world_size, so the ranks of one
    micro-step hold similar lengths (ZeRO syncs them every micro-step). Step s is a pure function of
    (seed, s): a resumed run starts at its next step and repeats none.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, micro_batch: int, world_size: int = 1,
                 seed: int = 0, group_batches: int = 8):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch_size {global_batch} must be a multiple of micro_batch_size x workers "
                             f"= {micro_batch} x {world_size}")
        if len(lengths) < global_batch:
            raise ValueError(f"{len(lengths)} training examples, fewer than one global batch ({global_batch})")
        self.lengths, self.global_batch, self.micro_batch = list(lengths), global_batch, micro_batch
        self.world_size, self.seed, self.group_batches = world_size, seed, group_batches
        self.accumulation = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = len(lengths) // global_batch
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"vigorl-sft/{self.seed}/{epoch}")
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            order = order[:self.steps_per_epoch * self.global_batch]
            size = self.global_batch * self.group_batches
            batches = []
            for start in range(0, len(order), size):
                mega = sorted(order[start:start + size], key=lambda i: (-self.lengths[i], i))
                batches += [mega[b:b + self.global_batch] for b in range(0, len(mega), self.global_batch)]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def step_batch(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based), sorted by length, longest first."""
        return self.epoch_batches(step // self.steps_per_epoch)[step % self.steps_per_epoch]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The `accumulation` micro-batches rank `rank` runs at step `step`, in order."""
        batch = self.step_batch(step)
        chunks = [batch[i:i + self.micro_batch] for i in range(0, len(batch), self.micro_batch)]
        return chunks[rank::self.world_size]

    def rank_batches(self, rank: int, first_step: int, last_step: int) -> list[list[int]]:
        """Every micro-batch of `rank` for steps first_step..last_step-1 (a DataLoader batch_sampler)."""
        return [mb for step in range(first_step, last_step) for mb in self.micro_batches(step, rank)]


def eval_batches(lengths: Sequence[int], micro_batch: int, world_size: int, rank: int) -> list[tuple[list[int], bool]]:
    """Validation micro-batches of `rank` as (indices, counted): every rank gets the same number of forward
    passes (ZeRO-3 gathers parameters collectively in forward); padding passes have counted=False."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    mine = [(c, True) for c in chunks[rank::world_size]]
    per_rank = -(-len(chunks) // world_size)
    return mine + [(chunks[0], False)] * (per_rank - len(mine))
