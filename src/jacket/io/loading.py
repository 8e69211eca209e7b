"""A model file and a file of its inputs, loaded together: what every command starts with.

>>> run = io.load("model.keras", "inputs.npz")            # checked, loaded, read (lazily)
>>> run.samples, run.describe()
(1000, '(1000, 28, 28, 1)')
>>> for xb in run.batches(64): ...                          # NumPy, in the model's dtype
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import JacketValueError
from .images import ImageStack
from .inputs import check_inputs_source, iter_batches, num_samples, read_inputs
from .models import check_model_source, load_model


@dataclass
class Loaded:
    """A model and its inputs (see `load`).

    Attributes:
      model: The model, as `load_model` returns it.
      x: The inputs, as `read_inputs` returns them (possibly lazy: a memory map, a zarr array, an
        `ImageStack`, or a list/dict of them).
      samples: How many samples `x` holds (at least one).
      source: The model file (or `module:function`) it was loaded from.
      inputs: The inputs file, folder or glob they were read from.
    """

    model: Any
    x: Any
    samples: int
    source: str
    inputs: str

    def describe(self) -> str:
        """The inputs' shapes in words, e.g. `(100, 8, 8, 1) from 100 image(s)`."""
        return describe_inputs(self.x)

    def batches(self, batch_size: int) -> Iterator[Any]:
        """The samples as NumPy batches in the model's dtype, read one batch at a time."""
        return (batch for _, _, batch in iter_batches(self.x, batch_size, model=self.model))

    def first(self, count: int):
        """The first `count` samples (fewer if there are fewer), as one NumPy batch."""
        return next(self.batches(count))

    def single(self, what: str) -> tuple[int, ...]:
        """Check that the model takes one input and returns one output tensor, for `what` (the
        caller's name, e.g. "jacket norms"), and return the output's per-sample shape.

        Raises:
          JacketValueError: naming `what`, what the model takes or returns, and the fix.
        """
        import keras

        if isinstance(self.x, (Mapping, list, tuple)):
            raise JacketValueError(
                f"{what} needs a model with one input; {self.source!r} takes {len(self.x)} "
                f"({self.describe()}). Wrap it in a model that takes one tensor."
            )
        y = self.model(self.first(1))
        if keras.tree.is_nested(y):
            count = len(keras.tree.flatten(y))
            raise JacketValueError(
                f"{what} needs a model with one output tensor; {self.source!r} returns {count} "
                f"(a {type(y).__name__}). Wrap it in a model that returns one, e.g. "
                "`keras.Model(model.inputs, model.outputs[0])`."
            )
        return tuple(int(d) for d in y.shape[1:])


def check_sources(model: str | os.PathLike, inputs: str | os.PathLike) -> None:
    """Check, without importing Keras, that `model` and `inputs` name files that can be read
    (see `check_model_source` and `check_inputs_source`)."""
    check_model_source(model)
    check_inputs_source(inputs)


def load(
    model: str | os.PathLike,
    inputs: str | os.PathLike,
    *,
    unsafe: bool = False,
    size: tuple[int, int] | None = None,
) -> Loaded:
    """Load a model and read its inputs (see `load_model` and `read_inputs`).

    Raises:
      JacketValueError: for a file that cannot be used (see there), or inputs without samples.
    """
    check_sources(model, inputs)
    loaded = load_model(model, unsafe=unsafe)
    x = read_inputs(inputs, loaded, size=size)
    samples = num_samples(x)
    if samples == 0:
        raise JacketValueError(
            f"inputs {str(inputs)!r} hold no samples. Received: {describe_inputs(x)}. Pass a "
            "file with at least one sample."
        )
    return Loaded(loaded, x, samples, str(model), str(inputs))


def describe_inputs(x) -> str:
    """The shapes of `x` (an array-like or a list/dict of them) in words."""
    if isinstance(x, Mapping):
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return ", ".join(str(tuple(v.shape)) for v in x)
    text = str(tuple(x.shape))
    if isinstance(x, ImageStack):
        text += f" from {len(x.files)} image(s)"
    return text
