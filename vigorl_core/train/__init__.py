"""Training pieces without Ray: sft_data (token ids with assistant-only labels, batches), sft_train (model
preparation, optimizer settings), grpo (advantages, clipped loss, KL), grpo_batch (rollouts -> micro-batches),
grpo_metrics (what a GRPO step logs), vision_attention (the ViT's window attention in batched SDPA calls)."""
