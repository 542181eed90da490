"""Engine and rollout defaults that decide GPU speed: what EngineConfig resolves to on a GPU and on CPU, and
when GRPO asks the engine for sampled-token log-probs (no vLLM needed)."""

from __future__ import annotations

import pytest

from jobs.grpo import GRPOConfig, _rollout_settings
from vigorl_core.rollout.engine import EngineConfig


def test_engine_defaults_are_compiled_and_rollout_sized_on_gpu():
    args = EngineConfig(model="m").engine_args(gpu=True)
    assert args["enforce_eager"] is False and args["dtype"] == "bfloat16"
    assert args["max_num_batched_tokens"] == 16384 and args["max_num_seqs"] == 1024
    assert args["enable_prefix_caching"] is True and args["mm_processor_cache_gb"] > 0
    assert args["logprobs_mode"] == "raw_logprobs"


def test_engine_defaults_stay_eager_and_small_on_cpu():
    args = EngineConfig(model="m").engine_args(gpu=False)
    assert args["enforce_eager"] is True and args["dtype"] == "float32" and args["max_num_seqs"] == 256
    assert "max_num_batched_tokens" not in args  # vLLM's own CPU default


def test_explicit_settings_and_extra_win():
    config = EngineConfig(model="m", enforce_eager=True, dtype="float16", max_num_seqs=64, max_num_batched_tokens=4096,
                          extra={"async_scheduling": True})
    args = config.engine_args(gpu=True)
    assert (args["enforce_eager"], args["dtype"], args["max_num_seqs"]) == (True, "float16", 64)
    assert args["max_num_batched_tokens"] == 4096 and args["async_scheduling"] is True


def _grpo(**kw) -> GRPOConfig:
    return GRPOConfig(model="tiny", data="synthetic", rollout_batch_size=2, group_size=2, micro_batch_size=1, **kw)


def test_grpo_asks_for_engine_logprobs_only_when_off_policy():
    assert _rollout_settings(_grpo())["logprobs"] is False
    assert _rollout_settings(_grpo(max_staleness=1))["logprobs"] is True
    assert _rollout_settings(_grpo(engine_logprobs=True))["logprobs"] is True


def test_grpo_rejects_async_without_engine_logprobs():
    with pytest.raises(ValueError, match="engine_logprobs"):
        _grpo(max_staleness=2, engine_logprobs=False)


def test_image_ids_name_the_content_once_per_image_object():
    import asyncio
    import gc

    from PIL import Image

    from vigorl_core.images import image_hash
    from vigorl_core.rollout.engine import ImageIds

    async def main():
        ids = ImageIds()
        red, blue = Image.new("RGB", (28, 28), "red"), Image.new("RGB", (28, 28), "blue")
        twin = Image.new("RGB", (28, 28), "red")  # another object, same content: same id
        palette = Image.new("P", (28, 28))
        assert await ids.of([red, blue, twin, palette]) == [image_hash(red), image_hash(blue), image_hash(red), None]
        assert len(ids) == 3  # the palette image is left to vLLM's own hash
        assert await ids.of([blue, red]) == [image_hash(blue), image_hash(red)]
        del twin, palette
        gc.collect()
        assert len(ids) == 2  # forgotten with the image: no stale id for a reused object id
        return ids

    ids = asyncio.run(main())
    gc.collect()
    assert len(ids) == 0
