"""Training pieces without Ray: sft_data (token ids with assistant-only labels, batches), sft_train (model
preparation, optimizer settings), grpo (advantages, clipped loss, KL), grpo_batch (rollouts -> micro-batches),
grpo_metrics (what a GRPO step logs), vision_attention (the ViT's window attention in batched SDPA calls),
vision_speed (the ViT's blocks compiled), kernels (the language model's fused kernels), device_batch (a batch and
forward inputs without host waits), grad_sums (DeepSpeed's fp32 gradient sums in one pass)."""
