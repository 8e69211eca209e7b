"""Argument checks shared by every layer: each raises the library's error naming the function and the
argument, what was received, and the fix (see `jacket.errors`)."""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import JacketTypeError, JacketValueError


def check_flag(fn_name: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be True or False. Received: {name}={value!r}."
        )


def check_model(fn_name: str, model) -> None:
    if not callable(model):
        raise JacketTypeError(
            f"{fn_name}: `model` must be a Keras model or layer, or a callable mapping a batch to a "
            f"batch. Received: model of type {type(model).__name__}."
        )


def positive_int(fn_name: str, name: str, value, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be a positive integer. Received: {name}={value!r}."
        )
    if value <= 0:
        raise JacketValueError(
            f"{fn_name}: `{name}` must be a positive integer. Received: {name}={value}."
        )
    return int(value)


def positive_float(fn_name: str, name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise JacketTypeError(f"{fn_name}: `{name}` must be a number. Received: {name}={value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise JacketValueError(
            f"{fn_name}: `{name}` must be a finite {need} number. Received: {name}={value}."
        )
    return value


def choice(fn_name: str, name: str, value, options: tuple) -> None:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in options:
        raise JacketValueError(
            f"{fn_name}: `{name}` must be one of {', '.join(map(repr, options))}. "
            f"Received: {name}={value!r}."
        )


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_bytes(fn_name: str, name: str, value) -> int:
    """Bytes from an int or a string such as "500MB", "1.5GiB", "2G" (K/M/G alone are binary)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be a number of bytes or a string like '500MB'. "
            f"Received: {name}={value!r} of type {type(value).__name__}."
        )
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise JacketValueError(
                f"{fn_name}: `{name}` must look like '500MB', '2GiB' or '1073741824'. "
                f"Received: {name}={value!r}."
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise JacketValueError(
            f"{fn_name}: `{name}` must be at least one byte. Received: {name}={value!r}."
        )
    return int(value)


def format_bytes(n: float) -> str:
    """`1536` -> "1.5 KiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
