"""`make bench`: the anchor benchmark on every installed backend, one process each, one table.

Writes `bench-results/anchors-<backend>.json` and prints jacket's time next to each anchor's, and the
ratio to the best anchor that agrees with jacket (below 1.0: jacket is faster). Columns: steady-state
median ms, first call s (trace + compile + run), peak resident memory above the start of the case
(MB, sampled every ms), and jacket's time as a multiple of the FLOP limit: the counted forward FLOPs
of the batch times `1 + min(in_size, out_size)` passes, over the float32 matmul rate NumPy reaches on
this machine in the same run.

Then `benchmarks/sparse.py` (`--skip-sparse` leaves it out) and `benchmarks/training.py`: by default
the step time of a Jacobian penalty; `--training all` adds the PINN against DeepXDE, the WGAN-GP
critic and the digits sweep (tens of minutes on a laptop's CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import memory  # noqa: E402

FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def print_table(results: list[dict]) -> None:
    """One line per case: jacket (auto) and each forced strategy, the best anchor, the ratio."""
    print(
        f"{'backend':<11}{'case':<15}{'jacket ms':>10}{'first s':>8}{'peak MB':>8}{'xFLOP':>10}"
        f"{'replicate':>10}{'vmap':>9}{'loop':>9}{'autotune':>9}  "
        f"{'best anchor':<32}{'ms':>9}{'first s':>8}{'peak MB':>8}{'ratio':>7}"
    )
    for result in results:
        for row in result["rows"]:
            flop = row.get("x_flop_limit")
            strategies = row.get("strategies", {})
            cells = "".join(
                f"{strategies[name]['ms']:>{w}.2f}" if name in strategies else f"{'-':>{w}}"
                for name, w in (("replicate", 10), ("vmap", 9), ("loop", 9), ("autotune", 9))
            )
            timed = {n: a for n, a in row["anchors"].items() if "ms" in a and a["agrees"]}
            if timed:
                name, a = min(timed.items(), key=lambda item: item[1]["ms"])
                anchor = (
                    f"{name[:31]:<32}{a['ms']:>9.2f}{a['first_s']:>8.2f}{a['peak_mb']:>8.0f}"
                    f"{row['ratio_to_best']:>6.2f}x"
                )
            else:
                anchor = "no anchor agreed or ran"
            print(
                f"{row['backend']:<11}{row['case']:<15}{row['jacket_ms']:>10.2f}"
                f"{row['jacket_first_s']:>8.2f}{row['jacket_peak_mb']:>8.0f}"
                f"{(f'{flop:.3g}' if flop else '-'):>10}{cells}  {anchor}"
            )
            failed = [n for n, a in row["anchors"].items() if "ms" not in a or not a["agrees"]]
            for name in failed:
                a = row["anchors"][name]
                why = a.get("error") or f"disagrees with jacket ({a['max_rel_diff']:.1e})"
                print(f"{'':<26}{name}: {' '.join(why.split())[:90]}")
    ratios = [row["ratio_to_best"] for r in results for row in r["rows"] if row["ratio_to_best"]]
    if ratios:
        geomean = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
        print(f"geometric mean of jacket / best anchor over {len(ratios)} cases: {geomean:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory_budget runs")
    parser.add_argument("--skip-sparse", action="store_true", help="leave out benchmarks/sparse.py")
    parser.add_argument(
        "--training", nargs="*", default=["step"], choices=["step", "pinn", "wgan", "sweep", "all"],
        help="parts of benchmarks/training.py (default: the penalty's step time; `all`: also the "
        "PINN against DeepXDE, the WGAN-GP critic and the digits sweep, tens of minutes; none "
        "named: skip it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    results = []
    for backend in args.backends:
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        path = out / f"anchors-{backend}.json"
        command = [sys.executable, str(HERE / "anchors.py"), "--json", str(path)]
        command += ["--repeats", str(args.repeats)]
        if args.cases:
            command += ["--cases", *args.cases]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if backend == "jax":
            env["JAX_ENABLE_X64"] = "1"  # the float64 case is float64 only with it
        subprocess.run(command, check=True, env=env)
        results.append(json.loads(path.read_text()))

    print()
    print_table(results)
    if not args.no_memory:
        memory_rows = []
        for backend in args.backends:
            if importlib.util.find_spec(FRAMEWORK[backend]) is None:
                continue
            path = out / f"memory-{backend}.json"
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, str(HERE / "memory.py"), "--json", str(path)]
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            memory_rows += json.loads(path.read_text())
        print()
        print("memory_budget= (img2img 48x48, batch 2; one fresh process per row)")
        memory.print_table(memory_rows)

    if not args.skip_sparse:  # sparse Jacobians of image-to-image models: benchmarks/sparse.py
        command = [sys.executable, str(HERE / "sparse.py"), "--out", str(out)]
        command += ["--repeats", str(args.repeats), "--backends", *args.backends]
        subprocess.run(command, check=True)
    if args.training:  # derivatives inside training: benchmarks/training.py
        parts = ["step", "pinn", "wgan", "sweep"] if "all" in args.training else args.training
        command = [sys.executable, str(HERE / "training.py"), "--out", str(out)]
        command += ["--backends", *args.backends, "--parts", *parts]
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
