"""Sensitivity of a model's outputs to each input feature over a dataset, and saliency maps."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from ..batches import Progress, batches, single_array
from ..checks import check_model, choice, positive_int
from ..engine import jacobian, vjp
from ..engine.outputs import output_index, output_structure, outputs
from ..errors import JacketTypeError, JacketValueError
from ..trees import to_numpy
from .reductions import (  # one definition, shared with jacket.distributed
    REDUCTIONS,
    Sensitivity,
    combine,
    finish,
    partial,
    ranking,
)


@dataclass
class Saliency:
    """Gradients of one output per sample (see `jacket.analysis.saliency`).

    Attributes:
      gradient: `(batch, *in_shape)`: `d y[b, target[b]] / d x[b]`.
      target: `(batch,)` the flat output index differentiated for each sample.
      map: `(batch, *image_shape)`: `|gradient|`, with the largest over the channel axis for
        image-like inputs `(H, W, C)` (Simonyan et al. 2014).
    """

    gradient: np.ndarray
    target: np.ndarray

    @property
    def map(self) -> np.ndarray:
        magnitude = np.abs(self.gradient)
        return magnitude.max(axis=-1) if magnitude.ndim == 4 else magnitude


def sensitivity(
    model,
    data,
    *,
    reduce: str = "mean_abs",
    output: int | None = None,
    batch_size: int | None = 64,
    progress: Progress | None = None,
) -> Sensitivity:
    """Sensitivity of the outputs to each input feature, over a dataset streamed in batches.

    For each input feature `j`, reduces `|J[b, i, j]| = |d y[b, i] / d x[b, j]|` over the samples `b`
    and the outputs `i` (or one output `i`): "mean_abs" is the mean of `|J|`, "rms" the root mean
    square, "max_abs" the largest. Each batch's Jacobian is built by `jacket.jacobian` and dropped;
    with `output`, one VJP per batch gives that output's row instead. A model with several outputs
    counts them all: `y[b]` is then its outputs flattened and concatenated in the order of
    `keras.tree.flatten` (the order of `model.outputs`).

    Args:
      model: A Keras model or layer with one input (and one or several outputs).
      data: An array `(n, *in_shape)`, or an iterable streamed batch by batch of arrays or of
        tuples `(x, y)` / `(x, y, sample_weight)` (only `x` is used). A list item is read as
        several model inputs, which are not supported (NOTE: [Items of a stream]).
      reduce: "mean_abs", "rms" or "max_abs".
      output: A flat index into the model's (concatenated) outputs, e.g. a class, or None for all
        outputs.
      batch_size: Samples per engine call (the stream is re-cut to this size; the last batch is
        padded so every call has the same shape). None: as the data comes.
      progress: Called as `progress(samples_done, samples_total_or_None)` after each batch.

    Returns:
      A `Sensitivity` with `values` (`in_shape`) and `ranking` (flat indices, most sensitive first).

    Example:
      >>> s = jacket.analysis.sensitivity(model, x_test, reduce="rms")   # x_test: (360, 8, 8, 1)
      >>> s.values.shape
      (8, 8, 1)
      >>> s.top(3)            # [((row, column, channel), value), ...], most sensitive first
    """
    fn = "sensitivity"
    check_model(fn, model)
    choice(fn, "reduce", reduce, REDUCTIONS)
    batch_size = positive_int(fn, "batch_size", batch_size, allow_none=True)
    if output is not None and (
        isinstance(output, (bool, np.bool_)) or not isinstance(output, (int, np.integer))
    ):
        raise JacketTypeError(
            f"{fn}: `output` must be a flat output index (int) or None. Received: output={output!r}."
        )
    stream, total = batches(fn, data, batch_size)
    summed = seed = None
    for part in stream:
        x = part.x
        if output is None:
            blocks = keras.tree.flatten(jacobian(model, x, flatten=True))  # (b, m_k, n)
            blocks = [to_numpy(block)[: part.valid] for block in blocks]
        else:
            if seed is None or keras.tree.flatten(seed)[0].shape[0] != x.shape[0]:
                seed = _one_hot_outputs(fn, model, x, output)
            row = to_numpy(vjp(model, x, seed))
            blocks = [row.reshape(x.shape[0], 1, -1)[: part.valid]]
        summed = partial(blocks) if summed is None else combine(summed, partial(blocks))
        in_shape = x.shape[1:]
        if progress is not None:
            progress(part.stop, total)
    if summed is None:
        raise JacketValueError(
            f"{fn}: `data` has no samples. Received: an empty iterable. Pass at least one sample."
        )
    values = finish(summed, reduce)
    return Sensitivity(
        values=values.reshape(in_shape),
        ranking=ranking(values),
        reduce=reduce,
        output=None if output is None else int(output),
        samples=summed.samples,
    )


def _one_hot_outputs(fn: str, model, x: np.ndarray, output: int):
    """Cotangents for `x`'s batch in the model's output structure: 1 at the flat index `output`
    of the concatenated outputs, 0 elsewhere."""
    y = output_structure(model, x[:1])
    leaves = keras.tree.flatten(y)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    index = output_index(fn, "output", output, sum(sizes), 1)[0]
    seeds = []
    for leaf, size in zip(leaves, sizes):
        seed = np.zeros((x.shape[0], size), leaf.dtype)
        if 0 <= index < size:
            seed[:, index] = 1.0
        index -= size
        seeds.append(seed.reshape((x.shape[0],) + leaf.shape[1:]))
    return keras.tree.pack_sequence_as(y, seeds) if len(leaves) > 1 else seeds[0]


def saliency(model, x, target=None) -> Saliency:
    """Saliency: the gradient of one output per sample with respect to the input (one VJP).

    Args:
      model: A Keras model or layer with one input and one output.
      x: Input `(batch, *in_shape)`.
      target: The flat output index (class) to differentiate: an int for all samples, one per
        sample `(batch,)`, or None for each sample's largest output (its predicted class).

    Returns:
      A `Saliency` with `gradient` `(batch, *in_shape)`, `target` `(batch,)` and `map` (`|gradient|`,
      largest over channels for images).

    Example:
      >>> s = jacket.analysis.saliency(model, x_test[:8])
      >>> s.gradient.shape, s.map.shape
      ((8, 8, 8, 1), (8, 8, 8))
    """
    fn = "saliency"
    check_model(fn, model)
    x = single_array(fn, "x", x)
    y = outputs(model, x, fn)
    batch, size = y.shape[0], int(np.prod(y.shape[1:]))
    if target is None:
        index = y.reshape(batch, -1).argmax(axis=1)
    else:
        index = output_index(fn, "target", target, size, batch)
    u = np.zeros((batch, size), y.dtype)
    u[np.arange(batch), index] = 1.0
    gradient = to_numpy(vjp(model, x, u.reshape(y.shape)))
    return Saliency(gradient=gradient, target=index)
