"""`make bench`: the anchor benchmark on every installed backend, one process each, one table.

Writes `bench-results/anchors-<backend>.json` and prints jacket's time next to each anchor's, and the
ratio to the best anchor that agrees with jacket (below 1.0: jacket is faster). Columns: steady-state
median ms, first call s (trace + compile + run), peak resident memory above the start of the case
(MB, sampled every ms), and jacket's time as a multiple of the FLOP limit: the counted forward FLOPs
of the batch times `1 + min(in_size, out_size)` passes, over the float32 matmul rate NumPy reaches on
this machine in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--skip-sparse", action="store_true", help="leave out benchmarks/sparse.py")
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
    print(
        f"{'backend':<11}{'case':<14}{'jacket ms':>10}{'first s':>9}  {'anchor':<42}{'ms':>9}{'first s':>9}  agree"
    )
    for result in results:
        for row in result["rows"]:
            anchors = row["anchors"] or {"-": {}}
            for k, (name, a) in enumerate(anchors.items()):
                flop = row.get("x_flop_limit")
                left = (
                    f"{row['backend']:<11}{row['case']:<15}{row['jacket_ms']:>10.2f}"
                    f"{row['jacket_first_s']:>8.2f}{row['jacket_peak_mb']:>9.0f}"
                    f"{(f'{flop:.3g}' if flop else '-'):>9}"
                    if k == 0
                    else " " * 51
                )
                if "ms" in a:
                    right = (
                        f"{name:<40}{a['ms']:>9.2f}{a['first_s']:>8.2f}{a['peak_mb']:>8.0f}  "
                        f"{'yes' if a['agrees'] else 'NO'}"
                    )
                else:
                    error = " ".join(a.get("error", "").split())[:70]
                    right = f"{name:<40}{error}"
                print(f"{left}  {right}")
            if row["ratio_to_best"] is not None:
                print(f"{'':<51}  {'jacket / best anchor':<40}{row['ratio_to_best']:>9.2f}x")

    if not args.skip_sparse:  # sparse Jacobians of image-to-image models: benchmarks/sparse.py
        command = [sys.executable, str(HERE / "sparse.py"), "--out", str(out)]
        command += ["--repeats", str(args.repeats), "--backends", *args.backends]
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
