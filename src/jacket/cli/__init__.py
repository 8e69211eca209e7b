"""The `jacket` command (typer + rich): thin commands over the library and `jacket.io`.

Every command is registered here, in the order `jacket --help` lists them; each lives in the module
of its group (`jacobian`: jacobian, check, plot; `analysis`: sensitivity, norms; `attacks`: attack
fgsm|jsma|deepfool; `sparse`: sparsity; `tools`: demo, info, bench, tune), with the Dask variants in
`distributed` and what they all share (options, errors, output) in `shared`.

Nothing here imports Keras at module level: `--backend` sets `KERAS_BACKEND` before the first import,
and the checks that need no model (files exist, the output can be written) run before Keras loads.
Data go to files; summaries to the terminal (`--json`: one JSON object on stdout); progress and
errors to stderr. Library and file errors become one red line and exit code 1; usage errors exit
with 2. `JACKET_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from . import analysis, attacks, jacobian, sparse, tools
from .shared import BackendOption, OneLineUsage, set_backend

app = typer.Typer(
    cls=OneLineUsage,
    name="jacket",
    help="Jacobians for Keras: per-sample Jacobians of any Keras 3 model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(backend: BackendOption = None) -> None:
    """Jacobians for Keras."""
    set_backend(backend)


attack_app = typer.Typer(
    name="attack",
    help="Adversarial examples of a classifier: FGSM, JSMA, DeepFool (jacket.attacks).",
    no_args_is_help=True,
)

app.command()(jacobian.jacobian)
app.command()(jacobian.check)
app.command()(jacobian.plot)
app.command()(tools.demo)
app.command()(tools.info)
app.command()(tools.bench)
app.command()(tools.tune)
app.command()(analysis.sensitivity)
app.command()(analysis.norms)
app.add_typer(attack_app, name="attack")
attack_app.command("fgsm")(attacks.fgsm)
attack_app.command("jsma")(attacks.jsma)
attack_app.command("deepfool")(attacks.deepfool)
app.command()(sparse.sparsity)


def _silence_native_stderr() -> None:
    """Keep native libraries' logs (TensorFlow's and XLA's C++ start-up lines, written straight to
    file descriptor 2) off the terminal, while Python's `sys.stderr` (errors, warnings, progress)
    still reaches it: `sys.stderr` moves to a copy of fd 2, and fd 2 itself goes to /dev/null.
    `JACKET_NATIVE_LOGS=1` keeps them."""
    if os.environ.get("JACKET_NATIVE_LOGS"):
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except Exception:  # noqa: BLE001 - no real stderr: nothing to do
        return
    sys.stderr.flush()
    python_stderr = os.fdopen(
        os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
    )
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = python_stderr


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: temporary files are removed on the way out


def main() -> None:
    """Entry point of the `jacket` script and `python -m jacket`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter off
    # float64 on JAX (the finite-difference reference of `jacket check`, float64 models) needs it
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    signal.signal(signal.SIGTERM, _terminate)
    _silence_native_stderr()
    app()
