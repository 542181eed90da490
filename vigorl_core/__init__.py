"""vigorl_core: pure logic of ViGoRL (grounded visual reasoning), importable without Ray.

Modules: records (pydantic records), frames (smart-resize, frame mapping), protocol (parse/render model
text), zoom (crop environment), rewards (reward registry and judges), prompts (system prompts), data
(loaders/writers), sample_fields (options, answers, task and category from text and paths), images (decoding,
the model-frame images and their hash), benchmarks (the benchmark table), evaluation (predictions, scores,
metrics), trees (MCTS tree records), charts (report charts, PNG + SVG), synthetic (deterministic tasks), tiny
(random-weight Qwen2.5-VL models), among others.
"""
