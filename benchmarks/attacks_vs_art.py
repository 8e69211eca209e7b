"""jacket's attacks against the Adversarial Robustness Toolbox's, on the bundled digits classifier.

    python benchmarks/attacks_vs_art.py                     # all 360 test digits, TensorFlow
    python benchmarks/attacks_vs_art.py --samples 64 --also jax torch --json bench-results/art.json

Same model (`jacket.demo.load_digits_model()`), same data (`jacket.demo.digits_data()` test split),
same parameters and, for JSMA, the same random targets. ART wraps the model in a
`TensorFlowV2Classifier` (`pip install "jacket[bench]"`), so this process runs on TensorFlow; `--also`
times jacket's attacks on other backends in subprocesses (ART is timed only on TensorFlow).

Both sides' adversarial examples are judged by the same code: success is the model's class on `x_adv`
differing from its class on `x` (FGSM, DeepFool) or equal to the target (JSMA); perturbations are the
mean over successful samples of the L-infinity norm (FGSM), the L2 norm (DeepFool) and the fraction of
features changed (JSMA). jacket's time is shown for the first call in the process (tracing and
compiling included) and the median of later calls; ART runs eagerly and has no first-call cost of its
own beyond TensorFlow's, so it is timed once after a warm-up prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "jax":
    os.environ.setdefault("JAX_ENABLE_X64", "1")

import numpy as np  # noqa: E402

CLIP = (0.0, 1.0)
FGSM_EPS = 0.1
JSMA_THETA = 1.0
PAPER_GAMMA = 0.145  # Papernot et al.'s distortion limit on MNIST
DEEPFOOL_OVERSHOOT = 0.02
DEEPFOOL_ITERS = 50


def cases(n_features: int) -> list[dict]:
    """The attacks and their parameters, as jacket and ART spell them."""
    # JSMA's budget: jacket takes floor(gamma * n / 2) steps of 2 features; ART keeps going while the
    # fraction changed is <= gamma, i.e. one step more. This ART gamma gives it the same steps.
    steps = int(PAPER_GAMMA * n_features / 2)
    art_gamma = (2 * steps - 1) / n_features
    jsma = []
    for label, gamma, art in (
        ("gamma 1", 1.0, 1.0),
        (f"{steps} steps = gamma {PAPER_GAMMA}", PAPER_GAMMA, art_gamma),
    ):
        for criterion, what in (("pairs", "pairs (paper)"), ("target", "target gradient")):
            jsma.append(
                dict(
                    name=f"JSMA {what}, theta 1, {label}",
                    attack="jsma",
                    norm="l0",
                    jacket=dict(theta=JSMA_THETA, gamma=gamma, criterion=criterion),
                    art=dict(theta=JSMA_THETA, gamma=art),
                )
            )
    return [
        dict(name="FGSM eps 0.1, untargeted", attack="fgsm", norm="linf", jacket=dict(eps=FGSM_EPS), art=dict(eps=FGSM_EPS)),
        *jsma,
        dict(name="DeepFool overshoot 0.02, 10 classes", attack="deepfool", norm="l2", jacket=dict(overshoot=DEEPFOOL_OVERSHOOT, max_iter=DEEPFOOL_ITERS), art=dict(epsilon=DEEPFOOL_OVERSHOOT, max_iter=DEEPFOOL_ITERS, nb_grads=10)),
    ]  # fmt: skip


def judge(model, x, x_adv, clean, target, norm):
    """Success per sample and the mean perturbation over the successful ones, the same for both."""
    from jacket.engine.outputs import outputs

    predicted = outputs(model, x_adv).argmax(axis=1)
    success = predicted == target if target is not None else predicted != clean
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    size = {
        "linf": np.abs(d).max(axis=1),
        "l2": np.sqrt((d**2).sum(axis=1)),
        "l0": (d != 0).mean(axis=1),
    }[norm]
    inside = (x_adv >= CLIP[0] - 1e-6).all() and (x_adv <= CLIP[1] + 1e-6).all()
    return {
        "success_rate": float(success.mean()),
        "mean_perturbation": float(size[success].mean()) if success.any() else float("nan"),
        "within_clip": bool(inside),
    }


def run_jacket(case, model, x, targets, batch_size, repeats):
    from jacket import attacks

    kw = dict(case["jacket"], batch_size=batch_size)
    if case["attack"] == "jsma":
        call = lambda: attacks.jsma(model, x, target=targets, clip=CLIP, **kw)  # noqa: E731
    elif case["attack"] == "fgsm":
        call = lambda: attacks.fgsm(model, x, clip=CLIP, **kw)  # noqa: E731
    else:
        call = lambda: attacks.deepfool(model, x, clip=CLIP, **kw)  # noqa: E731
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    warm, repeatable = [], True
    for _ in range(repeats):
        start = time.perf_counter()
        again = call()
        warm.append(time.perf_counter() - start)
        repeatable &= bool(np.array_equal(again.x_adv, result.x_adv))
    timing = {"first_s": first, "warm_s": float(np.median(warm)) if warm else None}
    return result.x_adv, {**timing, "repeatable": repeatable}


def run_art(case, model, x, targets, batch_size):
    import keras
    from art.attacks.evasion import DeepFool, FastGradientMethod, SaliencyMapMethod
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=x.shape[1:],
        loss_object=keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=CLIP,
    )
    classifier.predict(x[:batch_size], batch_size=batch_size)  # warm-up
    kw = dict(case["art"], batch_size=batch_size)
    y = None
    if case["attack"] == "fgsm":
        attack = FastGradientMethod(classifier, norm=np.inf, **kw)
    elif case["attack"] == "jsma":
        attack = SaliencyMapMethod(classifier, verbose=False, **kw)
        y = np.eye(10, dtype=np.float32)[targets]
    else:
        attack = DeepFool(classifier, verbose=False, **kw)
    start = time.perf_counter()
    x_adv = attack.generate(x, y=y)
    return x_adv.astype(x.dtype), {"time_s": time.perf_counter() - start}


def versions() -> dict:
    import keras

    out = {"python": platform.python_version(), "keras": keras.__version__}
    for name in ("tensorflow", "jax", "torch", "art"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="test digits (default: all 360)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="warm jacket calls after the first")
    parser.add_argument(
        "--attacks", nargs="*", default=None, help="fgsm jsma deepfool (default all)"
    )
    parser.add_argument("--also", nargs="*", default=[], help="more backends for jacket's side")
    parser.add_argument("--jacket-only", action="store_true", help="skip ART (used by --also)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import keras

    from jacket.demo import digits_data, load_digits_model
    from jacket.engine.outputs import outputs

    backend = keras.backend.backend()
    if not args.jacket_only and backend != "tensorflow":
        parser.error(
            "ART's TensorFlowV2Classifier needs KERAS_BACKEND=tensorflow (or --jacket-only)"
        )
    model = load_digits_model()
    _, _, x, _ = digits_data()
    x = x[: args.samples]
    clean = outputs(model, x).argmax(axis=1)
    rng = np.random.default_rng(0)
    targets = (clean + rng.integers(1, 10, size=len(x))) % 10  # the same for both sides

    rows, art_runs = [], {}
    for case in cases(int(np.prod(x.shape[1:]))):
        if args.attacks and case["attack"] not in args.attacks:
            continue
        tgt = targets if case["attack"] == "jsma" else None
        x_ours, t_ours = run_jacket(case, model, x, tgt, args.batch_size, args.repeats)
        row = {"case": case["name"], "norm": case["norm"], "backend": backend}
        row["jacket"] = {**judge(model, x, x_ours, clean, tgt, case["norm"]), **t_ours}
        if not args.jacket_only:
            key = (case["attack"], tuple(sorted(case["art"].items())))
            if key not in art_runs:  # the same ART run serves several of jacket's variants
                x_art, t_art = run_art(case, model, x, tgt, args.batch_size)
                art_runs[key] = {**judge(model, x, x_art, clean, tgt, case["norm"]), **t_art}
            row["art"] = art_runs[key]
        rows.append(row)
        print(_line(row), flush=True)

    for other in args.also:
        cmd = [sys.executable, __file__, "--jacket-only", "--samples", str(len(x)), "--batch-size",
               str(args.batch_size), "--repeats", str(args.repeats), "--json", "-"]  # fmt: skip
        if args.attacks:
            cmd += ["--attacks", *args.attacks]
        env = dict(os.environ, KERAS_BACKEND=other)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for row in json.loads(done.stdout.strip().splitlines()[-1])["rows"]:
            rows.append(row)
            print(_line(row), flush=True)

    report = {"samples": len(x), "batch_size": args.batch_size, "versions": versions(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}  # fmt: skip
    if args.json is not None:
        text = json.dumps(report)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
    if not args.jacket_only:
        print()
        print(table(rows))
    return 0


def _line(row) -> str:
    ours = row["jacket"]
    text = (
        f"[{row['backend']}] {row['case']}: jacket {ours['success_rate']:.1%} "
        f"{ours['mean_perturbation']:.4f} {ours['first_s']:.2f} s first, {ours['warm_s'] or 0:.2f} s warm"
    )
    if "art" in row:
        art = row["art"]
        text += (
            f" | ART {art['success_rate']:.1%} {art['mean_perturbation']:.4f} {art['time_s']:.2f} s"
        )
    return text


def table(rows) -> str:
    """A Markdown table: success, perturbation, time and jacket/ART time ratios."""
    art_time = {r["case"]: r["art"]["time_s"] for r in rows if "art" in r}
    lines = [
        "| attack | backend | success jacket / ART | perturbation jacket / ART | jacket time first / warm | ART time | ratio warm (first) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    names = {"linf": "Linf", "l2": "L2", "l0": "L0 fraction"}
    for r in rows:
        ours = r["jacket"]
        art = r.get("art")
        art_t = art_time.get(r["case"])
        success = f"{ours['success_rate']:.1%}" + (f" / {art['success_rate']:.1%}" if art else "")
        size = f"{ours['mean_perturbation']:.3f}" + (
            f" / {art['mean_perturbation']:.3f}" if art else ""
        )
        warm = ours["warm_s"] if ours["warm_s"] is not None else ours["first_s"]
        ratio = f"{warm / art_t:.3f}x ({ours['first_s'] / art_t:.2f}x)" if art_t else "-"
        lines.append(
            f"| {r['case']} | {r['backend']} | {success} | {names[r['norm']]} {size} | "
            f"{ours['first_s']:.2f} s / {warm:.2f} s | {f'{art_t:.2f} s' if art_t else '-'} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
