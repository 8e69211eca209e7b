"""Memory: the default budget of one pass, the memory a result needs, and out-of-memory errors.

NOTE: [Memory]
The default `memory_budget` (working memory of one pass: activations and result rows) is
`BUDGET_FRACTION` of the memory free when jacket first needs it: the accelerator's where the
backend can tell (PyTorch's CUDA, JAX's device statistics), else the host's available memory
(/proc/meminfo's MemAvailable, or the physical memory where that file is missing); at least
`MIN_BUDGET`, at most `MAX_BUDGET`, and `FALLBACK_BUDGET` where nothing can be measured. It is
measured once per process, so that the plans (and their compiled kernels) stay the same from
call to call. Before a new input signature runs, the result's own size is compared with the
host memory available (`check_result_fits`): a result that cannot fit is refused, with its size and
the ways around it. A pass that still runs out of memory is retried with half as many seeds,
down to one, and the smaller chunk is kept for later calls.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..checks import format_bytes
from ..errors import JacketMemoryError
from .inputs import Inputs, Leaf, numpy_dtype, result_dtype

BUDGET_FRACTION = 0.25
MIN_BUDGET = 64 << 20
MAX_BUDGET = 4 << 30
FALLBACK_BUDGET = 1 << 30


@functools.cache
def default_memory_budget() -> int:
    """`memory_budget` when none is given (see NOTE [Memory]); measured once per process."""
    import keras

    from ..backends.memory import device_free_memory

    free = device_free_memory(keras.backend.backend()) or available_memory()
    if free is None:
        return FALLBACK_BUDGET
    return int(min(MAX_BUDGET, max(MIN_BUDGET, free * BUDGET_FRACTION)))


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation without swapping, or None."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_result_fits(
    fn_name: str, inputs: Inputs, out_leaves: list[Leaf], per_sample: bool
) -> None:
    """Refuse a result larger than the host memory available (NOTE: [Memory])."""
    out_size = sum(leaf.size for leaf in out_leaves)
    in_size = sum(leaf.size for leaf in inputs.leaves)
    dtype = result_dtype(inputs.leaves + out_leaves)
    elements = inputs.batch * out_size * in_size * (1 if per_sample else inputs.batch)
    size = elements * np.dtype(numpy_dtype(dtype)).itemsize
    available = available_memory()
    if available is None or size <= available:
        return
    what = "per-sample" if per_sample else f"full (batch x batch = {inputs.batch}^2)"
    raise JacketMemoryError(
        f"{fn_name}: the result would take {format_bytes(size)} ({what} Jacobian of "
        f"{out_size} outputs x {in_size} inputs per sample, batch {inputs.batch}, {dtype}), "
        f"more than the {format_bytes(available)} of memory available. Pass a smaller batch, "
        "`sparse=True` (only the nonzeros), or stream it to disk: `jacket jacobian MODEL INPUTS "
        "-o J.zarr --batch-size N`, `jacket.io.stream_jacobian`, or "
        "`jacket.distributed.jacobian_dataset`."
    )


def is_out_of_memory(error: BaseException) -> bool:
    """An out-of-memory error of Python or of a backend (matched by name: no framework import),
    or an error raised while handling one (TensorFlow wraps errors raised while tracing)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _is_out_of_memory_itself(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _is_out_of_memory_itself(error: BaseException) -> bool:
    if isinstance(error, JacketMemoryError):
        return False
    if isinstance(error, MemoryError):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"ResourceExhaustedError", "OutOfMemoryError"}:  # TensorFlow, PyTorch
        return True
    text = str(error)
    if names & {"XlaRuntimeError", "JaxRuntimeError"} and "RESOURCE_EXHAUSTED" in text:
        return True
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text
    )
