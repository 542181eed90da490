"""Critic: scores traces with the reward registry and, optionally, an LLM judge, as a Serve deployment.

Rule rewards are cheap and run in-process wherever rollouts run; the Critic exists for callers that
score over HTTP (`POST /v1/score`) or need the LLM judge for open answers (a second vLLM model hosted
by the Critic's replica; MCTS and evaluation can use it through the handle).

    critic = Critic.bind()                                      # rules only
    critic = Critic.bind({"model": "/models/Qwen2.5-VL-7B"})    # plus an LLM judge
    reward = await critic_handle.score.remote("grounding", "grounded", text, truth)
    n = await critic_handle.count.remote(judge_prompt("backtracking", question, reasoning))  # vigorl behaviour
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray import serve

from vigorl_core.rollout.engine import EngineConfig, Sampling, VLLMEngine
from vigorl_core.rewards import JUDGES, Truth, judge_for, reward_for

JUDGE_PROMPT = (
    "<|im_start|>system\nYou grade answers. Reply with 1 if the model answer means the same as the reference "
    "answer, otherwise 0.<|im_end|>\n<|im_start|>user\nQuestion: {question}\nReference answer: {reference}\n"
    "Model answer: {prediction}<|im_end|>\n<|im_start|>assistant\n"
)


@serve.deployment(name="Critic", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
class Critic:
    """Reward registry + judges; `judge_engine` (EngineConfig fields) hosts an LLM judge."""

    async def __init__(self, judge_engine: dict[str, Any] | None = None):
        self.judge_engine = None
        if judge_engine:
            from transformers import AutoTokenizer

            self.judge_engine = await VLLMEngine.create(EngineConfig(**judge_engine))
            self.judge_tokenizer = AutoTokenizer.from_pretrained(judge_engine["model"])

    def score(self, task: str, mode: str, text: str, truth: Truth) -> dict[str, Any]:
        """The training reward of a response (`mode` as the registry: grounded, multiturn, vanilla, ...)."""
        return asdict(reward_for(task, mode)(text, truth))

    def judge(self, task: str, answer: str | None, truth: Truth) -> dict[str, float]:
        """Evaluation judges of an extracted answer: `score` (strict) and `score_original` (the original's)."""
        strict, original = judge_for(task)
        return {"score": float(JUDGES[strict](answer, truth)), "score_original": float(JUDGES[original](answer, truth))}

    async def judge_llm(self, question: str, reference: str, prediction: str) -> float:
        """1.0 if the judge model says the prediction matches the reference, else 0.0 (constrained to 0/1)."""
        if self.judge_engine is None:
            raise RuntimeError("this Critic hosts no LLM judge (start it with judge_engine={'model': ...})")
        prompt = JUDGE_PROMPT.format(question=question, reference=reference, prediction=prediction)
        ids = self.judge_tokenizer.encode(prompt, add_special_tokens=False)
        [gen] = await self.judge_engine.generate(ids, [], Sampling(temperature=0.0, max_tokens=2, regex="[01]",
                                                                   logprobs=False))
        return 1.0 if gen.text.strip().startswith("1") else 0.0

    async def count(self, prompt: str) -> int | None:
        """The judge model's N for a behaviour-count prompt (vigorl_core.evals.behaviour.judge_prompt), its reply
        constrained to `<count>N</count>`; None if it could not say."""
        from vigorl_core.evals.behaviour import parse_count

        if self.judge_engine is None:
            raise RuntimeError("this Critic hosts no LLM judge (start it with judge_engine={'model': ...})")
        ids = self.judge_tokenizer.encode(prompt, add_special_tokens=False)
        [gen] = await self.judge_engine.generate(ids, [], Sampling(temperature=0.0, max_tokens=12,
                                                                   regex=r"<count>[0-9]{1,2}</count>", logprobs=False))
        return parse_count(gen.text)

    def __del__(self):
        engine = getattr(self, "judge_engine", None)
        if engine is not None:
            engine.shutdown()
