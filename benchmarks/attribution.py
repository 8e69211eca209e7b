"""Integrated gradients (50 steps, batch 32) with jacket on every backend, beside Captum on PyTorch.

`python benchmarks/attribution.py` runs every installed backend, each in its own process (Keras fixes
the backend per process), writes `bench-results/attribution-<backend>.json` and prints one table;
`benchmarks/run.py` (`make bench`) calls it after the sparse table. One backend alone:
`KERAS_BACKEND=torch python benchmarks/attribution.py --child`.

Cases: the bundled digits classifier (`jacket.demo.load_digits_model`, 8x8x1, its test images) and
a ResNet-style classifier (32x32x3, three stages of one residual block each, 8/16/32 channels,
BatchNormalization in inference, random weights, uniform [0, 1] images). Per case: jacket's
`analysis.integrated_gradients(model, x, steps=50, method="gausslegendre", target=t)`, the first
call (trace, compile, run) and the steady-state median of interleaved rounds (one call of each per
round, after one untimed call each). On PyTorch the same model (a Keras 3 model is a
`torch.nn.Module` there) goes through Captum's `IntegratedGradients(model).attribute(x,
baselines=0, target=t, n_steps=50, method="gausslegendre")` in the same rounds of the same process,
checked to agree with jacket within 1e-5 (relative to the largest attribution) before it counts; the
ratio is jacket's median over Captum's (the target: at most 0.5). On TensorFlow and JAX, where
Captum cannot run, the ratio is over the Captum median of the PyTorch process of the same run (a
ratio across processes: the machine's load may differ between them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
BATCH, STEPS, METHOD = 32, 50, "gausslegendre"


# ------------------------------------------------------------------------------------------- cases


def digits_case():
    from jacket.demo import digits_data, load_digits_model

    _, _, x_test, _ = digits_data()
    return load_digits_model(), x_test[:BATCH]


def resnet_case():
    import keras
    import numpy as np
    from keras import layers

    keras.utils.set_random_seed(0)

    def block(h, channels, stride):
        shortcut = h
        h = layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.ReLU()(layers.BatchNormalization()(h))
        h = layers.Conv2D(channels, 3, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        if stride != 1 or shortcut.shape[-1] != channels:
            shortcut = layers.Conv2D(channels, 1, strides=stride, use_bias=False)(shortcut)
            shortcut = layers.BatchNormalization()(shortcut)
        return layers.ReLU()(layers.Add()([h, shortcut]))

    inputs = keras.Input((32, 32, 3))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(inputs)))
    for channels, stride in ((8, 1), (16, 2), (32, 2)):
        h = block(h, channels, stride)
    outputs = layers.Dense(10)(layers.GlobalAveragePooling2D()(h))
    x = np.random.default_rng(0).random((BATCH, 32, 32, 3)).astype("float32")
    return keras.Model(inputs, outputs, name="resnet_style"), x


CASES = {"digits": digits_case, "resnet": resnet_case}


# ------------------------------------------------------------------------------------- one backend


def child(repeats: int, out: Path) -> None:
    import keras
    import numpy as np

    from jacket import analysis

    backend = keras.backend.backend()
    rows = []
    for name, build in CASES.items():
        model, x = build()
        target = np.asarray(keras.ops.convert_to_numpy(model(x))).argmax(axis=1)

        def ours(model=model, x=x, target=target):
            return analysis.integrated_gradients(
                model, x, steps=STEPS, method=METHOD, target=target
            ).attributions

        start = time.perf_counter()
        reference = ours()
        first = time.perf_counter() - start
        runs = {"jacket": ours}
        row = {"backend": backend, "case": name, "jacket_first_s": first}
        if backend == "torch" and importlib.util.find_spec("captum") is not None:
            import torch
            from captum.attr import IntegratedGradients

            captum = IntegratedGradients(model)
            xt, tt = torch.tensor(x), torch.tensor(target)

            def theirs(captum=captum, xt=xt, tt=tt):
                return (
                    captum.attribute(
                        xt, baselines=torch.zeros_like(xt), target=tt, n_steps=STEPS, method=METHOD
                    )
                    .detach()
                    .numpy()
                )

            other = theirs()
            row["max_rel_diff"] = float(
                np.abs(reference - other).max() / max(np.abs(other).max(), 1e-30)
            )
            row["agrees"] = row["max_rel_diff"] <= 1e-5
            runs["captum"] = theirs
        for run in runs.values():  # one untimed call each before the rounds
            run()
        times = {key: [] for key in runs}
        for _ in range(repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        for key, values in times.items():
            row[f"{key}_ms"] = statistics.median(values) * 1e3
        rows.append(row)
        print(f"[{backend}] {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                  if isinstance(v, float)), flush=True)  # fmt: skip
    out.write_text(json.dumps({"backend": backend, "rows": rows}, indent=1))


# -------------------------------------------------------------------------------------- the table


def print_table(results: list[dict]) -> None:
    captum = {
        row["case"]: row["captum_ms"]
        for result in results
        for row in result["rows"]
        if "captum_ms" in row and row.get("agrees")
    }
    print(
        f"integrated gradients, {STEPS} steps ({METHOD}), batch {BATCH}: steady-state median ms "
        "(first call s); ratio = jacket / Captum (target <= 0.5)"
    )
    print(f"{'backend':<11}{'case':<9}{'jacket ms':>10}{'first s':>9}{'Captum ms':>11}"
          f"{'ratio':>8}  {'Captum measured'}")  # fmt: skip
    for result in results:
        for row in result["rows"]:
            base = captum.get(row["case"])
            same = "captum_ms" in row
            where = "same process" if same else "PyTorch process (across processes)"
            if "agrees" in row and not row["agrees"]:
                where = f"disagrees with jacket ({row['max_rel_diff']:.1e}): not counted"
            ratio = f"{row['jacket_ms'] / base:.2f}x" if base else "-"
            shown = f"{base:.1f}" if base else "-"
            print(f"{row['backend']:<11}{row['case']:<9}{row['jacket_ms']:>10.1f}"
                  f"{row['jacket_first_s']:>9.2f}{shown:>11}{ratio:>8}  {where if base else ''}")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=list(FRAMEWORK))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--child", action="store_true", help="run the active backend only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    if args.child:
        import keras

        child(args.repeats, out / f"attribution-{keras.backend.backend()}.json")
        return 0
    results = []
    for backend in sorted(args.backends, key=lambda b: b != "torch"):  # Captum's times first
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            print(f"[skip] {backend}: not installed")
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if backend == "jax":
            env["JAX_ENABLE_X64"] = "1"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out)]
        subprocess.run(command + ["--repeats", str(args.repeats)], check=True, env=env)
        results.append(json.loads((out / f"attribution-{backend}.json").read_text()))
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
