"""The examples of README.md and of the documentation pages, run on the active Keras backend, so they
cannot rot.

Which blocks run:

- Python: every ```python block of README.md and of `docs/**/*.md` runs, in the order of the page,
  all blocks of one page in one namespace (a page may build `model` and `x` in its first block and
  use them in the next ones), in a fresh temporary folder (the files the examples write go there).
  A block whose first line is a `# not run` comment is shown only, never run: the rest of that
  line says why (it needs a Dask cluster, a GPU, files of your own). README.md has no such block:
  every example on the front page runs.
- Command lines: the ```bash blocks of README.md whose every line starts with `jacket` or
  `python` run line by line in a subprocess (`jacket` as `python -m jacket`, on the active
  backend), in a temporary folder that holds the bundled model at the path a checkout has it
  (`src/jacket/data/digits_cnn.keras`); each must exit with 0. Blocks of other commands (`make`,
  `pip`) set a machine up and are not run. The command-line guide's blocks are not run here: the
  commands themselves are tested in `test_cli*.py`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
NOT_RUN = "# not run"
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*$")


def _blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """The fenced code blocks of `lang` in a Markdown file: `(line number, code)`."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, start = len(match["indent"]), i + 1
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        if match["lang"] == lang:
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _run_page(path: Path, tmp_path: Path, monkeypatch) -> int:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    ran = 0
    for line, code in _blocks(path, "python"):
        if code.lstrip().startswith(NOT_RUN):
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the example at {where} failed: {error!r}\n{code}") from error
        ran += 1
    return ran


@pytest.mark.one_backend
def test_readme_python_examples(tmp_path, monkeypatch):
    blocks = _blocks(README, "python")
    assert blocks, "README.md has no Python example"
    shown_only = [line for line, code in blocks if code.lstrip().startswith(NOT_RUN)]
    assert not shown_only, f"README.md examples must all run; marked `{NOT_RUN}` at {shown_only}"
    assert _run_page(README, tmp_path, monkeypatch) == len(blocks)


@pytest.mark.one_backend
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_docs_python_examples(page, tmp_path, monkeypatch):
    _run_page(page, tmp_path, monkeypatch)


def test_some_docs_examples_run():
    """The convention is not a way out: most of the guides' examples run."""
    runs = shown = 0
    for page in PAGES:
        for _, code in _blocks(page, "python"):
            shown += 1
            runs += not code.lstrip().startswith(NOT_RUN)
    assert runs >= 2 * (shown - runs), f"{runs} of {shown} Python blocks of docs/ run"


def _command_blocks() -> list[tuple[int, list[str]]]:
    out = []
    for line, code in _blocks(README, "bash"):
        commands = [c for c in code.splitlines() if c.strip() and not c.lstrip().startswith("#")]
        if commands and all(c.split()[0] in ("jacket", "python") for c in commands):
            out.append((line, commands))
    return out


def test_readme_has_command_line_examples():
    commands = [c for _, block in _command_blocks() for c in block]
    assert any(c.startswith("jacket info") for c in commands)
    assert any(c.startswith("jacket jacobian") for c in commands)


@pytest.mark.cli
@pytest.mark.parametrize("line, commands", _command_blocks())
def test_readme_command_lines(line, commands, tmp_path):
    import keras

    from jacket import demo

    bundled = tmp_path / "src" / "jacket" / "data" / demo.MODEL_PATH.name
    bundled.parent.mkdir(parents=True)
    shutil.copy(demo.MODEL_PATH, bundled)
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for command in commands:
        argv = shlex.split(command, comments=True)
        if argv[0] == "jacket":
            argv = [sys.executable, "-m", "jacket", *argv[1:]]
        else:
            argv = [sys.executable, *argv[1:]]
        proc = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (
            f"README.md:{line}: `{command}` exited with {proc.returncode}\n{proc.stderr[-3000:]}"
        )
