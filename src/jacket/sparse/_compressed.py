"""Compressed passes: all colors of a coloring pushed through one batched `jvp` (or `vjp`) of the
engine, and the nonzeros read back (NOTE: [Compressed passes] in `jacket.sparse._jacobian`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import keras
import numpy as np

from ..engine import Options, forward_mode_is_exact, jacobian, jvp, vjp
from ..engine.inputs import Inputs, numpy_dtype
from ..engine.kernels import tile
from ..errors import CouplingError
from ..trees import pack, to_numpy
from . import _color
from ._errors import SparsityWarning
from ._pattern import Detected
from ._result import SparseJacobian, entries

# a pattern needing at least this share of the dense passes is computed densely
DENSE_SHARE = 1.0
# the repeated batch of the compressed passes is probed for coupling itself up to this many
# activation elements, else the batch as given is
SMALL_PROBE = 1 << 20


@dataclass(frozen=True)
class SparsePlan:
    """How a sparse Jacobian is computed for one input signature."""

    mode: str  # "forward", "reverse" or "dense"
    n_colors: int
    chunk: int  # colors per pass
    n_passes: int
    nnz: int
    shape: tuple[int, int]
    fallback: str | None

    def describe(self) -> str:
        density = self.nnz / max(math.prod(self.shape), 1)
        if self.fallback:
            return f"dense fallback: {self.fallback}"
        return (
            f"{self.mode} mode, {self.n_colors} colors in {self.n_passes} pass(es) of "
            f"{self.chunk}, pattern {self.shape[0]}x{self.shape[1]} with {self.nnz} nonzeros "
            f"({density:.2%})"
        )


class CompressedPasses:
    """A pattern, its coloring and the mode for one input signature; seeds made per batch size."""

    def __init__(self, detected: Detected, inputs: Inputs, mode: str, training: bool):
        self.pattern = pattern = detected.pattern
        self.in_structure, self.y_structure = inputs.structure, detected.y_structure
        self.in_leaves = list(inputs.leaves)
        self.out_leaves = list(detected.out_leaves)
        self.in_size = sum(leaf.size for leaf in self.in_leaves)
        self.out_size = sum(leaf.size for leaf in self.out_leaves)
        self.activation_size = detected.activation_size
        self.rows, self.cols = entries(pattern)
        self.training = training
        self.colorings = {}
        if mode in ("auto", "forward"):
            self.colorings["forward"] = _color.color(pattern, "columns")
        if mode in ("auto", "reverse"):
            self.colorings["reverse"] = _color.color(pattern, "rows")
        counts = {m: int(c.max(initial=-1)) + 1 for m, c in self.colorings.items()}
        if mode == "auto":
            # fewer colors wins; on a tie reverse, whose batched VJP was 1.3-3x faster than the
            # batched JVP on all three backends (3 x Conv2D 3x3, 49 colors, 64x64: TensorFlow's
            # forward accumulator, JAX's jvp, PyTorch's double-backward JVP)
            mode = min(counts, key=lambda m: (counts[m], m != "reverse"))
        self.forward_checked = False
        self.switched = None  # why forward mode was given up for reverse mode, if it was
        self._seeds: dict = {}
        self._probed: set = set()
        self._warned = False
        self._use(mode)

    def _use(self, mode: str) -> None:
        """Compress the columns ("forward") or the rows ("reverse")."""
        if mode not in self.colorings:
            self.colorings[mode] = _color.color(
                self.pattern, "columns" if mode == "forward" else "rows"
            )
        self.mode = mode
        self.colors = self.colorings[mode]
        self.n_colors = int(self.colors.max(initial=-1)) + 1
        dense_passes = min(self.in_size, self.out_size)
        pattern = self.pattern
        self.fallback = None
        if self.n_colors >= DENSE_SHARE * dense_passes and pattern.nnz:
            self.fallback = (
                f"the pattern ({self.out_size}x{self.in_size}, {pattern.nnz} nonzeros, "
                f"{pattern.nnz / max(self.out_size * self.in_size, 1):.0%} dense) needs "
                f"{self.n_colors} compressed passes against {dense_passes} dense ones"
            )
        elif self.training:
            self.fallback = (
                "in training mode the compressed passes, separate calls of the model, could "
                "each draw their own dropout masks"
            )
        if mode == "forward":  # compressed (color, out) -> entry
            self.gather = self.colors[self.cols] * self.out_size + self.rows
        else:  # compressed (color, in) -> entry
            self.gather = self.colors[self.rows] * self.in_size + self.cols

    def chunk(self, batch: int, options: Options) -> int:
        """Colors per pass: `chunk_size`, else as many as the memory budget allows."""
        if options.chunk_size is not None:
            chunk = min(options.chunk_size, self.n_colors)
        else:
            itemsize = max(np.dtype(numpy_dtype(leaf.dtype)).itemsize for leaf in self.in_leaves)
            activations = self.activation_size or 4 * (self.in_size + self.out_size)
            per_color = batch * itemsize * (3 * activations + self.in_size + self.out_size)
            chunk = max(1, min(self.n_colors, options.memory_budget // max(per_color, 1)))
        n_passes = math.ceil(self.n_colors / chunk)
        return math.ceil(self.n_colors / n_passes)  # equal passes: one compiled signature

    def plan(self, batch: int, options: Options) -> SparsePlan:
        chunk = self.chunk(batch, options)
        return SparsePlan(
            mode="dense" if self.fallback else self.mode,
            n_colors=self.n_colors,
            chunk=chunk,
            n_passes=math.ceil(self.n_colors / chunk),
            nnz=self.pattern.nnz,
            shape=tuple(self.pattern.shape),
            fallback=self.fallback,
        )

    def run(self, fn_name: str, model, inputs: Inputs, options: Options) -> SparseJacobian:
        if self.fallback:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{fn_name}: sparse=True, but {self.fallback}: the Jacobian is computed "
                    "densely (`.fallback` on the result says so).",
                    SparsityWarning,
                    stacklevel=4,
                )
            values = self._dense_values(model, inputs, options)
            mode = "dense"
        else:
            if self.mode == "forward" and not self.forward_checked:
                # NOTE: [Checked forward mode]: where no forward mode is exact on this model,
                # the rows are compressed instead (never JVPs rebuilt from reverse passes of the
                # repeated batch, which would cost a full Jacobian of it)
                self.forward_checked = True
                if not forward_mode_is_exact(model, inputs.pack(inputs.tensors), training=False):
                    self.switched = "no forward mode passed its check: the rows are compressed"
                    self._seeds.clear()
                    self._use("reverse")
                    return self.run(fn_name, model, inputs, options)
            values = self._compressed_values(fn_name, model, inputs, options)
            mode = self.mode
        return SparseJacobian(
            self.pattern,
            values,
            [leaf.shape for leaf in self.in_leaves],
            [leaf.shape for leaf in self.out_leaves],
            mode=mode,
            n_colors=self.n_colors,
            fallback=self.fallback,
            flatten=options.flatten,
        )

    def _dense_values(self, model, inputs: Inputs, options: Options) -> np.ndarray:
        J = jacobian(
            model,
            inputs.pack(inputs.tensors),
            mode=options.mode,
            flatten=True,
            training=options.training,
            memory_budget=options.memory_budget,
        )
        blocks = [to_numpy(block) for block in keras.tree.flatten(J)]
        n_in = len(self.in_leaves)
        rows = [
            np.concatenate(blocks[o * n_in : (o + 1) * n_in], axis=2)
            for o in range(len(self.out_leaves))
        ]
        dense = np.concatenate(rows, axis=1)
        return dense[:, self.rows, self.cols]

    def _compressed_values(self, fn_name, model, inputs: Inputs, options: Options) -> np.ndarray:
        batch = inputs.batch
        chunk = self.chunk(batch, options)
        activations = self.activation_size or 4 * (self.in_size + self.out_size)
        # a small repeated batch is probed itself (no second compiled signature); a large one
        # on the batch as given (see the NOTE at the top)
        probe_repeated = chunk * batch * activations <= SMALL_PROBE
        if not probe_repeated:
            self._check_independent(fn_name, model, inputs)
        forward = self.mode == "forward"
        other_size = self.out_size if forward else self.in_size
        parts = []
        for seeds in self._seeds_for(batch, chunk):
            xs = inputs.pack([tile(t, chunk) for t in inputs.tensors])
            push = jvp if forward else vjp
            try:
                out = push(model, xs, seeds, per_sample=probe_repeated)
            except CouplingError as error:
                raise CouplingError(f"{fn_name} (sparse=True): {error}") from None
            flat = [to_numpy(t).reshape(chunk, batch, -1) for t in keras.tree.flatten(out)]
            parts.append(flat[0] if len(flat) == 1 else np.concatenate(flat, axis=2))
        compressed = np.concatenate(parts, axis=0)[: self.n_colors]  # (colors, batch, other)
        compressed = np.moveaxis(compressed, 1, 0).reshape(batch, self.n_colors * other_size)
        return compressed[:, self.gather]

    def _check_independent(self, fn_name, model, inputs: Inputs) -> None:
        """Probe once per batch size that samples do not interact (the engine's coupling probe,
        through `jacket.vjp`), on the batch as given (two copies of a single sample): cheaper
        than probing the repeated batch of the compressed passes."""
        if inputs.batch in self._probed:
            return
        k = 2 if inputs.batch == 1 else 1
        xs = [tile(t, k) for t in inputs.tensors]
        zeros = [
            keras.ops.zeros((k * inputs.batch,) + leaf.shape, dtype=leaf.dtype)
            for leaf in self.out_leaves
        ]
        try:
            vjp(model, inputs.pack(xs), pack(self.y_structure, zeros))
        except CouplingError as error:
            raise CouplingError(f"{fn_name} (sparse=True): {error}") from None
        self._probed.add(inputs.batch)

    def _seeds_for(self, batch: int, chunk: int) -> list:
        """Per pass, the tangents (cotangents) of `chunk` colors for the repeated batch."""
        key = (batch, chunk)
        seeds = self._seeds.get(key)
        if seeds is None:
            forward = self.mode == "forward"
            leaves = self.in_leaves if forward else self.out_leaves
            size = self.in_size if forward else self.out_size
            n_passes = math.ceil(self.n_colors / chunk)
            onehot = np.zeros((n_passes * chunk, size), dtype=np.float32)
            onehot[self.colors, np.arange(size)] = 1.0  # padding colors stay zero
            seeds = []
            for p in range(n_passes):
                block = np.broadcast_to(
                    onehot[p * chunk : (p + 1) * chunk, None, :], (chunk, batch, size)
                ).reshape(chunk * batch, size)
                tensors, offset = [], 0
                for leaf in leaves:
                    part = block[:, offset : offset + leaf.size].reshape((-1,) + leaf.shape)
                    tensors.append(
                        keras.ops.convert_to_tensor(part.astype(numpy_dtype(leaf.dtype)))
                    )
                    offset += leaf.size
                seeds.append(pack(self.in_structure if forward else self.y_structure, tensors))
            self._seeds[key] = seeds
        return seeds
