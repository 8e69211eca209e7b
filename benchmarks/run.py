"""`make bench`: the anchor benchmark on every installed backend, one process each, one table.

Writes `bench-results/anchors-<backend>.json` and prints, per case, jacket's default plan next to each
strategy forced and to each anchor (the frameworks' own one-liners), with the ratios to the fastest
forced strategy and to the best anchor that agrees with jacket (below 1.0: jacket's default is
faster). Columns: steady-state median ms; first call s (trace + compile + run) with an empty plan
cache, and when the plan cache already has the plan (a new process after the first); how many calls
and seconds the default took to settle its plan (NOTE: [Measured plans] in `jacket.engine.tuning`);
and the time as a multiple of the FLOP limit: the counted forward FLOPs of the batch times
`1 + min(in_size, out_size)` passes, over the float32 matmul rate NumPy reaches in the same run.

Cases: the default set; `--cases real` the models people bring (keras.applications, a keras_hub ViT,
attention, an image-to-image net, at two batch sizes); `--cases all` the default set and MobileNetV2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import memory  # noqa: E402

FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def print_table(results: list[dict]) -> None:
    """Two lines per case. First: jacket's default (steady ms, first call s with an empty plan
    cache, calls and seconds it took to settle, first call s when the plan cache has the plan,
    where the plan came from), each forced strategy and autotune, and the default over the
    fastest forced one. Second: the best anchor that agrees, its first call, the default over it,
    and the plan. Then the geometric means."""
    print(
        f"{'backend':<11}{'case':<19}{'default':>9}{'first s':>8}{'settle':>12}{'cached s':>9}"
        f"{'replicate':>10}{'vmap':>9}{'loop':>9}{'autotune':>9}{'/forced':>8}  "
        f"{'best anchor':<30}{'ms':>9}{'first s':>8}{'/anchor':>8}{'xFLOP':>8}"
    )
    for result in results:
        for row in result["rows"]:
            strategies = row.get("strategies", {})
            cells = "".join(
                f"{strategies[n]['ms']:>{w}.1f}" if "ms" in strategies.get(n, {}) else f"{'-':>{w}}"
                for n, w in (("replicate", 10), ("vmap", 9), ("loop", 9), ("autotune", 9))
            )
            forced = row.get("ratio_to_forced")
            settle = f"{row['settle_calls']}/{row['settle_s']:.1f}s"
            timed = {n: a for n, a in row["anchors"].items() if "ms" in a and a["agrees"]}
            if timed:
                name, a = min(timed.items(), key=lambda item: item[1]["ms"])
                anchor = (
                    f"{name[:29]:<30}{a['ms']:>9.1f}{a['first_s']:>8.2f}"
                    f"{row['ratio_to_best']:>7.2f}x"
                )
            else:
                anchor = f"{'no anchor agreed or ran':<30}{'':>25}"
            flop = row.get("x_flop_limit")
            print(
                f"{row['backend']:<11}{row['case']:<19}{row['jacket_ms']:>9.1f}"
                f"{row['jacket_first_s']:>8.2f}{settle:>12}{row['cached_first_s']:>9.2f}{cells}"
                f"{(f'{forced:.2f}x' if forced else '-'):>8}  {anchor}"
                f"{(f'{flop:.3g}' if flop else '-'):>8}"
            )
            print(f"{'':<30}plan from {row['source']}: {row['plan'].split(' (plan from')[0]}")
            for name, v in strategies.items():
                if "error" in v:
                    print(f"{'':<30}{name}: {' '.join(v['error'].split())[:90]}")
            failed = [n for n, a in row["anchors"].items() if "ms" not in a or not a["agrees"]]
            for name in failed:
                a = row["anchors"][name]
                why = a.get("error") or f"disagrees with jacket ({a['max_rel_diff']:.1e})"
                print(f"{'':<30}{name}: {' '.join(why.split())[:90]}")
    rows = [row for r in results for row in r["rows"]]
    for key, what in (
        ("ratio_to_best", "default / best agreeing anchor"),
        ("ratio_to_forced", "default / fastest forced strategy"),
    ):
        ratios = [row[key] for row in rows if row.get(key)]
        if ratios:
            geomean = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
            print(f"geometric mean of {what} over {len(ratios)} cases: {geomean:.2f}x")
    firsts = [
        row["jacket_first_s"] / min(a["first_s"] for a in row["anchors"].values() if "first_s" in a)
        for row in rows
        if any("first_s" in a for a in row["anchors"].values())
    ]
    if firsts:
        print(
            f"first call (empty plan cache) / fastest anchor's first call: max {max(firsts):.2f}x, "
            f"geometric mean {math.exp(sum(map(math.log, firsts)) / len(firsts)):.2f}x"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=None, help="names, 'real', 'all'")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory_budget runs")
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
        # an empty plan cache for every run: first calls measure the planner, not a warm cache
        env["JACKET_CACHE_DIR"] = tempfile.mkdtemp(prefix="jacket-bench-cache-")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
