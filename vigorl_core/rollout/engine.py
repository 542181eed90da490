"""The policy engine: one async interface over vLLM's in-process `AsyncLLM` (CPU or GPU build).

Token-in/token-out: callers pass prompt token ids with ONE `<|image_pad|>` per image plus the images
(already resized to the model frame); vLLM expands the placeholders itself. Results carry the engine's
generated ids verbatim, their text and per-token log-probabilities (raw, before temperature, so a
training forward reproduces them). Weight updates load a state dict into the running engine, clear the
prefix and multimodal caches, and set `version` to the one the weight store gave them (GRPO's weight
sync calls this; the store is the one version authority, the engine never counts on its own).

    engine = await VLLMEngine.create(EngineConfig(model="runs/models/tiny"))
    [gen] = await engine.generate(prompt_ids, [image], Sampling(max_tokens=64))
    await engine.update_weights(model.state_dict(), version=1)

Every generation is labelled with the version of the weights that produced all of its tokens: a weight
update closes the gate to new requests, lets the admitted ones finish, swaps the weights and reopens.

vllm is imported lazily so vigorl_core stays importable without it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Vision tokens the policy must never sample: a generated `<|image_pad|>` breaks the training forward.
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call (n > 1 = a GRPO group sharing one prompt prefill)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    regex: str | None = None  # constrain the output to a regular expression (structured outputs)
    allowed_token_ids: tuple[int, ...] = ()  # sample only these tokens (a logits mask; no grammar)


@dataclass
class Generation:
    """One sampled continuation: the engine's ids verbatim, their text, raw log-probs, why it stopped."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS, stop string or stop token), "length" or "abort"
    stop_reason: str | int | None = None
    policy_version: int = 0
    engine_seconds: float = 0.0  # from the request's admission to its last token, inside the engine's process


class PolicyEngine(Protocol):
    """What rollouts need from a policy, wherever it runs (in-process vLLM, a Serve replica, a fake)."""

    version: int

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]: ...

    async def abort(self, request_id: str) -> None: ...

    async def update_weights(self, state_dict: Mapping[str, Any], version: int) -> int: ...


class TimedPolicy:
    """A PolicyEngine that adds up, over the generate calls of one request, their wall time (`seconds`) and the
    time the engine itself reported (`engine_seconds`, the longest of a call's samples, which run together): the
    difference is what the hops to the engine cost (a Serve handle, the image protocol). Used to time requests."""

    def __init__(self, engine: PolicyEngine):
        self.engine, self.seconds, self.engine_seconds = engine, 0.0, 0.0

    @property
    def version(self) -> int:
        return self.engine.version

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        started = time.perf_counter()
        generations = await self.engine.generate(prompt_ids, images, sampling, request_id)
        self.seconds += time.perf_counter() - started
        self.engine_seconds += max((g.engine_seconds for g in generations), default=0.0)
        return generations

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def update_weights(self, state_dict: Mapping[str, Any], version: int) -> int:
        return await self.engine.update_weights(state_dict, version)


@dataclass
class EngineConfig:
    """How to start a vLLM engine. None = chosen for the device vLLM runs on (`engine_args`): fast on a GPU
    (compiled, bf16, rollout-sized batches), small and eager on CPU (tests, the tiny model)."""

    model: str
    max_model_len: int = 4096
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    # None: CUDA graphs + torch.compile on GPU (decode step 40 ms -> 9-11 ms at batch 64 on an H200, start
    # 23 s -> 67 s), eager on CPU (start 16.5 s instead of 62 s; tests).
    enforce_eager: bool | None = None
    seed: int = 0
    max_images_per_prompt: int = 8
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # Each turn re-sends the whole conversation: prefix caching reuses the KV of the earlier turns (their
    # images included: block hashes cover the image content), so only the new observation is prefilled.
    enable_prefix_caching: bool = True
    # None: 1024 on GPU (vllm.LLM's offline default on H100/H200: a GRPO step of 128 prompts x 8 fits),
    # 256 on CPU.
    max_num_seqs: int | None = None
    # None: 16384 on GPU (vllm.LLM's offline default; AsyncLLM's own default of 2048 throttles the prefill
    # of 576-token crops), vLLM's default on CPU. Chunked prefill stays on (vLLM's default for Qwen2.5-VL).
    max_num_batched_tokens: int | None = None
    # Front-end cache of processed images, by content hash: a conversation's earlier images are not
    # re-processed on each turn (vLLM's default size 4 GiB; 0 turns it off).
    mm_processor_cache_gb: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict)  # any other vllm AsyncEngineArgs field

    def engine_args(self, gpu: bool) -> dict[str, Any]:
        """The AsyncEngineArgs keywords for a GPU (`gpu=True`) or CPU vLLM, with every None resolved."""
        eager = (not gpu) if self.enforce_eager is None else self.enforce_eager
        args = dict(
            model=self.model, tokenizer=self.model, dtype=self.dtype or ("bfloat16" if gpu else "float32"),
            max_model_len=self.max_model_len, enforce_eager=eager, seed=self.seed,
            limit_mm_per_prompt={"image": self.max_images_per_prompt, "video": 0},
            gpu_memory_utilization=self.gpu_memory_utilization, tensor_parallel_size=self.tensor_parallel_size,
            enable_prefix_caching=self.enable_prefix_caching,
            max_num_seqs=self.max_num_seqs or (1024 if gpu else 256),
            mm_processor_cache_gb=self.mm_processor_cache_gb,
            logprobs_mode="raw_logprobs", worker_extension_cls="vigorl_core.rollout.engine_worker.WeightLoader",
        )
        batched = self.max_num_batched_tokens or (16384 if gpu else None)
        if batched:
            args["max_num_batched_tokens"] = batched
        return {**args, **self.extra}


class VLLMEngine:
    """PolicyEngine over an in-process `vllm.v1.engine.async_llm.AsyncLLM`."""

    def __init__(self, llm: Any, config: EngineConfig, suppressed_token_ids: list[int]):
        self._llm = llm
        self.config = config
        self.version = 0
        self._suppress = {token_id: -100.0 for token_id in suppressed_token_ids}
        self._ids = itertools.count()
        self._weights_lock = asyncio.Lock()
        # Admission gate: requests pass it (and read `version`) only while no weight update runs; an update
        # waits until the admitted requests are done, so a label can never name weights a request did not use.
        self._open = asyncio.Event()
        self._open.set()
        self._admitted = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._image_ids = ImageIds()

    @classmethod
    async def create(cls, config: EngineConfig) -> VLLMEngine:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.platforms import current_platform

        gpu = current_platform.is_cuda_alike()
        if not gpu:
            # On CPU, vLLM gives its model worker a process of its own unless V1 multiprocessing is off; off, the
            # worker runs inside the EngineCore process (which AsyncLLM still starts): one process fewer to spawn
            # and import torch and vLLM into, about 10 s of every engine start on 2 cores, same tokens. Setting
            # VLLM_ENABLE_V1_MULTIPROCESSING=1 restores vLLM's default.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args = AsyncEngineArgs(**config.engine_args(gpu=gpu))
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        suppressed = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS if t in tokenizer.get_vocab()]
        return cls(llm, config, suppressed)

    def _sampling_params(self, sampling: Sampling, stream: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=True, seed=sampling.seed, logprobs=0 if sampling.logprobs else None,
            logit_bias=dict(self._suppress) or None, skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None,
            allowed_token_ids=list(sampling.allowed_token_ids) or None,
        )

    async def _outputs(self, prompt_ids: Sequence[int], images: Sequence[Any], params: Any, request_id: str):
        """Submit token ids (one `<|image_pad|>` per image) plus images; vLLM's stream of outputs.
        Closing the stream early (a client that went away) aborts the request inside vLLM.

        Off the event loop (which also runs vLLM's output handling and the callers' other requests): the images'
        content ids (`ImageIds`, passed as `multi_modal_uuids`, so vLLM does not hash a conversation's images again
        on every turn) and vLLM's input processing (the HF image processor on new images; its renderer thread, as
        vLLM's OpenAI server does). AsyncLLM.generate given a raw prompt processes it on the loop."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_ids)}
        if images:
            prompt["multi_modal_data"] = {"image": list(images)}
            prompt["multi_modal_uuids"] = {"image": await self._image_ids.of(images)}
            (prompt,) = await self._llm.renderer.render_cmpl_async([prompt])
        stream = self._llm.generate(prompt, params, f"{request_id}-{next(self._ids)}-{uuid.uuid4().hex[:8]}")
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # a consumer that stops early: vLLM aborts the request now, not at collection

    async def _admit(self) -> int:
        """Wait while weights are being swapped, then count the request in; returns the version it runs on."""
        while not self._open.is_set():
            await self._open.wait()
        self._admitted += 1
        self._idle.clear()
        return self.version

    def _release(self) -> None:
        self._admitted -= 1
        if self._admitted == 0:
            self._idle.set()

    async def _final_output(self, prompt_ids: Sequence[int], images: Sequence[Any], params: Any, request_id: str):
        final = None
        async for output in self._outputs(prompt_ids, images, params, request_id):
            final = output
        return final

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        version = await self._admit()
        started = time.perf_counter()
        try:
            final = await self._final_output(prompt_ids, images, self._sampling_params(sampling), request_id or "gen")
        finally:
            self._release()
        seconds = time.perf_counter() - started
        if final is None:
            return []
        generations = []
        for completion in sorted(final.outputs, key=lambda c: c.index):
            logprobs = None
            if sampling.logprobs and completion.logprobs is not None:
                logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
            generations.append(Generation(
                token_ids=list(completion.token_ids), text=completion.text, logprobs=logprobs,
                finish_reason=completion.finish_reason or "abort", stop_reason=completion.stop_reason,
                policy_version=version, engine_seconds=seconds,
            ))
        return generations

    async def stream(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                     request_id: str | None = None) -> AsyncIterator[Generation]:
        """Generate one sample (n must be 1) and yield what each engine step added: new ids, their text
        and log-probs; the last delta carries the finish reason ("" before it)."""
        if sampling.n != 1:
            raise ValueError(f"stream generates one sample, got n={sampling.n}")
        version = await self._admit()
        try:
            async for output in self._outputs(prompt_ids, images, self._sampling_params(sampling, stream=True),
                                              request_id or "stream"):
                completion = output.outputs[0]
                logprobs = None
                if sampling.logprobs and completion.logprobs is not None:
                    logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
                yield Generation(token_ids=list(completion.token_ids), text=completion.text, logprobs=logprobs,
                                 finish_reason=completion.finish_reason or "", stop_reason=completion.stop_reason,
                                 policy_version=version)
        finally:
            self._release()

    async def score(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], list[float | None]]:
        """Teacher-forced log-probs of a whole sequence: (the engine's expanded ids, the log-prob of each id
        given the ones before it; None for the first). Raw log-probs, no sampling constraints applied."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        await self._admit()
        try:
            final = await self._final_output(prompt_ids, images, params, "score")
        finally:
            self._release()
        ids = list(final.prompt_token_ids)
        logprobs = [None if step is None else step[token].logprob for token, step in zip(ids, final.prompt_logprobs)]
        return ids, logprobs

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def update_weights(self, state_dict: Mapping[str, Any], version: int) -> int:
        """Load `state_dict` (HF parameter names) into the running engine as `version` (the weight store's
        number) and return it: written to a temporary safetensors file (in /dev/shm when it has room, else
        the temp folder), then `update_weights_from_file`."""
        import tempfile

        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
        with tempfile.TemporaryDirectory(dir=weights_folder(tensors), prefix="vigorl-weights-") as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            await asyncio.to_thread(save_file, tensors, path)
            return await self.update_weights_from_file(path, version)

    async def update_weights_from_file(self, path: str, version: int) -> int:
        """Load a safetensors file of HF-named weights into the running engine as `version` and return it.
        New requests wait at the gate, admitted ones finish, the engine pauses, loads, clears its prefix and
        multimodal caches, and resumes.

        vLLM's worker processes read the file themselves: a path, not bytes, crosses the RPC (vLLM's message
        encoding stops at 4 GiB, and a 3B model in bf16 is 7.5 GB)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path} does not exist (on this node)")
        async with self._weights_lock:
            self._open.clear()
            try:
                await self._idle.wait()
                await self._llm.pause_generation(mode="wait", clear_cache=True)
                try:
                    await self._llm.collective_rpc("load_safetensors_file", args=(path,))
                    await self._llm.reset_prefix_cache()
                    await self._llm.reset_mm_cache()
                    self.version = version
                finally:
                    await self._llm.resume_generation()
            finally:
                self._open.set()
        return self.version

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit when vLLM's module globals are
            # already gone (a TypeError traceback after the program's last line); once is enough.
            llm.shutdown = lambda *args, **kwargs: None


class ImageIds:
    """Content ids of the images sent to an engine, computed once per image object (in a worker thread) and
    remembered while the object lives. A conversation re-sends all of its images on every turn, by reference: only
    a new crop is hashed. vLLM uses an id as the image's hash (processor, encoder and prefix caches), so an id must
    name the content: `image_hash` (mode, size, pixels). Images with a palette get None (vLLM hashes them itself:
    their pixels are palette indices). An image must not be changed in place after it was sent."""

    def __init__(self):
        self._ids: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._ids)

    async def of(self, images: Sequence[Any]) -> list[str | None]:
        from PIL import Image

        from vigorl_core.images import image_hash

        new = {id(im): im for im in images
               if isinstance(im, Image.Image) and im.palette is None and id(im) not in self._ids}
        if new:
            hashes = await asyncio.to_thread(lambda: [image_hash(im) for im in new.values()])
            for (key, im), digest in zip(new.items(), hashes):
                if key not in self._ids:
                    self._ids[key] = digest
                    weakref.finalize(im, self._ids.pop, key, None)
        return [self._ids.get(id(im)) for im in images]


def weights_folder(tensors: Mapping[str, Any]) -> str:
    """Where to write `tensors` as a weights file: /dev/shm (memory, no disk write) when it has room for them
    twice over, else the temp folder."""
    import shutil
    import tempfile

    need = 2 * sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else tempfile.gettempdir()
    except OSError:
        return tempfile.gettempdir()
