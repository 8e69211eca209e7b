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


def cpu_description() -> str:
    """The CPU's model name and the number of cores this process may use."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"{name}, {cores} core(s)"
