"""Free memory of the accelerator the active Keras backend computes on, where it can tell.

Part of `jacket.backends` (the only place a framework is imported), kept apart from the per-backend
modules because it is asked for before any of them is needed.
"""

from __future__ import annotations


def device_free_memory(name: str) -> int | None:
    """Free bytes on the backend's first accelerator; None on CPU or when the backend cannot tell
    (TensorFlow reports the memory it uses, not what is free)."""
    try:
        if name == "torch":
            import torch

            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info()
                return int(free)
        elif name == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "cpu":
                stats = device.memory_stats() or {}
                if "bytes_limit" in stats:
                    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 - a driver that cannot answer: fall back to host memory
        return None
    return None
