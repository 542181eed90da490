"""One bf16 trainer rank runs DeepSpeed's BF16 optimizer instead of ZeRO buckets
(vigorl_core.train.sft_train.deepspeed_config): the config, and a real DeepSpeed engine on CPU that steps, clips,
reports its gradient norm and resumes exactly from a checkpoint (what the SFT and GRPO jobs rely on when they
restart), and whose immediate gradient sums give the same weights as DeepSpeed's default, delayed ones, also when
summed in one pass (vigorl_core.train.grad_sums)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from jobs.common import REPO_ROOT
from vigorl_core.train.sft_train import deepspeed_config, uses_bf16_optimizer


def test_only_a_single_bf16_rank_leaves_zero():
    single = deepspeed_config(2, 2, 4, 1, True, 1.0, gpu=True)
    assert single["zero_optimization"]["stage"] == 1 and single["data_types"] == {"grad_accum_dtype": "fp32"}
    assert single["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert single["train_batch_size"] == 8
    for stage, world, bf16, offload in ((2, 2, True, False), (3, 1, True, False), (2, 1, False, False),
                                        (2, 1, True, True), (0, 1, True, False)):
        config = deepspeed_config(stage, 1, 1, world, bf16, 1.0, offload_optimizer=offload)
        assert not uses_bf16_optimizer(stage, world, bf16, offload)
        assert config["zero_optimization"]["stage"] == stage and "data_types" not in config
        assert "immediate_grad_update" not in config["bf16"]


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, deepspeed
    from jobs.training import skip_cpu_shm_op
    from vigorl_core.train.grad_sums import fuse_bf16_grad_sums
    from vigorl_core.train.sft_train import deepspeed_config

    skip_cpu_shm_op()  # as the trainers do on CPU

    def engine(immediate=True, fused=False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = deepspeed_config(2, 1, 2, 1, True, 0.5)
        config["bf16"]["immediate_grad_update"] = immediate
        ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        assert fuse_bf16_grad_sums(ds.optimizer) if fused else True
        return ds

    def step(ds, seed):
        torch.manual_seed(seed)
        for _ in range(2):  # two accumulated micro-batches
            ds.backward(ds(torch.randn(1, 16, dtype=torch.bfloat16)).float().pow(2).sum())
            ds.step()
        return float(ds.get_global_grad_norm())

    def weights(ds):
        return [p.detach().float().flatten().tolist() for p in ds.module.parameters()]

    first = engine()
    start = weights(first)
    norms = [step(first, 1)]
    first.save_checkpoint(sys.argv[1], tag="state")
    norms.append(step(first, 2))
    resumed = engine()
    resumed.load_checkpoint(sys.argv[1], tag="state")
    norms.append(step(resumed, 2))
    delayed = engine(immediate=False)  # DeepSpeed's default: bf16 gradients summed after each backward
    delayed_norms = [step(delayed, 1), step(delayed, 2)]
    fused = engine(fused=True)  # one pass per gradient (grad_sums.add_into) instead of a cast and an add
    fused_norms = [step(fused, 1), step(fused, 2)]
    print(json.dumps({"optimizer": type(first.optimizer).__name__, "norms": norms, "moved": weights(first) != start,
                      "same_after_resume": weights(first) == weights(resumed),
                      "same_as_delayed": weights(first) == weights(delayed) and delayed_norms == norms[:2],
                      "same_when_fused": weights(first) == weights(fused) and fused_norms == norms[:2]}))
""")


def test_bf16_optimizer_steps_and_resumes_exactly(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29571", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["optimizer"] == "BF16_Optimizer"
    assert all(n > 0 for n in result["norms"]) and result["moved"]
    assert result["norms"][1] == result["norms"][2] and result["same_after_resume"]
    assert result["same_as_delayed"] and result["same_when_fused"]
