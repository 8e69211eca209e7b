"""Reductions of per-sample Jacobians over a dataset, defined once for every caller.

NOTE: [Reductions]
For samples `b = 1..N`, outputs `i = 1..m` (every element of every model output) and input features
`j`, with `J[b, i, j] = d y[b, i] / d x[b, j]`:

    mean_abs[j]  = 1 / (N m) * sum_b sum_i |J[b, i, j]|
    rms[j]       = sqrt(1 / (N m) * sum_b sum_i J[b, i, j]^2)
    max_abs[j]   = max_b max_i |J[b, i, j]|
    frobenius[b] = sqrt(sum_i sum_j J[b, i, j]^2)            (one value per sample)

The first three come from a `Partial` (sums of `|J|` and `J^2`, the maximum of `|J|`, and the count
`N m`) that is made per chunk of samples (`partial`), merged exactly (`combine`: sums and maxima)
and finished once (`finish`). Partials are float64 whatever the model's dtype. A chunk can be reduced
on any machine and the partials merged in any tree; `jacket.distributed` merges them in a fixed tree
over the chunk index, so the result does not depend on which chunk finished first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REDUCTIONS = ("mean_abs", "rms", "max_abs")

__all__ = [
    "REDUCTIONS",
    "Partial",
    "Sensitivity",
    "partial",
    "combine",
    "finish",
    "ranking",
    "frobenius",
]


@dataclass(frozen=True)
class Partial:
    """Sums over some samples of a dataset, enough for every reduction in `REDUCTIONS`.

    Attributes:
      sum_abs: `(in_size,)` float64, `sum_b sum_i |J[b, i, j]|`.
      sum_sq: `(in_size,)` float64, `sum_b sum_i J[b, i, j]^2`.
      max_abs: `(in_size,)` float64, `max_b max_i |J[b, i, j]|`.
      count: Terms in each sum: samples times outputs.
      samples: Samples seen.
    """

    sum_abs: np.ndarray
    sum_sq: np.ndarray
    max_abs: np.ndarray
    count: int
    samples: int


@dataclass
class Sensitivity:
    """Per-input-feature sensitivity of a model over a dataset (what `jacket.analysis.sensitivity`
    and `jacket.distributed.sensitivity_dataset` return).

    Attributes:
      values: `in_shape` float64: the reduction (see `jacket._reductions`) of `|d y_i / d x_j|`
        over the samples and every output `i`, per input feature `j`.
      ranking: `(in_size,)` flat feature indices, most sensitive first (ties: lower index first).
      reduce: "mean_abs", "rms" or "max_abs".
      output: The flat output index the derivatives were taken of, or None for all outputs.
      samples: How many samples were reduced.
    """

    values: np.ndarray
    ranking: np.ndarray
    reduce: str
    output: int | None
    samples: int

    def top(self, k: int = 10) -> list[tuple[tuple[int, ...], float]]:
        """The `k` most sensitive features: `[(index into in_shape, value), ...]`."""
        flat = self.values.reshape(-1)
        return [
            (tuple(int(i) for i in np.unravel_index(j, self.values.shape)), float(flat[j]))
            for j in self.ranking[:k]
        ]


def partial(blocks: list[np.ndarray]) -> Partial:
    """The `Partial` of one chunk of samples.

    Args:
      blocks: One array per model output, each `(samples, out_size_k, in_size)`: that output's
        flattened per-sample Jacobian with respect to the (single) input.
    """
    samples = int(blocks[0].shape[0])
    in_size = int(blocks[0].shape[2])
    sum_abs = np.zeros(in_size)
    sum_sq = np.zeros(in_size)
    max_abs = np.zeros(in_size)
    count = 0
    for block in blocks:
        magnitude = np.abs(np.asarray(block, dtype=np.float64))
        sum_abs += magnitude.sum(axis=(0, 1))
        sum_sq += np.square(magnitude).sum(axis=(0, 1))
        np.maximum(max_abs, magnitude.max(axis=(0, 1), initial=0.0), out=max_abs)
        count += samples * int(block.shape[1])
    return Partial(sum_abs, sum_sq, max_abs, count, samples)


def combine(a: Partial, b: Partial) -> Partial:
    """The `Partial` of the samples of `a` and `b` together."""
    return Partial(
        a.sum_abs + b.sum_abs,
        a.sum_sq + b.sum_sq,
        np.maximum(a.max_abs, b.max_abs),
        a.count + b.count,
        a.samples + b.samples,
    )


def finish(p: Partial, reduce: str) -> np.ndarray:
    """`(in_size,)` float64: the reduction `reduce` ("mean_abs", "rms", "max_abs") of `p`."""
    if reduce == "mean_abs":
        return p.sum_abs / p.count
    if reduce == "rms":
        return np.sqrt(p.sum_sq / p.count)
    if reduce == "max_abs":
        return p.max_abs.copy()
    raise AssertionError(f"unknown reduction {reduce!r}")


def ranking(values: np.ndarray) -> np.ndarray:
    """`(size,)` flat indices of `values`, largest first (ties: lower index first)."""
    return np.argsort(-np.asarray(values).reshape(-1), kind="stable")


def frobenius(blocks: list[np.ndarray]) -> np.ndarray:
    """`(samples,)` float64: `||J_b||_F` over every block of each sample's Jacobian.

    Args:
      blocks: The Jacobian blocks of a chunk (one per output and input), each `(samples, ...)`.
    """
    samples = int(blocks[0].shape[0])
    total = np.zeros(samples)
    for block in blocks:
        total += np.square(np.asarray(block, dtype=np.float64)).reshape(samples, -1).sum(axis=1)
    return np.sqrt(total)
