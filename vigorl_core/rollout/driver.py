"""Rollout driver: many grounded conversations at once against a PolicyEngine, single- or multi-turn.

Each conversation advances as soon as its own turn finishes (no turn lockstep: the original's
multi-turn step waits for the slowest conversation at every turn). A GRPO group's first turn is ONE
engine call with n samples, so the prompt is prefilled once. Images are decoded and resized once per
sample and shared by reference across the group and its turns.

Multi-turn rules (the original's zoom protocol, docs/method.md, with these differences spelled out):
- a turn stops at `</tool_call>`, `</answer>` or `<|im_end|>`; only the FIRST tool call of a turn runs;
- a tool call that does not parse (bad JSON, missing/negative coordinate) gets an observation turn
  without an image that says what was wrong, and the conversation goes on (the original appended
  nothing and continued from a broken context);
- a point outside the image is clamped into it for the crop and reported in `trace.errors`;
- `max_images` counts the original plus crops; when a crop fills it, or when the next turn is the last
  of `max_turns`, the forced-final prefix (`<think> Based on all ... </think>\\n<answer>`) is appended
  after the observation and the model must answer; a tool call with the image budget already full ends
  the conversation (`finish = "max_images"`);
- `max_response_tokens` counts every token after the prompt, image tokens included, and the response
  never exceeds it; a turn that would not fit ends the conversation (`finish = "response_budget"`);
- the diversity bonus of multi-turn rewards counts the crops that ran (clamped points), not raw points;
- log-probs are asked from the engine only with `RolloutConfig.logprobs` (records say so in `has_logprobs`;
  without them `logprobs` holds zeros);
- records from a grammar-constrained engine (`engine.constrained`, e.g. PlannedTurnsEngine) carry
  `constrained_logprobs=True`: their log-probs are the constrained distribution's, not the policy's.

    driver = RolloutDriver(engine, ChatTokens.from_pretrained(model_dir), RolloutConfig(mode="multiturn"))
    async for group in driver.run(samples):      # list[Rollout] per sample, as groups finish
        ...
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Generation, PolicyEngine, Sampling
from vigorl_core.frames import FrameMap
from vigorl_core.images import image_hash, model_frame_images
from vigorl_core.prompts import observation_text, system_prompt, user_text
from vigorl_core.protocol import FORCED_FINAL_PREFIX, parse_conversation, parse_response
from vigorl_core.records import RolloutRecord, Sample, Trace
from vigorl_core.rewards import Truth, reward_for
from vigorl_core.zoom import OBSERVATION_TAIL, Crop, ZoomEnv, ZoomSettings, zoom_settings


@dataclass(frozen=True)
class RolloutConfig:
    """Budgets and sampling of a rollout. Defaults follow the paper's multi-turn RL (A3) where they apply."""

    mode: Literal["grounded", "multiturn", "vanilla"] = "grounded"
    group_size: int = 1
    temperature: float = 1.0
    top_p: float = 0.99
    seed: int | None = None
    max_turns: int = 5
    max_images: int = 5
    max_tokens_per_turn: int = 1024
    max_response_tokens: int = 2048
    zoom: ZoomSettings | None = None  # None: the task x profile table (vigorl_core.zoom)
    profile: str | None = None  # zoom-table profile; None: "tiny" if the model's max_pixels is small
    score: bool = True
    # Ask the engine for each sampled token's log-prob (raw, before temperature). GRPO needs them only for
    # the importance weights of off-policy rollouts (max_staleness >= 1) and the train/infer mismatch metric;
    # on an H200 at 256 requests they halved engine throughput (bench/results/engine_sampling_gpu_256.json).
    logprobs: bool = False


@dataclass
class Rollout:
    """A finished conversation: the record, the images it refers to (in order, by reference) and the
    zoom crops it made (their windows map crop pixels back to the model frame)."""

    record: RolloutRecord
    images: list[Image.Image]
    crops: list[Crop] = field(default_factory=list)


@dataclass
class PreparedSample:
    """A sample with its images decoded and resized to the model frame once, shared by its group."""

    sample: Sample
    images: list[Image.Image]
    frame: FrameMap  # of images[0], the image zooms cut from
    image_hashes: list[str]
    prompt_ids: list[int]
    truth: Truth


@dataclass
class _Segment:
    kind: Literal["prompt", "generated", "eos", "observation", "forced"]
    ids: list[int]
    text: str
    logprobs: list[float] | None = None
    image: Image.Image | None = None


@dataclass
class Conversation:
    """State of one conversation; `request()` -> engine call -> `advance(generation)` until `done`."""

    prepared: PreparedSample
    group_index: int
    chat: ChatTokens
    config: RolloutConfig
    zoom: ZoomSettings
    segments: list[_Segment] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turn: int = 0
    finish: str | None = None
    engine_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        p = self.prepared
        self.segments.append(_Segment("prompt", list(p.prompt_ids), ""))
        self.images = list(p.images)
        self.env = ZoomEnv(p.images[0], self.zoom, max_images=self.config.max_images)
        self.prompt_len = len(self.chat.expand(p.prompt_ids, p.images))
        self.response_len = 0

    @property
    def done(self) -> bool:
        return self.finish is not None

    def request(self) -> tuple[list[int], list[Image.Image], Sampling]:
        cfg = self.config
        stop_ids = (self.chat.im_end_id,)
        if cfg.mode == "multiturn":
            stop_ids += (self.chat.tool_call_end_id,)
        seed = None
        if cfg.seed is not None:
            seed = zlib.crc32(f"{cfg.seed}/{self.prepared.sample.id}/{self.group_index}/{self.turn}".encode())
        sampling = Sampling(
            temperature=cfg.temperature, top_p=cfg.top_p, stop=("</answer>",), stop_token_ids=stop_ids, seed=seed,
            logprobs=cfg.logprobs,
            max_tokens=min(cfg.max_tokens_per_turn, cfg.max_response_tokens - self.response_len),
        )
        ids = [t for s in self.segments for t in s.ids]
        return ids, self.images, sampling

    def _append(self, segment: _Segment) -> None:
        self.segments.append(segment)
        image_tokens = self.chat.image_tokens(segment.image) - 1 if segment.image is not None else 0
        self.response_len += len(segment.ids) + image_tokens
        if segment.image is not None:
            self.images.append(segment.image)

    def _end(self, finish: str, needs_eos: bool) -> None:
        # The closing <|im_end|> is masked (no loss), so leaving it out costs training nothing; it is left
        # out when the turn already filled the budget, so a response never exceeds max_response_tokens.
        if needs_eos and self.response_len < self.config.max_response_tokens:
            self._append(_Segment("eos", [self.chat.im_end_id], ""))
        self.finish = finish

    def advance(self, gen: Generation, engine_seconds: float = 0.0) -> None:
        self.engine_seconds += engine_seconds
        self.versions.append(gen.policy_version)
        self._append(_Segment("generated", list(gen.token_ids), gen.text, logprobs=gen.logprobs))
        ended_with_eos = bool(gen.token_ids) and gen.token_ids[-1] == self.chat.im_end_id
        turn_trace = parse_response(gen.text.replace("<|im_end|>", ""), self.turn)
        self.turn += 1
        calls = [c for c in turn_trace.tool_calls if c.raw or c.error]
        if gen.finish_reason == "length":
            over = self.response_len >= self.config.max_response_tokens
            return self._end("response_budget" if over else "length", needs_eos=False)
        if self.config.mode != "multiturn":  # one turn: it answered or it just stopped
            return self._end("answer" if "</answer>" in gen.text else "no_answer", needs_eos=not ended_with_eos)
        if turn_trace.answer is not None or "</answer>" in gen.text:
            return self._end("answer" if "</answer>" in gen.text else "no_tool_call", needs_eos=not ended_with_eos)
        if not calls or "</tool_call>" not in gen.text:
            return self._end("no_tool_call", needs_eos=not ended_with_eos)
        if self.turn >= self.config.max_turns:
            return self._end("max_turns", needs_eos=not ended_with_eos)
        self._observe(calls[0], needs_eos=not ended_with_eos)

    def _observe(self, call, needs_eos: bool) -> None:
        """Append the observation for the turn's first tool call (and the forced-final prefix if due)."""
        if call.coordinate is None:
            note = f"The tool call could not be executed: {call.error}."
            text = self.chat.observation_text(self.zoom.draw_dot, has_image=False, note=note)
            crop_image, visible = None, f"<observation>\n{note}{OBSERVATION_TAIL}"
        else:
            if not self.env.can_zoom:
                return self._end("max_images", needs_eos=needs_eos)
            crop = self.env.crop(*call.coordinate)
            if crop.clamped:
                self.errors.append(f"turn {self.turn - 1}: point {list(call.coordinate)} outside the "
                                   f"{self.env.image.width}x{self.env.image.height} image, "
                                   f"clamped to {list(crop.point)}")
            text = self.chat.observation_text(self.zoom.draw_dot)
            crop_image, visible = crop.image, observation_text(self.zoom.draw_dot) + OBSERVATION_TAIL
        obs_ids = self.chat.encode(text)
        force = self.env.needs_forced_final or self.turn == self.config.max_turns - 1
        forced_ids = self.chat.forced_final_ids if force else []
        image_tokens = self.chat.image_tokens(crop_image) - 1 if crop_image is not None else 0
        added = int(needs_eos) + len(obs_ids) + len(forced_ids) + image_tokens
        if self.response_len + added >= self.config.max_response_tokens:
            return self._end("response_budget", needs_eos=needs_eos)
        if needs_eos:
            self._append(_Segment("eos", [self.chat.im_end_id], ""))
        self._append(_Segment("observation", obs_ids, f"\n{visible}\n", image=crop_image))
        if force:
            self._append(_Segment("forced", list(forced_ids), FORCED_FINAL_PREFIX))

    def to_rollout(self, constrained_logprobs: bool = False) -> Rollout:
        """The finished record; `constrained_logprobs` marks log-probs from a grammar-constrained engine."""
        p = self.prepared
        engine_ids: list[int] = []
        train_ids: list[int] = []
        loss_mask: list[int] = []
        logprobs: list[float] = []
        images_seen: list[Image.Image] = []
        for seg in self.segments:
            engine_ids += seg.ids
            if seg.kind == "prompt":
                seg_images = p.images
            else:
                seg_images = [seg.image] if seg.image is not None else []
            expanded = self.chat.expand(seg.ids, seg_images)
            images_seen += seg_images
            train_ids += expanded
            generated = seg.kind == "generated"
            loss_mask += [1 if generated else 0] * len(expanded)
            logprobs += (seg.logprobs or [0.0] * len(expanded)) if generated else [0.0] * len(expanded)
        hashes = p.image_hashes + [image_hash(im) for im in images_seen[len(p.images):]]
        text = "".join(s.text for s in self.segments if s.kind != "prompt").replace("<|im_end|>", "")
        trace = _conversation_trace(self.segments)
        trace.errors += self.errors
        record = RolloutRecord(
            sample_id=p.sample.id, group_index=self.group_index, task=p.sample.task, mode=self.config.mode,
            engine_ids=engine_ids, train_ids=train_ids, loss_mask=loss_mask, logprobs=logprobs,
            prompt_len=self.prompt_len, images=hashes, image_tokens=[self.chat.image_tokens(im) for im in images_seen],
            text=text, trace=trace, finish=self.finish or "length", num_turns=self.turn, policy_versions=self.versions,
            timings={"seconds": time.perf_counter() - self.started, "engine_seconds": self.engine_seconds},
            constrained_logprobs=constrained_logprobs, has_logprobs=self.config.logprobs,
        )
        if self.config.score:
            scoring = time.perf_counter()
            zoom_points = [c.point for c in self.env.crops]  # what ran, clamped; the text holds raw requests
            reward = reward_for(p.sample.task, self.config.mode)(text, p.truth, zoom_points=zoom_points)
            record.reward = reward.overall
            record.reward_details = {"format": reward.format, "accuracy": reward.accuracy, **reward.details}
            record.timings["score_seconds"] = time.perf_counter() - scoring
        return Rollout(record, images_seen, list(self.env.crops))


def _conversation_trace(segments: list[_Segment]) -> Trace:
    """Parse each assistant turn; a forced-final prefix belongs to the turn it opens."""
    merged: list[str] = []
    prefix = ""
    for seg in segments:
        if seg.kind == "forced":
            prefix = seg.text
        elif seg.kind == "generated":
            merged.append(prefix + seg.text.replace("<|im_end|>", ""))
            prefix = ""
    return parse_conversation(merged)


class RolloutDriver:
    """Runs conversations against `engine`; see the module docstring."""

    def __init__(self, engine: PolicyEngine, chat: ChatTokens, config: RolloutConfig):
        self.engine = engine
        self.chat = chat
        self.config = config
        self.profile = config.profile or ("tiny" if chat.profile.max_pixels <= 200_704 else "qwen2.5-vl")
        self.constrained = bool(getattr(engine, "constrained", False))
        self._host: ThreadPoolExecutor | None = None  # created on the first multi-turn advance (_advance)

    def prepare(self, sample: Sample, images: Sequence[Image.Image] | None = None,
                frame: FrameMap | None = None) -> PreparedSample:
        """Decode and resize the sample's images once. Pass `images` to reuse decoded originals, or
        model-frame images plus the `frame` of the first (images that were resized elsewhere)."""
        if frame is None:
            resized, frame = model_frame_images(sample.images if images is None else images, self.chat.profile)
        else:
            resized = list(images)
        truth = Truth.in_model_frame(sample, frame)
        system = system_prompt(sample.task, self.config.mode)
        prompt_ids = self.chat.encode(self.chat.prompt_text(system, user_text(sample.question, sample.options),
                                                            len(resized)))
        return PreparedSample(sample, resized, frame, [image_hash(im) for im in resized], prompt_ids, truth)

    def conversations(self, prepared: PreparedSample) -> list[Conversation]:
        zoom = self.config.zoom or zoom_settings(prepared.sample.task, self.profile)
        return [Conversation(prepared, i, self.chat, self.config, zoom) for i in range(self.config.group_size)]

    async def _generate(self, conv: Conversation, n: int = 1) -> tuple[list[Generation], float]:
        ids, images, sampling = conv.request()
        start = time.perf_counter()
        gens = await self.engine.generate(ids, images, replace(sampling, n=n))
        return gens, time.perf_counter() - start

    async def _advance(self, conv: Conversation, gen: Generation, seconds: float) -> None:
        """`conv.advance`; in multi-turn mode in the driver's worker thread: a zoom crops and resizes an image
        (milliseconds of PIL work) and encodes the observation, which on the event loop would hold up every other
        conversation's next turn and the engine's output handling. One thread: a conversation's state is only
        touched by its own coroutine, and the tokenizer is never used by two threads of the driver at once."""
        if self.config.mode != "multiturn":
            return conv.advance(gen, seconds)
        if self._host is None:
            self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigorl-rollout")
        await asyncio.get_running_loop().run_in_executor(self._host, conv.advance, gen, seconds)

    async def rollout_group(self, prepared: PreparedSample) -> list[Rollout]:
        """One GRPO group: the first turn is one n-sample call; then each conversation goes on alone."""
        convs = self.conversations(prepared)
        gens, seconds = await self._generate(convs[0], n=len(convs))
        for conv, gen in zip(convs, gens):
            await self._advance(conv, gen, seconds)

        async def finish(conv: Conversation) -> None:
            while not conv.done:
                [gen], seconds = await self._generate(conv)
                await self._advance(conv, gen, seconds)

        await asyncio.gather(*(finish(c) for c in convs))
        return [c.to_rollout(self.constrained) for c in convs]

    async def run(self, samples: Iterable[Sample | PreparedSample], concurrency: int = 64
                  ) -> AsyncIterator[list[Rollout]]:
        """Roll out every sample's group, at most `concurrency` groups at once; yields groups as they finish."""
        gate = asyncio.Semaphore(concurrency)

        async def one(item):
            async with gate:
                prepared = item if isinstance(item, PreparedSample) else self.prepare(item)
                return await self.rollout_group(prepared)

        for next_done in asyncio.as_completed([one(s) for s in samples]):
            yield await next_done

    async def run_lockstep(self, prepared: Sequence[PreparedSample]) -> list[list[Rollout]]:
        """The original's schedule, for comparison: each turn is one batch of every live conversation,
        and no conversation starts turn t+1 before all have finished turn t."""
        groups = [self.conversations(p) for p in prepared]
        live = [c for g in groups for c in g]
        while live:
            results = await asyncio.gather(*(self._generate(c) for c in live))
            for conv, ([gen], seconds) in zip(live, results):
                await self._advance(conv, gen, seconds)
            live = [c for c in live if not c.done]
        return [[c.to_rollout(self.constrained) for c in g] for g in groups]
