"""The options of a Jacobian call, checked once: `Options.checked(fn_name, ...)` raises the library's
error for a bad value (naming the function and the argument) and caches the result for plain
arguments, so that repeated calls skip the checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_flag, parse_bytes
from ..errors import JacketTypeError, JacketValueError
from .memory import default_memory_budget
from .plan import STRATEGIES as PLAN_STRATEGIES

MODES = ("auto", "reverse", "forward")
STRATEGIES = ("auto", "autotune") + PLAN_STRATEGIES


@dataclass(frozen=True)
class Options:
    mode: str = "auto"
    chunk_size: int | None = None
    flatten: bool = False
    per_sample: bool | str = True  # True, False or "diagonal"
    training: bool = False
    memory_budget: int = 1 << 30
    strategy: str = "auto"
    # the budget was jacket's default (a share of the memory free when first needed), not given
    default_budget: bool = False

    @classmethod
    def checked(
        cls,
        fn_name,
        mode,
        chunk_size,
        flatten,
        per_sample,
        training,
        memory_budget=None,
        strategy="auto",
    ) -> Options:
        args = (mode, chunk_size, flatten, per_sample, training, memory_budget, strategy)
        # repeated calls with the same plain arguments (the usual case) skip the checks; the
        # types are part of the key, as `True == 1` and `1 == 1.0` would otherwise collide
        types = tuple(map(type, args))
        if _PLAIN.issuperset(types):
            key = (args, types)
            options = _CHECKED.get(key)
            if options is None:
                options = cls._check(fn_name, *args)
                if len(_CHECKED) < 256:
                    _CHECKED[key] = options
            return options
        return cls._check(fn_name, *args)

    @classmethod
    def _check(
        cls, fn_name, mode, chunk_size, flatten, per_sample, training, memory_budget, strategy
    ) -> Options:
        if not isinstance(mode, str) or mode not in MODES:
            raise JacketValueError(
                f"{fn_name}: `mode` must be one of {', '.join(map(repr, MODES))}. "
                f"Received: mode={mode!r}."
            )
        if chunk_size is not None:
            if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(
                chunk_size, (int, np.integer)
            ):
                raise JacketTypeError(
                    f"{fn_name}: `chunk_size` must be a positive integer or None. "
                    f"Received: chunk_size={chunk_size!r} of type {type(chunk_size).__name__}."
                )
            if chunk_size <= 0:
                raise JacketValueError(
                    f"{fn_name}: `chunk_size` must be a positive integer. "
                    f"Received: chunk_size={chunk_size}. Pass None to choose it from memory."
                )
            chunk_size = int(chunk_size)
        for name, value in (("flatten", flatten), ("training", training)):
            check_flag(fn_name, name, value)
        if isinstance(per_sample, str):
            if per_sample != "diagonal":
                raise JacketValueError(
                    f"{fn_name}: `per_sample` must be True, False or 'diagonal'. "
                    f"Received: per_sample={per_sample!r}. Pass one of those three."
                )
        else:
            check_flag(fn_name, "per_sample", per_sample)
            per_sample = bool(per_sample)
        budget = (
            default_memory_budget()
            if memory_budget is None
            else parse_bytes(fn_name, "memory_budget", memory_budget)
        )
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise JacketValueError(
                f"{fn_name}: `strategy` must be one of {', '.join(map(repr, STRATEGIES))}. "
                f"Received: strategy={strategy!r}."
            )
        if strategy == "replicate" and (per_sample is not True or training):
            raise JacketValueError(
                f"{fn_name}: `strategy='replicate'` tiles the batch, which changes what the model "
                f"sees when samples interact or the model runs in training mode. Received: "
                f"strategy='replicate' with per_sample={per_sample!r}, "
                f"training={bool(training)}. Use strategy='vmap', 'loop' or 'auto'."
            )
        return cls(
            mode,
            chunk_size,
            bool(flatten),
            per_sample,
            bool(training),
            budget,
            strategy,
            memory_budget is None,
        )


_PLAIN = frozenset((str, int, bool, type(None)))
_CHECKED: dict = {}  # plain arguments -> their checked `Options`
