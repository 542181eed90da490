"""What every job needs before it starts: the process environment, the error style, where its output goes,
the model folder, the resume check and the run folders of the stages before it.

The environment defaults are the ones measured to work for vLLM on CPU and Ray on small machines; a variable
the user already set is left alone.

Output: at default verbosity a job's terminal shows its own lines (stage lines, progress, the result table)
and everything else (engine, Ray and library logs, Python warnings, native output) goes to job.log in its run
folder (log_to_run_folder); `--verbose` on any job shows it all on the terminal instead.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from vigorl_core.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

# A line a job's Ray worker writes for the terminal (training progress through the `vigorl` loggers) carries
# this mark; the driver shows those lines and sends the workers' other lines to job.log.
JOB_LINE = ":vigorl:"
VERBOSE_HELP = ("  --verbose\n      also show engine, Ray and library logs on the terminal (by default they go to "
                "job.log in the run folder)")


def set_runtime_env() -> None:
    """Default environment for local runs: offline hub, one OMP thread, vLLM CPU cache, Ray auth off (for a
    Ray this job starts; a job on a cluster, RAY_ADDRESS set, keeps the cluster's authentication mode), and
    no colour codes in Ray's worker-line prefixes when stdout is not a terminal."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(REPO_ROOT / ".vllm-cache"),
        "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".torch_ext"),
    }
    if not os.environ.get("RAY_ADDRESS"):
        defaults["RAY_AUTH_MODE"] = "disabled"
    if not Path("/dev/nvidiactl").exists():  # DeepSpeed would otherwise look for CUDA
        defaults["DS_ACCELERATOR"] = "cpu"
    if not sys.stdout.isatty():
        defaults["RAY_COLOR_PREFIX"] = "0"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def local_model(model: str) -> str:
    """`model` as an absolute path when it names a local folder, else unchanged (a hub id). Ray Train
    workers run in their own working directory, so a relative path from the command line would not resolve
    there."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def settings_named(keys: Iterable[str]) -> Callable[[dict], dict]:
    """check_resume's `fixed` for settings given by name: those of `keys` that a config has."""
    return lambda config: {k: config[k] for k in keys if k in config}


def model_folder(model: str, runs_dir: str | Path) -> str:
    """The model a stage loads: 'tiny' is the tiny model in <runs_dir>/models/tiny (built when missing); a
    local folder becomes its absolute path (local_model); a hub id stays as it is. Raises ConfigError when its
    tokenizer and processor do not load, before anything starts."""
    from vigorl_core.rollout.chat_tokens import ChatTokens

    if model == "tiny":
        from vigorl_core.synthetic.tiny import build_tiny_model

        path = (Path(runs_dir) / "models" / "tiny").resolve()
        if not (path / "vigorl_model.json").is_file():
            build_tiny_model(path)
        model = str(path)
    try:
        ChatTokens.from_pretrained(model)
    except OSError as err:
        raise ConfigError(f"model: cannot load {model!r} (a model folder or hub id): {err}") from None
    return local_model(model)


def check_resume(run_dir: Path, config: dict, fixed: Callable[[dict], dict], made: str = "made",
                 save: bool = True) -> None:
    """Rerunning a run folder continues it, so what decides its results must not change: `fixed(config)`
    (settings by name) must equal `fixed` of the config.yaml saved there (a setting the old file lacks is
    not compared). Raises ConfigError naming the changed settings; then saves `config` as config.yaml (unless
    `save` is False: a trainer saves it once its data has loaded)."""
    import yaml

    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        before, now = fixed(yaml.safe_load(saved.read_text()) or {}), fixed(config)
        changed = [k for k in now if k in before and before[k] != now[k]]
        if changed:
            diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(f"run {run_dir} was {made} with different {diff}; use a new --run_name (or the "
                              f"settings in {saved})")
    if not save:
        return
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(config, sort_keys=False))


# ------------------------------------------------------------------------------------- the pipeline's inputs

# What a stage reads when its input is not given: the output of the stage before it under the same run name,
# as (field, [(stage before, file in its run folder)]); the first that exists wins, and the folder holding that
# file is the input (a tree folder, a chains folder, a checkpoint folder).
PREVIOUS = {
    "chains": ("trees", [("mcts", "trees.jsonl")]),
    "sft": ("data", [("chains", "train.json")]),
    "grpo": ("model", [("sft", "latest/config.json")]),
    "eval": ("model", [("grpo", "latest/config.json"), ("sft", "latest/config.json")]),
    "serve": ("model", [("grpo", "latest/config.json"), ("sft", "latest/config.json")]),
}


def previous_output(stage: str, runs_dir: str | Path, run_name: str) -> Path:
    """The default input of `stage` (PREVIOUS): e.g. for sft, <runs_dir>/chains/<run_name>. Raises ConfigError
    naming the paths looked at and the command that makes the first when none exists."""
    field, candidates = PREVIOUS[stage]
    paths = [Path(runs_dir) / before / run_name / output for before, output in candidates]
    for path in paths:
        if path.is_file():
            return path.parent
    commands = " or ".join(f"`vigorl {before} --run_name {run_name} ...`" for before, _ in candidates)
    raise ConfigError(f"{field}: not given, so {stage} reads the output of the stage before it with the same run "
                      f"name, but {' and '.join(str(p) for p in paths)} {'does' if len(paths) == 1 else 'do'} not "
                      f"exist: make it with {commands}, or pass --{field}")


# ------------------------------------------------------------------------------------------- where output goes

class _Output:
    """This process's output routing (one per process, as file descriptors are)."""

    verbose = False
    log: io.TextIOBase | None = None  # job.log while it takes the process's output
    terminal_err: io.TextIOBase | None = None  # the terminal's stderr meanwhile
    saved: tuple[int, int, object] | None = None  # fd 1, fd 2 and sys.stdout to put back
    ray_started = False  # init_ray started or joined Ray in this job
    ray_print = None  # Ray's own printing of worker lines, which init_ray replaces


_output = _Output()


class _Tee(io.TextIOBase):
    """sys.stdout while job.log takes the output: the job's own lines go to the terminal and the log."""

    def __init__(self, terminal: io.TextIOBase, log: io.TextIOBase):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return self.terminal.encoding


def is_verbose() -> bool:
    return _output.verbose


def log_to_run_folder(run_dir: str | Path) -> Path | None:
    """At default verbosity, from here to the end of the job, the process's output goes to <run_dir>/job.log:
    its file descriptors 1 and 2 (Python logging and warnings, Ray's and the engine's native logs, anything a
    library prints) and the lines of its Ray workers; sys.stdout (the job's own print()s) goes to the terminal
    and the log. Nothing changes with --verbose, or when the caller captures stdout itself (tests, an
    in-process caller). Returns the log's path when it takes the output."""
    if _output.verbose or _output.log is not None or sys.stdout is not sys.__stdout__:
        return None
    path = Path(run_dir) / "job.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - open to the end
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    _output.saved = (os.dup(1), os.dup(2), sys.stdout)
    terminal = open(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")  # noqa: SIM115
    _output.terminal_err = open(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _output.log = log
    sys.stdout = _Tee(terminal, log)
    print(f"logs: {path} (engine, Ray and library output; --verbose shows it here)", flush=True)
    return path


def _restore() -> None:
    """Put the process's output back where it was (the end of run_main)."""
    if _output.log is None:
        _output.ray_started = False
        return
    if _output.ray_started:  # Ray's shutdown logs (its core worker's last lines) belong in the log too
        import ray

        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    fd1, fd2, stdout = _output.saved
    os.dup2(fd1, 1)
    os.dup2(fd2, 2)
    os.close(fd1)
    os.close(fd2)
    # The streams stay open: a library may hold the tee as its stdout (colorama's exit hook does).
    sys.stdout = stdout
    _output.log = _output.terminal_err = _output.saved = None
    _output.ray_started = False


def _error(text: str) -> None:
    """An error line for the user: on the terminal's stderr, and in job.log when that takes the output."""
    print(text, file=_output.terminal_err or sys.stderr, flush=True)
    if _output.log is not None:
        _output.log.write(text + "\n")


def _take_verbose(argv: list[str]) -> list[str]:
    """argv without --verbose (also --verbose=true/false or --verbose true/false), which sets _output.verbose."""
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--verbose" and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false"):
            _output.verbose = argv[i + 1].lower() == "true"
            i += 2
            continue
        if arg == "--verbose" or arg.startswith("--verbose="):
            _output.verbose = arg.partition("=")[2].lower() in ("", "true")
        else:
            rest.append(arg)
        i += 1
    return rest


def run_main(body: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
    """Run a job body; configuration and input errors print one clear line instead of a traceback. Handles
    `--verbose` for every job (the body calls log_to_run_folder once its run folder is known)."""
    set_runtime_env()
    argv = _take_verbose(sys.argv[1:] if argv is None else argv)
    try:
        return body(argv) or 0
    except SystemExit:
        if "-h" in argv or "--help" in argv:
            print(VERBOSE_HELP)
        raise
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _error(f"error: {err}")
        return 2
    except Exception:
        if _output.log is None:
            raise
        _error(traceback.format_exc().rstrip() + f"\n(the job's log: {_output.log.name})")
        return 1
    finally:
        _restore()


# ------------------------------------------------------------------------------------------------------ Ray

def init_ray(num_cpus: int = 8, *, reuses: str | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (how `ray job submit` runs jobs), else start a local Ray with
    logical CPUs (Serve apps and trainers schedule fractional CPUs on a small machine). `reuses` names what the
    job takes from a running Ray (e.g. "policy.app 'vigorl'"): then, without RAY_ADDRESS, it joins the Ray
    already running on this machine (the one `vigorl serve` started) instead of starting another."""
    import ray

    if ray.is_initialized():
        return
    # Every worker of the job runs this hook (merged with a `ray job submit` runtime environment): it quiets Ray
    # Train's placement-group cleaner, which warns every few seconds where Ray runs without a dashboard (our
    # local Ray, to save memory and start-up time) because it cannot query the controller's state there, and
    # marks the lines of the `vigorl` loggers (training progress) for the terminal.
    quiet = {"worker_process_setup_hook": "jobs.common.quiet_worker_logs"}
    _route_worker_lines()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=quiet)
    elif reuses:
        try:
            ray.init(address="auto", runtime_env=quiet)
        except ConnectionError:
            raise ConfigError(f"{reuses} names a Serve app of a running Ray, but no Ray is running on this "
                              "machine: start the app first (e.g. `vigorl serve`), or set RAY_ADDRESS to the "
                              "cluster that runs it") from None
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=quiet)
    _output.ray_started = True


def _route_worker_lines() -> None:
    """Replace, before ray.init, Ray's printing of the lines of workers, the raylet and the autoscaler (a private
    function of Ray 2.60 that both its log thread and its error thread call; ray.init(log_to_driver=False) would
    also drop the training progress lines, and the error thread prints regardless)."""
    from ray._private import worker

    if worker.print_to_stdstream is not _worker_lines:
        _output.ray_print = worker.print_to_stdstream
        worker.print_to_stdstream = _worker_lines


def _worker_lines(data: dict, ignore_prefix: bool = False) -> None:
    """One batch of lines from Ray (a worker's, the raylet's errors, the autoscaler's): marked lines to the
    terminal (and log), the rest to job.log; with --verbose (or no job.log), Ray's own printing with the mark
    removed."""
    lines = data.get("lines", [])
    if _from_another_job(data):
        return
    if _output.log is None:
        _output.ray_print({**data, "lines": [line.replace(JOB_LINE, "", 1) for line in lines]}, ignore_prefix)
        return
    if data.get("pid") == "autoscaler":  # its status every few seconds: only events, as Ray prints them
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    who = " ".join(str(part) for part in (data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}")
                   if part)
    for line in lines:
        if JOB_LINE in line:
            sys.stdout.write(line.split(JOB_LINE, 1)[1] + "\n")
        else:
            _output.log.write(f"({who}) {line}\n")


def _from_another_job(data: dict) -> bool:
    """Lines of another job's worker: Ray Serve turns off Ray's filter of worker lines by job (its replicas run
    under the job that started Serve), so every job that uses Serve gets the lines of every job on the cluster,
    e.g. the other GRPO arm's training progress when the quickstart runs two stages at once. Serve's own actors'
    lines (replicas, controller, proxies: the engine's logs) are kept."""
    import ray

    job = data.get("job")
    if not job or not ray.is_initialized() or str(data.get("actor_name") or "").startswith(("Serve", "Proxy")):
        return False
    return job != ray.get_runtime_context().get_job_id()


def quiet_worker_logs() -> None:
    """Runs in every worker process of a job (see init_ray): Ray Train's cleaner logs errors only; the
    `vigorl` loggers' lines (rank 0's training progress) carry JOB_LINE, so the driver shows them."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    job = logging.getLogger("vigorl")
    if not job.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(JOB_LINE + "%(message)s"))
        job.addHandler(handler)
        job.setLevel(logging.INFO)
        job.propagate = False
