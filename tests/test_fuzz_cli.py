"""Fuzzing the command line (hypothesis, in-process through typer's CliRunner).

Hostile input files (wrong dtypes and shapes, object arrays, truncated, empty or random bytes, CSV
with text or NaN, npz with missing or extra names) and random option values, on `jacket jacobian`,
`check` and `plot`. Each run must end in exit 0 with a right result (a linear model: the file must
hold `J = W^T` for every sample) or in exit 1 / 2 with exactly one `error:` line on stderr that is
not a bare Python exception name (`error: ValueError: ...` is how the command shows an error it did
not expect), and never a traceback. Outcomes are counted and printed at the end of the module.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from test_fuzz import _hang_guard, _print_table
from typer.testing import CliRunner

from jacket.cli import app

BACKEND = keras.backend.backend()
RUNNER = CliRunner()
COUNTS: collections.Counter = collections.Counter()
COMMON = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# examples per command (jacobian, check, plot)
# the slow variant explores new cases on every run (a failure prints how to replay it)
SLOW = {**COMMON, "derandomize": False, "print_blob": True}
FAST = settings(max_examples=10, **COMMON)
MANY = settings(max_examples=60, **SLOW)
RAW_ERROR = re.compile(r"^error: [A-Z][A-Za-z]*(Error|Exception|Warning|Iteration)\b")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A linear model (J = W^T, exact), a two-input model, and good inputs for both."""
    keras.utils.set_random_seed(11)
    root = tmp_path_factory.mktemp("fuzzcli")
    linear = keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(3)])
    linear.save(root / "linear.keras")
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    dense = keras.layers.Dense(2)
    multi = keras.Model([a, b], dense(keras.layers.Concatenate()([a, b])))
    multi.save(root / "multi.keras")
    kernel = np.asarray(keras.ops.convert_to_numpy(linear.layers[0].kernel), np.float64)
    multi_kernel = np.asarray(keras.ops.convert_to_numpy(dense.kernel), np.float64)
    return {"root": root, "W": kernel, "W2": multi_kernel}


@pytest.fixture(scope="module", autouse=True)
def _outcome_table(request):
    yield
    if COUNTS:
        lines = [f"command-line fuzz outcomes ({BACKEND}): category | outcome | cases"]
        for (category, outcome), n in sorted(COUNTS.items()):
            lines.append(f"  {category:34s} | {outcome:44s} | {n}")
        lines.append(f"  total {COUNTS.total()}")
        _print_table(request.config, lines)


# ----------------------------------------------------------------------------------- input files


def _npy_bytes(array: np.ndarray) -> bytes:
    import io as _io

    buffer = _io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _write_input(data, root: Path, W: np.ndarray):
    """A file of inputs for the linear model: (path, category, valid, samples)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    kind = data.draw(
        st.sampled_from(
            ["npy"] * 6 + ["npz"] * 2 + ["csv"] * 3
            + ["npy_bad_dtype", "npy_object", "npy_shape", "npy_empty", "npy_nan", "truncated",
               "random_bytes", "npz_extra", "npz_wrong_name", "npz_object", "csv_text",
               "csv_nan", "csv_columns", "csv_ragged", "wrong_suffix", "zero_bytes", "csv_empty"]
        ),
        label="input file",
    )  # fmt: skip
    n = data.draw(st.integers(1, 5), label="samples")
    x = rng.uniform(-1, 1, size=(n, 4))
    dtype = data.draw(st.sampled_from(["float32", "float64", "float16", "int64", "bool"]))
    if dtype == "bool":
        x = x > 0
    elif dtype == "int64":
        x = rng.integers(-3, 4, size=(n, 4))
    else:
        x = x.astype(dtype)
    name = f"in{data.draw(st.integers(0, 10**6), label='name')}"
    path = root / f"{name}.npy"
    valid = True
    if kind == "npy":
        np.save(path, x)
    elif kind == "npz":
        path = root / f"{name}.npz"
        np.savez(path, features=x, labels=np.arange(n))
    elif kind == "csv":
        path = root / f"{name}.csv"
        header = "a,b,c,d\n" if data.draw(st.booleans(), label="header") else ""
        x = np.asarray(x, np.float64)
        path.write_text(header + "\n".join(",".join(f"{v:.17g}" for v in row) for row in x) + "\n")
    else:
        valid = False
        if kind == "npy_bad_dtype":
            bad = data.draw(st.sampled_from(["complex64", "U3", "datetime64[s]"]))
            np.save(path, np.zeros((n, 4), bad))
        elif kind == "npy_object":
            path.write_bytes(_npy_bytes(np.zeros((n, 4)).astype(object)))
        elif kind == "npy_shape":
            shape = data.draw(st.sampled_from([(4,), (n, 5), (n, 4, 1), (), (n, 2, 2)]))
            np.save(path, np.zeros(shape, "float32"))
        elif kind == "npy_empty":
            np.save(path, np.zeros((0, 4), "float32"))
        elif kind == "npy_nan":
            x = np.asarray(x, np.float32)
            # in the first sample: `check --samples k` looks at the first k samples only
            x[0, rng.integers(4)] = data.draw(st.sampled_from([np.nan, np.inf]))
            np.save(path, x)
        elif kind == "truncated":
            raw = _npy_bytes(np.asarray(x, np.float32))
            path.write_bytes(raw[: data.draw(st.integers(1, len(raw) - 1), label="cut")])
        elif kind == "zero_bytes":
            path.write_bytes(b"")
        elif kind == "random_bytes":
            path = root / f"{name}{data.draw(st.sampled_from(['.npy', '.npz', '.csv']))}"
            path.write_bytes(
                rng.integers(0, 256, size=int(rng.integers(1, 300))).astype("uint8").tobytes()
            )
        elif kind == "npz_extra":
            path = root / f"{name}.npz"
            np.savez(path, features=x, other=x)
            valid = True  # the array named after the input is used, the rest left out
        elif kind == "npz_wrong_name":
            path = root / f"{name}.npz"
            np.savez(path, pixels=x, other=x)
        elif kind == "npz_object":
            path = root / f"{name}.npz"
            np.savez(path, features=np.zeros((n, 4)).astype(object))
        elif kind == "csv_text":
            path = root / f"{name}.csv"
            path.write_text("1,2,3,4\n1,two,3,4\n")
        elif kind == "csv_nan":
            path = root / f"{name}.csv"
            path.write_text("1,2,3,4\n1,nan,3,4\n")
        elif kind == "csv_columns":
            path = root / f"{name}.csv"
            path.write_text("1,2,3\n4,5,6\n")
        elif kind == "csv_empty":
            path = root / f"{name}.csv"
            path.write_text(data.draw(st.sampled_from(["", "a,b,c,d\n", "1 2 3 4\n"])))
        elif kind == "csv_ragged":
            path = root / f"{name}.csv"
            path.write_text("1,2,3,4\n1,2\n")
        elif kind == "wrong_suffix":
            path = root / f"{name}.txt"
            path.write_text("1,2,3,4\n")
    return path, kind, valid, n, np.asarray(x, np.float64) if valid else None


OPTIONS = {
    # option: (valid values, invalid values)
    "--mode": (["auto", "reverse", "forward"], ["sideways", "", "REVERSE"]),
    "--chunk-size": (["1", "2", "1000000000000"], ["0", "-1", "1.5", "abc", ""]),
    "--batch-size": (["1", "2", "128", "99999999999999999999"], ["0", "-2", "x"]),
    "--memory-budget": (["1KB", "500MB", "1", "2GiB"], ["0", "-1", "abc", "1e3", "", "nan"]),
    "--flatten": ([None], []),
}


def _draw_options(data):
    args, bad = [], []
    for option, (valid, invalid) in OPTIONS.items():
        if not data.draw(st.booleans(), label=f"use {option}"):
            continue
        if invalid and data.draw(st.integers(0, 9), label=f"{option} bad?") >= 8:
            value = data.draw(st.sampled_from(invalid), label=option)
            bad.append(option)
        else:
            value = data.draw(st.sampled_from(valid), label=option)
        args += [option] if value is None else [option, value]
    return args, bad


# -------------------------------------------------------------------------------------- checking


def _outcome(result) -> tuple[int, list[str]]:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines


def _one_error_line(code: int, lines: list[str]) -> str:
    assert code in (1, 2), (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert not RAW_ERROR.match(lines[0]), f"an unexpected exception reached the user: {lines[0]}"
    return lines[0]


def _count(category: str, outcome: str) -> None:
    COUNTS[(category, outcome)] += 1
    event(f"{category} -> {outcome}")


def _jacobian_case(data, files, tmp_path) -> None:
    root = files["root"]
    path, kind, valid, n, x = _write_input(data, root, files["W"])
    options, bad = _draw_options(data)
    suffix = data.draw(st.sampled_from([".npy", ".npy", ".npz", ".txt"]), label="output suffix")
    out = tmp_path / f"J{COUNTS.total()}{suffix}"
    args = ["jacobian", str(root / "linear.keras"), str(path), "-o", str(out), "-q", *options]
    note(f"args={args} kind={kind}")
    with _hang_guard():
        result = RUNNER.invoke(app, args)
    code, lines = _outcome(result)
    should_pass = valid and not bad and suffix != ".txt"
    category = f"input {kind}" if not valid else (f"option {bad[0]}" if bad else f"input {kind}")
    if suffix == ".txt" and valid and not bad:
        category = "output suffix .txt"
    if code == 0:
        assert should_pass, f"exit 0 for a bad case ({category}): {lines}"
        assert not lines, lines
        if suffix == ".npz":
            with np.load(out) as saved:
                (J,) = [saved[k] for k in saved.files]
        else:
            J = np.load(out)
        flatten = "--flatten" in options
        assert J.shape == (n, 3, 4), J.shape
        expected = np.broadcast_to(files["W"].T, (n, 3, 4))
        np.testing.assert_allclose(J.astype(np.float64), expected, rtol=0, atol=1e-6)
        _count(category, "exit 0, J = W^T" + (" (flatten)" if flatten else ""))
        return
    line = _one_error_line(code, lines)
    assert not should_pass, f"a valid case failed: {line}"
    assert not out.exists(), "an output was left behind"
    if bad and code == 2:
        assert any(option in line for option in bad), line
    _count(category, f"exit {code}, one error line")


def _check_case(data, files) -> None:
    root = files["root"]
    path, kind, valid, n, x = _write_input(data, root, files["W"])
    extra = []
    bad = False
    if data.draw(st.booleans(), label="use --samples"):
        value = data.draw(st.sampled_from(["1", "3", "0", "-1", "many"]), label="--samples")
        bad = value in ("0", "-1", "many")
        extra += ["--samples", value]
    if data.draw(st.booleans(), label="use --eps"):
        value = data.draw(st.sampled_from(["1e-3", "nan", "-1", "inf", "0"]), label="--eps")
        bad = bad or value != "1e-3"
        extra += ["--eps", value]
    args = ["check", str(root / "linear.keras"), str(path), "--json", *extra]
    note(f"args={args} kind={kind}")
    with _hang_guard():
        result = RUNNER.invoke(app, args)
    code, lines = _outcome(result)
    category = f"check: input {kind}" if not valid else ("check: option" if bad else "check: ok")
    if code == 0:
        assert valid and not bad, f"exit 0 for a bad case: {lines}"
        assert '"ok": true' in result.stdout
        _count(category, "exit 0, check OK")
        return
    _one_error_line(code, lines)
    assert not (valid and not bad), f"a valid check failed: {lines}"
    _count(category, f"exit {code}, one error line")


def _plot_case(data, tmp_path) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    kind = data.draw(
        st.sampled_from(["ok"] * 4 + ["rank1", "rank2", "scalar", "empty", "complex", "strings",
                                      "object", "truncated", "nan", "bool"]),
        label="plot file",
    )  # fmt: skip
    path = tmp_path / f"P{COUNTS.total()}.npy"
    shape = tuple(int(d) for d in rng.integers(1, 4, size=3))
    arrays = {
        "ok": lambda: rng.normal(size=shape),
        "nan": lambda: np.full(shape, np.nan),
        "bool": lambda: rng.normal(size=shape) > 0,
        "rank1": lambda: rng.normal(size=shape[:1]),
        "rank2": lambda: rng.normal(size=shape[:2]),
        "scalar": lambda: np.float64(1.0),
        "empty": lambda: np.zeros((0,) + shape[1:]),
        "complex": lambda: rng.normal(size=shape) + 1j,
        "strings": lambda: rng.normal(size=shape).astype(str),
    }
    if kind == "object":
        path.write_bytes(_npy_bytes(rng.normal(size=shape).astype(object)))
    elif kind == "truncated":
        raw = _npy_bytes(rng.normal(size=shape))
        path.write_bytes(raw[: len(raw) // 2])
    else:
        np.save(path, arrays[kind]())
    valid = kind in ("ok", "nan", "bool")
    extra = []
    if data.draw(st.booleans(), label="use --input-ndim"):
        value = data.draw(st.sampled_from(["1", "2", "5", "0"]), label="--input-ndim")
        extra += ["--input-ndim", value]
        valid = valid and value == "1"
    args = ["plot", str(path), "-o", str(tmp_path / f"{path.stem}.png"), "-q", *extra]
    note(f"args={args} kind={kind}")
    with _hang_guard():
        result = RUNNER.invoke(app, args)
    code, lines = _outcome(result)
    category = f"plot: {kind}" + (" " + " ".join(extra) if extra else "")
    if code == 0:
        assert valid, f"exit 0 for a bad plot case {category}"
        assert (tmp_path / f"{path.stem}.png").read_bytes()[:4] == b"\x89PNG"
        _count(category, "exit 0, PNG written")
        return
    _one_error_line(code, lines)
    assert not valid, f"a valid plot failed: {lines}"
    _count(category, f"exit {code}, one error line")


def _run(data, files, tmp_path, command: str) -> None:
    if command == "jacobian":
        _jacobian_case(data, files, tmp_path)
    elif command == "check":
        _check_case(data, files)
    else:
        _plot_case(data, tmp_path)


# ------------------------------------------------------------------------------------------ tests


COMMANDS = ["jacobian", "check", "plot"]


@pytest.mark.parametrize("command", COMMANDS)
@FAST
@given(data=st.data())
def test_fuzz_command_line(data, files, tmp_path, command):
    _run(data, files, tmp_path, command)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@MANY
@given(data=st.data())
def test_fuzz_command_line_many(data, files, tmp_path, command):
    _run(data, files, tmp_path, command)


# Bugs the fuzzing found in `jacket.io`, since fixed: each case kept as a regression test (and the
# empty files drawn by the fuzzer again, as "zero_bytes" and "csv_empty")
IO_FOUND = {
    "zero_bytes.npy": (
        b"",
        ".npy",
        "io.read_inputs: an empty .npy file raised EOFError, shown as 'error: EOFError: No data "
        "left in file' (the .npy branch caught ValueError and OSError only)",
    ),
    "empty.csv": (
        b"",
        ".csv",
        "io._read_csv: numpy.loadtxt warned 'input contained no data' (a UserWarning printed "
        "beside the error line, or the error itself under -W error) before 'has no rows of data'",
    ),
    "header_only.csv": (b"a,b,c,d\n", ".csv", "io._read_csv: the same UserWarning as an empty CSV"),
    "spaces.csv": (
        b"1 2 3 4\n",
        ".csv",
        "io._read_csv: a space-separated line was taken for a header, then the same UserWarning",
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(name, id=name) for name in IO_FOUND],
)
def test_io_bugs_found_by_fuzzing(files, tmp_path, case):
    """Each of these ends in one error line naming the file (found by fuzzing: it was a raw
    EOFError, or NumPy's 'input contained no data' warning beside the error)."""
    content, suffix, _ = IO_FOUND[case]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(content)
    result = RUNNER.invoke(
        app,
        ["jacobian", str(files["root"] / "linear.keras"), str(path), "-o", str(tmp_path / "J.npy")],
    )
    code, lines = _outcome(result)
    line = _one_error_line(code, lines)
    assert str(path) in line or path.name in line, line


def test_usage_errors_are_one_line():
    """A bad option value: one red line naming it, exit 2 (not click's usage box)."""
    result = RUNNER.invoke(
        app, ["jacobian", "m.keras", "x.npy", "-o", "J.npy", "--chunk-size", "0"]
    )
    code, lines = _outcome(result)
    line = _one_error_line(code, lines)
    assert code == 2 and "--chunk-size" in line and "--help" in line, line
    assert os.environ.get("JACKET_TRACEBACK") is None
