"""The offline pipeline's material: tasks (deterministic synthetic tasks), tiny (random-weight Qwen2.5-VL
models of real shapes), chains (written grounded SFT chains), teacher (the quickstart teacher's data),
quickstart_report (the quickstart's report from its run folders)."""
