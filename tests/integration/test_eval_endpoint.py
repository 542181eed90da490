"""`vigorl eval --policy.endpoint` against the session's own `vigorl serve` HTTP endpoint (tiny model): the
predictions file, metrics and resume of the in-cluster path, and greedy text equal to the in-cluster rollout of
the same samples through the app's PolicyServer handle (the prompts rendered by the server's chat template are
the driver's)."""

from __future__ import annotations

import asyncio
import json

import pytest

from jobs import evaluate as job
from vigorl_core.evals import evaluation as E
from vigorl_core.config import ConfigError
from vigorl_core.data import load_samples
from vigorl_core.synthetic.tasks import write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint_run(serve_app, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("endpoint")
    files = {"synthetic_grounding": write_dataset("grounding", 3, 0, root / "grounding"),
             "synthetic_visual_search": write_dataset("visual_search", 2, 0, root / "visual_search")}
    cfg = job.EvalConfig.model_validate({
        "run_name": "endpoint", "runs_dir": str(root / "runs"), "model": str(tiny_model_dir),
        "benchmarks": [{"name": n, "path": str(p)} for n, p in files.items()],
        # greedy, one conversation at a time: the engine computes each request alone, as in the comparison below
        "sampling": {"temperature": 0.0, "max_tokens_per_turn": 24, "max_response_tokens": 1024, "max_images": 4},
        "policy": {"endpoint": serve_app.url + "/v1", "api_key": serve_app.token}, "concurrency": 1,
        "examples": 0})
    stats = job.evaluate(cfg)
    return cfg, stats, root / "runs" / "eval" / "endpoint", files


def test_predictions_metrics_and_resume(endpoint_run):
    cfg, stats, run_dir, files = endpoint_run
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    preds = [E.Prediction.model_validate_json(line) for line in lines]
    expected = {E.sample_key(s) for p in files.values() for s in load_samples(p, check_images=False)}
    assert {p.key for p in preds} == expected and len(preds) == 5
    assert stats["evaluated"] == 5 and stats["errors"] == 0, [p.metadata for p in preds if p.finish == "error"]
    assert {p.policy for p in preds} == {"tiny"}  # the name the endpoint serves
    assert {p.mode for p in preds if p.benchmark == "synthetic_visual_search"} == {"multiturn"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["run"]["evaluated"] == 5 and metrics["run"]["served_model"] == "tiny"
    assert "api_key" not in (run_dir / "config.yaml").read_text()
    again = job.evaluate(cfg)  # rerunning resumes: nothing is sent twice
    assert again["skipped"] == 5 and again["evaluated"] == 0
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 5


def test_same_text_as_the_in_cluster_path(endpoint_run, tiny_model_dir):
    from ray import serve

    from jobs.serve import APP_NAME
    from services.policy import PolicyClient
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.images import model_frame_images
    from vigorl_core.rollout.driver import RolloutDriver

    cfg, _, run_dir, files = endpoint_run
    by_key = {p.key: p for p in E.read_predictions(run_dir / "predictions.jsonl").predictions}
    chat = ChatTokens.from_pretrained(tiny_model_dir)
    client = PolicyClient(serve.get_deployment_handle("PolicyServer", APP_NAME))

    async def in_cluster(entry, sample):
        driver = RolloutDriver(client, chat, job.rollout_config(cfg, entry))
        images, frame = model_frame_images(sample.images, chat.profile)
        [rollout] = await driver.rollout_group(driver.prepare(sample, images, frame))
        return rollout.record.text

    for entry in cfg.benchmarks:
        for sample in load_samples(files[entry.name]):
            text = asyncio.run(in_cluster(entry, sample))
            # the gateway also stops at <|endoftext|> (and drops it); the bare engine generates on past it
            assert text.split("<|endoftext|>")[0] == by_key[E.sample_key(sample)].text, sample.id


def test_a_wrong_key_stops_the_job_with_the_servers_message(endpoint_run):
    cfg, *_ = endpoint_run
    denied = cfg.model_copy(update={"run_name": "denied",
                                    "policy": cfg.policy.model_copy(update={"api_key": "wrong"})})
    with pytest.raises(ConfigError, match=r"policy.endpoint: GET .*/v1/models answered 401: .*bearer token"):
        job.evaluate(denied)
