"""vigorl_core: pure logic of ViGoRL (grounded visual reasoning), importable without Ray.

Modules: records (pydantic records), frames (smart-resize, frame mapping), protocol (parse/render model
text), zoom (crop environment), rewards (reward registry and judges), prompts (system prompts), data
(loaders/writers), synthetic (deterministic tasks), tiny (random-weight Qwen2.5-VL models).
"""
