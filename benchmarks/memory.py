"""`memory_budget=` at work: peak memory of one Jacobian with and without a budget.

Each run is a fresh process (peak resident memory is per process), on an image-to-image model whose
unchunked Jacobian needs far more working memory than the budget: 3 x Conv2D 3x3 "same" with 16
channels on 48x48x1, batch 2, so `J` is `(2, 48, 48, 1, 48, 48, 1)`, 42 MB in float32. Reported:
the plan, the time, the peak resident memory above the process's state before the call, the size
of the result, and the working memory beyond the result (peak minus result), next to the budget.

Run: `python benchmarks/memory.py` (one backend: KERAS_BACKEND), or through `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BUDGETS = [None, "64MB", "16MB"]


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(budget: str | None) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import jacket

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((48, 48, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(16, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(1, 3, padding="same"),
        ]
    )
    x = np.random.default_rng(0).random((2, 48, 48, 1)).astype("float32")
    model(x)  # built and run once: the weights and the framework's start-up are in the baseline
    from jacket.checks import format_bytes
    from jacket.engine.memory import default_memory_budget

    jac = jacket.jacobian_fn(model, memory_budget=budget)
    plan = jac.plan(x)
    base = _rss()
    start = time.perf_counter()
    J = keras.ops.convert_to_numpy(jac(x))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    weights = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    return {
        "backend": keras.backend.backend(),
        "budget": budget or f"default ({format_bytes(default_memory_budget())})",
        "plan": plan.describe(),
        "seconds": seconds,
        "peak_mb": peak / 2**20,
        "result_mb": J.nbytes / 2**20,
        "working_mb": (peak - J.nbytes) / 2**20,
        "model_mb": weights / 2**20,
        "checksum": float(np.abs(J).sum()),
    }


def run() -> list[dict]:
    rows = []
    for budget in BUDGETS:
        command = [sys.executable, __file__, "--child"] + ([budget] if budget else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    same = len({round(row["checksum"], 3) for row in rows}) == 1
    for row in rows:
        row["same_result"] = same
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'backend':<11}{'budget':<17}{'s':>7}{'peak MB':>9}{'J MB':>7}{'work MB':>9}  plan")
    for r in rows:
        print(
            f"{r['backend']:<11}{r['budget']:<17}{r['seconds']:>7.2f}{r['peak_mb']:>9.0f}"
            f"{r['result_mb']:>7.0f}{r['working_mb']:>9.0f}  {r['plan']}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="?", const="none", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(None if args.child == "none" else args.child)))
        return 0
    rows = run()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
