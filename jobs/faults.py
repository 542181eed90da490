"""The faults GRPO's fault tests inject while a step rolls out: the replay buffer actor or one PolicyServer
replica is killed, once per run folder (jobs.training.first_fault marks it). Set by the testing fields of
GRPOConfig (`fail_replay_at_step`, `fail_policy_at_step`); tests/integration/test_grpo_job.py uses them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def kill_during_rollouts(cfg: Any, run_dir: Path, step: int, buffer, app: str, request) -> None:
    """Before `step` (0-based) trains: if it is the configured step, request its rollouts, let them start, then
    kill the replay buffer (Ray restarts it empty) or one replica of the Serve app `app` (Serve replaces it)."""
    import ray

    from jobs.training import first_fault
    from services.app import kill_one_replica

    if step + 1 in (cfg.fail_replay_at_step, cfg.fail_policy_at_step):
        request()
        time.sleep(1.0)  # rollouts in flight
    if cfg.fail_replay_at_step == step + 1 and first_fault(run_dir, "replay"):
        ray.kill(buffer, no_restart=False)
    if cfg.fail_policy_at_step == step + 1 and first_fault(run_dir, "policy"):
        kill_one_replica(app)
