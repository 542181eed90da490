"""Rollouts: the policy engine over vLLM, the token contract, and the driver of grounded conversations.

engine (PolicyEngine over vLLM's AsyncLLM), engine_worker (methods vLLM mixes into its workers), chat_tokens
(conversation pieces as token ids), driver (many conversations at once, single- or multi-turn), planned (an
engine that follows a zoom plan, for tests and benches of random-weight models), openai_policy (the
PolicyEngine over an OpenAI-compatible endpoint).
"""
