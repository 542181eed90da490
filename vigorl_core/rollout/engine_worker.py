"""Methods vLLM mixes into its worker processes (`worker_extension_cls`), reached by `collective_rpc`.

Kept in its own tiny module because every vLLM worker imports it.
"""

from __future__ import annotations


class WeightLoader:
    """Loads a safetensors file (HF parameter names) into the worker's model. A path, not tensors or bytes,
    crosses the RPC boundary: vLLM's utility-call encoder does not carry tensors intact and stops at 4 GiB."""

    def load_safetensors_file(self, path: str) -> int:
        from safetensors.torch import load_file

        runner = self.model_runner  # type: ignore[attr-defined]
        tensors = load_file(path)
        if hasattr(runner, "reload_weights"):
            # Layer-wise reload re-runs process_weights_after_loading: the CPU backend repacks linear
            # weights into kernel format after the first load, so a plain load_weights cannot target them.
            runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        else:
            model = runner.model
            device = next(model.parameters()).device
            model.load_weights(weights=((name, tensor.to(device)) for name, tensor in tensors.items()))
        return len(tensors)
