"""Evaluation without the model: evaluation (predictions, scoring, metrics, exactly-once bookkeeping),
benchmarks (the benchmark table), original_eval (the original project's output files), report (tables,
report.md, charts), behaviour (grounding behaviour of traces), trace_image (the annotated PNG of a trace)."""
