"""The plan: which passes compute a Jacobian, how many seeds go through each, and how they are batched.

NOTE: [How the plan decides]
- Mode. A Jacobian with `m` outputs and `n` inputs per sample costs `m` reverse passes (VJPs, one per
  output row) or `n` forward passes (JVPs, one per input column). `mode="auto"` takes reverse when
  `m <= n`, forward otherwise.
- Per-sample Jacobians use the batch-sum trick: sample `b`'s output depends on sample `b`'s input only,
  so one pass whose seed is the same one-hot for every sample gives row (column) `i` of every `J_b` at
  once: `m` passes over the batch instead of `batch * m`. That is only true when samples do not
  interact, which `jacket._api` checks with a probe before trusting it.
- Strategy. "replicate": the batch is tiled `k` times and `k` seeds go through one ordinary forward and
  backward pass of batch `k * batch`: big matrix products, no vectorising map. "vmap": one forward
  pass on the batch as given and `k` pullbacks (or pushforwards) mapped over it. "loop": the same,
  one seed after the other (unrolled in the graph on TensorFlow, `lax.map` on JAX). No strategy wins
  everywhere: per-sample Jacobians in inference take the backend's measured preference for the kind
  of model (`PER_SAMPLE_STRATEGY` in each backend module, keyed by `jacket._model.model_kind`:
  dense, conv, max_pooling, recurrent, other; "forward" in forward mode). Whenever the forward pass
  must see the batch exactly as given (`per_sample=False`, where samples may interact;
  `training=True`, where dropout masks and batch statistics must be the same for every seed) the plan
  never replicates. `strategy=` overrides the choice; `strategy="autotune"` times the candidates on
  the first call instead (`jacket._api._Engine._autotune`).
- Chunk. The number of seeds per pass `k` is `chunk_size` when given, else the largest that keeps the
  estimated working memory (`k * batch` copies of the model's activations and of the result rows)
  within `memory_budget`; the chunks run one after the other through one compiled kernel. The
  default budget is a fraction of the free memory (see NOTE [Memory] below).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

# NOTE: [Memory]
# The default `memory_budget` (working memory of one pass: activations and result rows) is
# `BUDGET_FRACTION` of the memory free when jacket first needs it: the accelerator's where the
# backend can tell (PyTorch's CUDA, JAX's device statistics), else the host's available memory
# (/proc/meminfo's MemAvailable, or the physical memory where that file is missing); at least
# `MIN_BUDGET`, at most `MAX_BUDGET`, and `FALLBACK_BUDGET` where nothing can be measured. It is
# measured once per process, so that the plans (and their compiled kernels) stay the same from
# call to call. Before a new input signature runs, the result's own size is compared with the
# host memory available (`jacket._api`): a result that cannot fit is refused, with its size and
# the ways around it. A pass that still runs out of memory is retried with half as many seeds,
# down to one, and the smaller chunk is kept for later calls.
BUDGET_FRACTION = 0.25
MIN_BUDGET = 64 << 20
MAX_BUDGET = 4 << 30
FALLBACK_BUDGET = 1 << 30
STRATEGIES = ("replicate", "vmap", "loop")
MAX_UNROLLED = 32  # seeds per pass when the backend unrolls a "loop" into its graph


@dataclass(frozen=True)
class Plan:
    mode: str  # "reverse" pushes output rows (VJPs); "forward" pushes input columns (JVPs)
    per_sample: bool
    strategy: str  # "replicate", "vmap" or "loop"
    chunk: int  # seeds per pass
    rows: int  # seeds in all: out_size or in_size, times batch when not per-sample

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.rows / self.chunk)

    def describe(self) -> str:
        return (
            f"{self.mode} mode, {self.rows} seeds in {self.n_chunks} pass(es) of {self.chunk}, "
            f"{self.strategy}, {'per-sample' if self.per_sample else 'full'}"
        )


def choose_mode(mode: str, out_size: int, in_size: int) -> str:
    if mode == "auto":
        return "reverse" if out_size <= in_size else "forward"
    return mode


def make_plan(
    *,
    mode: str,
    chunk_size: int | None,
    per_sample: bool,
    training: bool,
    batch: int,
    in_size: int,
    out_size: int,
    itemsize: int,
    activation_size: int | None,
    memory_budget: int = FALLBACK_BUDGET,
    preferred: dict | None = None,
    kind: str = "other",
    strategy: str = "auto",
) -> Plan:
    """Decide how to compute one Jacobian (see the NOTE at the top of this module).

    Args:
      in_size, out_size: per-sample sizes (all inputs, all outputs).
      itemsize: bytes per element of the result.
      activation_size: elements of all intermediate activations of one sample, when known.
      preferred: the backend's strategies for per-sample Jacobians in inference, by model kind.
      kind: the kind of model (`jacket._model.model_kind`).
      strategy: one of `STRATEGIES` to override the choice, else "auto".
    """
    mode = choose_mode(mode, out_size, in_size)
    seeds = out_size if mode == "reverse" else in_size
    other = in_size if mode == "reverse" else out_size
    rows = seeds if per_sample else batch * seeds
    if strategy in STRATEGIES:
        pass  # the caller's choice (checked to be allowed by the options)
    elif per_sample and not training:
        preferred = preferred or {}
        strategy = preferred.get(kind if mode == "reverse" else "forward", "vmap")
    else:
        strategy = "vmap" if (preferred or {}).get(kind) == "vmap" else "loop"
    if chunk_size is not None:
        chunk = min(chunk_size, rows)
    else:
        activations = activation_size if activation_size else 4 * (in_size + out_size)
        # forward activations kept for the backward pass, their cotangents, and the result rows
        per_seed = batch * itemsize * (2 * activations + in_size + out_size + other)
        if strategy == "replicate":
            # every seed also keeps its own copy of the forward pass's saved tensors (PyTorch's
            # autograd went 20% past the plain estimate on the memory benchmark)
            per_seed = per_seed * 3 // 2
        chunk = max(1, min(rows, memory_budget // max(per_seed, 1)))
        if strategy == "loop":
            chunk = min(chunk, MAX_UNROLLED)
        chunk = math.ceil(rows / math.ceil(rows / chunk))  # even passes: no mostly-empty last one
    return Plan(mode=mode, per_sample=per_sample, strategy=strategy, chunk=chunk, rows=rows)


@functools.cache
def default_memory_budget() -> int:
    """`memory_budget` when none is given (see NOTE [Memory]); measured once per process."""
    import keras

    from ..backends._memory import device_free_memory

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
