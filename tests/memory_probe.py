"""Working memory of real calls, measured in a fresh process: `working_memory(setup, calls)`.

Each call runs twice in a new Python process on the active Keras backend: once to compile and
warm, then again while a thread samples the resident memory (`/proc/self/statm`) every half
millisecond. What a call needs beyond what the process held just before it (the peak above that
baseline) is its working memory, the result included. The process is set up so that memory a call
frees goes back to the system, and the next call must take it again where it is seen:
`MALLOC_MMAP_THRESHOLD_` (every large block its own mapping, unmapped when freed) and
`MALLOC_TRIM_THRESHOLD_`, and oneDNN off on TensorFlow (its primitive and scratchpad caches keep
memory across calls: a 660 MB working set measured 11 MB with them).

Run as a script it reads `{"setup": ..., "calls": {name: expression}}` as JSON on stdin and writes
`{name: {"peak": bytes, "result": bytes}}` as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def working_memory(setup: str, calls: dict[str, str], timeout: float = 300) -> dict[str, dict]:
    """`{name: {"peak": bytes, "result": bytes}}` for each expression in `calls`, evaluated after
    `setup` (Python source run once, whose names the expressions use) in a fresh process.

    `peak`: the resident memory the measured run added at its highest, above what the process held
    just before it; `result`: the bytes of what the expression returned (a tensor, a structure of
    tensors, or anything with `nbytes`), held at the end of the run and so part of `peak`.
    """
    src = str(Path(__file__).parent.parent / "src")
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps({"setup": setup, "calls": calls}),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leaves(result) -> list:
    import keras

    if keras.ops.is_tensor(result):
        return [result]
    if hasattr(result, "nbytes"):  # NumPy, or a result type that counts its own bytes
        return []
    return keras.tree.flatten(result)


def _nbytes(result) -> int:
    import keras
    import numpy as np

    if hasattr(result, "nbytes") and not keras.ops.is_tensor(result):
        return int(result.nbytes)
    leaves = _leaves(result)
    return sum(
        int(np.prod(leaf.shape)) * np.dtype(keras.backend.standardize_dtype(leaf.dtype)).itemsize
        for leaf in leaves
    )


def _measure(expression: str, names: dict) -> dict:
    import gc
    import threading

    eval(expression, names)  # compile and warm
    gc.collect()
    base = _rss()
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss() - base)
            stop.wait(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = eval(expression, names)
        for leaf in _leaves(result):  # JAX dispatches asynchronously: the work is done by now
            if hasattr(leaf, "block_until_ready"):
                leaf.block_until_ready()
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, _rss() - base)
    measured = {"peak": peak, "result": _nbytes(result)}
    del result
    gc.collect()
    return measured


def _main() -> None:
    spec = json.loads(sys.stdin.read())
    names: dict = {}
    exec(spec["setup"], names)
    print(json.dumps({name: _measure(expr, names) for name, expr in spec["calls"].items()}))


if __name__ == "__main__":
    _main()
