"""One module per pipeline stage; `vigorl` (jobs.cli) dispatches to them. Shared by the stages: common (the
environment, output routing, model folder, resume check), progress (the tqdm bar with ETA), faults (the faults
tests inject through VIGORL_FAULTS), training (the trainers' DeepSpeed engine, checkpoints and run log)."""
