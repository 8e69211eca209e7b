"""What the command-line tests share: the command run in this process, and the checks of its
outcome (exit code 0, or exactly one red error line and no traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from jacket.cli import app

RUNNER = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "120"}


def invoke(*args, env=None):
    """`jacket ARGS...` in this process (`CliRunner`: the same code path as the command)."""
    result = RUNNER.invoke(app, [str(a) for a in args], env=env)
    # an exception the command did not turn into an exit code would show up here
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result


def ok(*args, env=None):
    """`invoke`, which must exit with 0."""
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def one_red_line(result, *fragments, code=1) -> str:
    """The error line of a failed command: exit `code`, exactly one line on stderr, `error: ...`
    holding every fragment, and no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def close(actual, expected, rtol=1e-5):
    """Same shape, and equal within `rtol` of the largest expected magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def no_temporaries(folder: Path):
    """No hidden temporary left in `folder` (what an atomic write leaves when it goes wrong)."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
