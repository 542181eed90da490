"""Faults that tests inject into jobs, to check that a run survives them. They are not config fields (no user
sees them in a config file or in --help): a test sets VIGORL_FAULTS for the job, a JSON object of the faults
below, and each fires once per run folder (jobs.training.first_fault marks it).

    env = {**os.environ, "VIGORL_FAULTS": '{"kill_policy_after": 1}'}     # a job run as a subprocess
    monkeypatch.setenv("VIGORL_FAULTS", '{"actor_exit_after": 2}')        # a job run in the test's process

| fault | job | what happens |
|---|---|---|
| `actor_exit_after` | eval | the first EvalActor to finish this many samples exits abruptly (os._exit) |
| `kill_policy_after` | eval, mcts | once this many samples (trees) are done, one PolicyServer replica is killed |
| `trainer_exit_at_step` | sft, grpo | the last trainer rank exits abruptly before this step |
| `kill_replay_at_step` | grpo | the replay buffer actor is killed while this step rolls out (it restarts empty) |
| `kill_policy_at_step` | grpo | one PolicyServer replica is killed while this step rolls out (Serve replaces it) |

The job's driver reads them (`requested_faults`) and hands them to its actors and trainer workers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vigorl_core.config import ConfigError

ENV = "VIGORL_FAULTS"


class Faults(BaseModel):
    """The faults of the table above; None: not injected."""

    model_config = ConfigDict(extra="forbid")
    actor_exit_after: int | None = Field(None, ge=1)
    kill_policy_after: int | None = Field(None, ge=1)
    trainer_exit_at_step: int | None = Field(None, ge=1)
    kill_replay_at_step: int | None = Field(None, ge=1)
    kill_policy_at_step: int | None = Field(None, ge=1)


def requested_faults() -> Faults:
    """The faults VIGORL_FAULTS asks for (none when it is unset); a bad value is a ConfigError naming it."""
    try:
        return Faults.model_validate_json(os.environ.get(ENV) or "{}")
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{ENV}: {problems} (the faults are in jobs/faults.py)") from None


def kill_during_rollouts(faults: Faults, run_dir: Path, step: int, buffer, app: str, request) -> None:
    """GRPO, before `step` (0-based) trains: if it is a fault's step, request its rollouts, let them start, then
    kill the replay buffer (Ray restarts it empty) or one replica of the Serve app `app` (Serve replaces it)."""
    import ray

    from jobs.training import first_fault
    from services.app import kill_one_replica

    if step + 1 in (faults.kill_replay_at_step, faults.kill_policy_at_step):
        request()
        time.sleep(1.0)  # rollouts in flight
    if faults.kill_replay_at_step == step + 1 and first_fault(run_dir, "replay"):
        ray.kill(buffer, no_restart=False)
    if faults.kill_policy_at_step == step + 1 and first_fault(run_dir, "policy"):
        kill_one_replica(app)
