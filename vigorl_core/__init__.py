"""vigorl_core: pure logic of ViGoRL (grounded visual reasoning), importable without Ray.

The shared vocabulary sits at the top; each stage of the method has a subpackage.

Top level:
    records        pydantic records that cross stages: samples, points, traces
    config         stage configs: pydantic models from YAML plus command-line overrides
    frames         Qwen2.5-VL smart-resize, point and box mapping between frames
    images         untrusted bytes -> decoded images with limits; the model-frame images and their hash
    protocol       parse model text into a Trace, render chains back to text
    prompts        system prompts (task x mode), the user-text layout, the zoom observation text
    zoom           the crop environment: settings per task and profile, crop geometry, image budget
    rewards        rule rewards for GRPO and judges for MCTS and evaluation
    data           load and write samples: our JSONL and the original project's three schemas
    sample_fields  options, answers, task and category read from a record's text and paths
    charts         report charts with matplotlib (PNG + SVG)

rollout/   engine (vLLM AsyncLLM), engine_worker (collective_rpc methods), chat_tokens (the token contract),
           driver (single- and multi-turn conversations), planned (zoom-plan test engine), openai_policy
search/    mcts (tree search with a teacher), trees (tree records), linearize (trees -> SFT chains)
train/     sft_data, sft_train, grpo (loss math), grpo_batch, grpo_metrics, vision_attention (batched ViT windows),
           vision_speed, kernels, device_batch, grad_sums (trainer speed)
evals/     evaluation (predictions, scores, metrics), benchmarks (the table), original_eval, report,
           behaviour (grounding behaviour), trace_image (annotated PNG of a trace)
synthetic/ tasks (deterministic synthetic tasks), tiny (random-weight models), chains (written SFT chains),
           teacher (the quickstart teacher's data), base (the quickstart base's data), quickstart_report
"""
