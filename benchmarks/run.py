"""`make bench`: the anchor benchmark on every installed backend, one process each, one table.

Writes `bench-results/anchors-<backend>.json` and prints, per case, jacket's default plan next to each
strategy forced and to each anchor (the frameworks' own one-liners), with the ratios to the fastest
forced strategy and to the best anchor that agrees with jacket (below 1.0: jacket's default is
faster). Columns: steady-state median ms; first call s (trace + compile + run) with an empty plan
cache, and when the plan cache already has the plan (a new process after the first); how many calls
and seconds the default took to settle its plan (NOTE: [Measured plans] in `jacket.engine.tuning`);
and the time as a multiple of the FLOP limit: the counted forward FLOPs of the batch times
`1 + min(in_size, out_size)` passes, over the float32 matmul rate NumPy reaches in the same run.
A second table times the first calls again, each in new processes (`--alone N`: the median of N;
NOTE: [First calls, each in its own process] in `benchmarks/anchors.py`): jacket's with an empty
plan cache and with the cache its previous process left, and the best anchor's.

Cases: the default set; `--cases real` the models people bring (keras.applications, a keras_hub ViT,
attention, an image-to-image net, at two batch sizes); `--cases all` the default set and MobileNetV2.

Where a model has layer rules (NOTE: [Layer rules] in `jacket.engine.rules`), a table of jacket's
default with them and with them off, same run. Then the memory_budget table (`--no-memory` leaves it
out), the batched pullback of every common layer, plain and rewritten (`benchmarks/layer_survey.py`,
`--skip-layer-survey`), sparse Jacobians (`benchmarks/sparse.py`,
`--skip-sparse`), integrated gradients beside Captum (`benchmarks/attribution.py`,
`--skip-attribution`), derivatives inside training (`benchmarks/training.py`: by default the step
time of a Jacobian penalty; `--training all` adds the PINN against DeepXDE, the WGAN-GP critic and
the digits sweep, tens of minutes on a laptop's CPU) and second order: Laplacians, Hessians and
divergences against each framework's one-liners (`benchmarks/second_order.py`,
`--skip-second-order`; `--second-order-only` runs that table alone, `--second-order-cases` picks
its cases).
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
    ruled = [row for row in rows if "ms" in row.get("rules_off", {})]
    if ruled:
        print("\nlayer rules (NOTE: [Layer rules]): jacket's default with them and with them off")
        print(f"{'backend':<11}{'case':<19}{'with':>9}{'off':>9}{'with/off':>9}  plan off")
        for row in ruled:
            off = row["rules_off"]
            print(
                f"{row['backend']:<11}{row['case']:<19}{row['jacket_ms']:>9.1f}{off['ms']:>9.1f}"
                f"{row['jacket_ms'] / off['ms']:>8.2f}x  {off['plan'].split(' (plan from')[0]}"
            )
    for key, what in (
        ("ratio_to_best", "default / best agreeing anchor"),
        ("ratio_to_forced", "default / fastest forced strategy"),
    ):
        ratios = [row[key] for row in rows if row.get(key)]
        if ratios:
            geomean = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
            print(f"geometric mean of {what} over {len(ratios)} cases: {geomean:.2f}x")
    alone = [row for row in rows if len(row.get("first_alone", {})) == 3]
    if alone:
        print(
            "\nfirst calls, each in a new process (NOTE: [First calls, each in its own process] "
            "in benchmarks/anchors.py)"
        )
        print(
            f"{'backend':<11}{'case':<19}{'jacket s':>9}{'cached s':>9}  {'anchor':<28}"
            f"{'s':>7}{'jacket/anchor':>14}"
        )
        for row in alone:
            first = row["first_alone"]
            name = [n for n in first if not n.startswith("jacket")][0]
            print(
                f"{row['backend']:<11}{row['case']:<19}{first['jacket']:>9.2f}"
                f"{first['jacket (plan cached)']:>9.2f}  {name[:27]:<28}{first[name]:>7.2f}"
                f"{first['jacket'] / first[name]:>13.2f}x"
            )
    for row in rows:
        for failure in row.get("first_alone_failures", []):
            print(
                f"{row['backend']} {row['case']}: a first call in a new process failed: {failure}"
            )
    firsts = []
    for row in rows:
        first = row.get("first_alone", {})
        if len(first) == 3:
            name = [n for n in first if not n.startswith("jacket")][0]
            firsts.append(first["jacket"] / first[name])
        elif any("first_s" in a for a in row["anchors"].values()):
            anchor_first = min(a["first_s"] for a in row["anchors"].values() if "first_s" in a)
            firsts.append(row["jacket_first_s"] / anchor_first)
    if firsts:
        print(
            f"first call (empty plan cache) / the best anchor's first call, each in new "
            f"processes (in-process: the fastest anchor's, where not timed so): max "
            f"{max(firsts):.2f}x, "
            f"geometric mean {math.exp(sum(map(math.log, firsts)) / len(firsts)):.2f}x"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--cases", nargs="*", default=None, help="names, 'real', 'all'")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--alone", type=int, default=1, metavar="N",
        help="time first calls in N new processes each (the median); 0 skips them",
    )  # fmt: skip
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory_budget runs")
    parser.add_argument("--skip-sparse", action="store_true", help="leave out benchmarks/sparse.py")
    parser.add_argument(
        "--skip-attribution", action="store_true", help="leave out benchmarks/attribution.py"
    )
    parser.add_argument(
        "--training", nargs="*", default=["step"], choices=["step", "pinn", "wgan", "sweep", "all"],
        help="parts of benchmarks/training.py (default: the penalty's step time; `all`: also the "
        "PINN against DeepXDE, the WGAN-GP critic and the digits sweep, tens of minutes; none "
        "named: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-second-order", action="store_true", help="leave out benchmarks/second_order.py"
    )
    parser.add_argument(
        "--skip-layer-survey", action="store_true", help="leave out benchmarks/layer_survey.py"
    )
    parser.add_argument(
        "--second-order-only", action="store_true", help="run benchmarks/second_order.py alone"
    )
    parser.add_argument("--second-order-cases", nargs="*", default=None, help="its case names")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    if args.second_order_only:
        return second_order(args, out)
    results = []
    for backend in args.backends:
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        path = out / f"anchors-{backend}.json"
        command = [sys.executable, str(HERE / "anchors.py"), "--json", str(path)]
        command += ["--repeats", str(args.repeats), "--alone", str(args.alone)]
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

    if not args.skip_layer_survey:  # batched pullbacks per layer: benchmarks/layer_survey.py
        for backend in args.backends:
            if importlib.util.find_spec(FRAMEWORK[backend]) is None:
                continue
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, str(HERE / "layer_survey.py")]
            command += ["--json", str(out / f"layer-survey-{backend}.json")]
            if backend == "torch":
                command += ["--threads", "1"]  # NOTE in its docstring: stalls on a busy machine
            subprocess.run(command, check=True, env=env)
    if not args.skip_sparse:  # sparse Jacobians of image-to-image models: benchmarks/sparse.py
        command = [sys.executable, str(HERE / "sparse.py"), "--out", str(out)]
        command += ["--repeats", str(args.repeats), "--backends", *args.backends]
        subprocess.run(command, check=True)
    if not args.skip_attribution:  # integrated gradients beside Captum: benchmarks/attribution.py
        command = [sys.executable, str(HERE / "attribution.py"), "--out", str(out)]
        command += ["--repeats", str(min(args.repeats, 5)), "--backends", *args.backends]
        subprocess.run(command, check=True)
    if args.training:  # derivatives inside training: benchmarks/training.py
        parts = ["step", "pinn", "wgan", "sweep"] if "all" in args.training else args.training
        command = [sys.executable, str(HERE / "training.py"), "--out", str(out)]
        command += ["--backends", *args.backends, "--parts", *parts]
        subprocess.run(command, check=True)
    if not args.skip_second_order:
        second_order(args, out)
    return 0


def second_order(args, out: Path) -> int:
    """The second-order table (`benchmarks/second_order.py`: one process per backend)."""
    command = [sys.executable, str(HERE / "second_order.py"), "--out", str(out)]
    command += ["--repeats", str(min(args.repeats, 10)), "--backends", *args.backends]
    if args.second_order_cases:
        command += ["--cases", *args.second_order_cases]
    subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
