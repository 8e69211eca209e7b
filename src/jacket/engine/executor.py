"""The executor: the one place that compiles and runs a Jacobian plan.

An `Executor` is made once per plan and input signature (the compiled kernel, the seeds of each pass,
how the result is put together) and then only runs. Which plan it runs is the planner's business
(`jacket.engine.tuning`); running out of memory or meeting an op without a batching rule is
reported to the planner, which makes another executor.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from ..trees import is_leaf_structure, pack
from . import kernels
from .inputs import Inputs, Leaf, check_finite_samples, dtype_name, numpy_dtype
from .plan import Plan
from .state import Entry, ModelState


class Executor:
    """A compiled plan for one input signature and options (`flatten`, `per_sample="diagonal"`)."""

    def __init__(
        self,
        state: ModelState,
        inputs: Inputs,
        entry: Entry,
        plan: Plan,
        *,
        flatten: bool,
        diagonal: bool,
        jvp_method: str | None,
    ):
        self.state, self.entry, self.plan = state, entry, plan
        self.flatten, self.diagonal = flatten, diagonal
        self.described = dataclasses.replace(inputs, tensors=[])  # the signature, not the data
        self.structure, self.leaves, self.batch = inputs.structure, inputs.leaves, inputs.batch
        self.whole = plan.n_chunks == 1  # one compiled call does everything, assembly included
        assemble_flatten = flatten if self.whole else None
        self.kernel_key = ("jacobian", inputs.signature, plan, assemble_flatten)
        jvp = state.backend.JVPS[jvp_method] if plan.mode == "forward" else None
        self.kernel = state.kernel(
            self.kernel_key,
            lambda: kernels.jacobian_kernel(
                state.backend,
                plan,
                inputs.structure,
                inputs.leaves,
                entry.out_leaves,
                inputs.batch,
                assemble_flatten=assemble_flatten,
                jvp=jvp,
            ),
            rules=plan.rules,
        )
        self.starts = state.starts_for(plan)
        self.offsets = range(0, plan.rows, plan.chunk)
        self.dtype = numpy_dtype(inputs.leaves[0].dtype)

    def release(self) -> None:
        """Forget the compiled kernel (a plan that lost, or ran out of memory)."""
        self.state.kernels.pop(self.kernel_key, None)

    def as_tensors(self, fn_name: str, x: np.ndarray) -> list:
        """The fast path's input: one float NumPy array whose shape and dtype were seen before."""
        if not np.isfinite(x).all():
            check_finite_samples(fn_name, self.leaves[0].label, x, self.batch)
        array = x if x.dtype == self.dtype else x.astype(self.dtype)
        return [self.state.backend.as_input(array, self.leaves[0].dtype)]

    def array_call(self, fn_name: str):
        """`x -> Jacobian` for one float NumPy array of this signature, the fewest steps the
        call can take (NOTE: [The per-call path]); None where the plan needs more than one pass
        or a diagonal."""
        if not self.whole or self.diagonal or len(self.leaves) != 1:
            return None
        kernel, start, as_tensors = self.kernel, self.starts[0], self.as_tensors
        y_structure, structure = self.entry.y_structure, self.structure
        single = is_leaf_structure(y_structure) and is_leaf_structure(structure)

        def call(x: np.ndarray):
            _, blocks = kernel(as_tensors(fn_name, x), start)
            if single:
                return blocks[0]
            return pack(y_structure, [pack(structure, [block]) for block in blocks])

        return call

    def __call__(self, fn_name: str, tensors: list, checked: bool = False):
        """The Jacobian in the structure of the model's outputs of its inputs."""
        rows = self.blocks(fn_name, tensors, checked)
        return pack(self.entry.y_structure, [pack(self.structure, row) for row in rows])

    def blocks(self, fn_name: str, tensors: list, checked: bool = False) -> list:
        """The Jacobian as `blocks[j][i]` for output leaf j and input leaf i."""
        if not checked and self.state.backend.EAGER:
            for tensor, leaf in zip(tensors, self.leaves):
                check_finite_samples(fn_name, leaf.label, tensor, self.batch)
            checked = True
        out_leaves = self.entry.out_leaves
        if self.whole:
            finite, blocks = self.kernel(tensors, self.starts[0])
            self._check_finite(fn_name, tensors, finite, checked)
            n_in = len(self.leaves)
            blocks = list(blocks)
            rows = [blocks[k : k + n_in] for k in range(0, len(blocks), n_in)]
            if self.diagonal:
                rows = [
                    [self._diagonal(block, out, inp) for block, inp in zip(row, self.leaves)]
                    for row, out in zip(rows, out_leaves)
                ]
            return rows
        in_size = sum(leaf.size for leaf in self.leaves)
        kind = kernels.DiagonalAssembler if self.diagonal else kernels.Assembler
        assembler = kind(self.plan, self.batch, self.entry.out_size, in_size)
        for i, (start, offset) in enumerate(zip(self.starts, self.offsets)):
            finite, block = self.kernel(tensors, start)
            if i == 0:
                self._check_finite(fn_name, tensors, finite, checked)
            assembler.add(offset, np.asarray(keras.ops.convert_to_numpy(block)))
        J = assembler.finish()
        return kernels.split_blocks(
            J,
            self.plan.per_sample or self.diagonal,
            self.batch,
            self.leaves,
            out_leaves,
            self.flatten,
            reshape=_to_backend,
        )

    def _check_finite(self, fn_name: str, tensors: list, finite, checked: bool) -> None:
        if checked:
            return
        if not np.asarray(keras.ops.convert_to_numpy(finite)).all():
            for tensor, leaf in zip(tensors, self.leaves):
                check_finite_samples(fn_name, leaf.label, tensor, self.batch)

    def _diagonal(self, block, out: Leaf, inp: Leaf):
        """A block of the full Jacobian `(B, *out, B, *in)` -> its per-sample blocks
        `(B, *out, *in)` (flattened like the block)."""
        ops, B = keras.ops, self.batch
        J = ops.transpose(ops.reshape(block, (B, out.size, B, inp.size)), (1, 3, 0, 2))
        diagonal = ops.transpose(ops.diagonal(J, axis1=2, axis2=3), (2, 0, 1))
        shape = (B, out.size, inp.size) if self.flatten else (B,) + out.shape + inp.shape
        return ops.reshape(diagonal, shape)


def _to_backend(array: np.ndarray, shape: tuple):
    """A block of the NumPy-assembled Jacobian as a backend tensor of its own dtype."""
    array = np.reshape(array, shape)
    return keras.ops.convert_to_tensor(array, dtype=dtype_name(array.dtype))


def fast_key(x):
    """A key for inputs that need no normalising: one NumPy array (the common call)."""
    if type(x) is np.ndarray and x.ndim >= 1 and x.dtype.kind == "f":
        return (x.shape, x.dtype.str)
    return None


def tensor_key(x):
    """A key for one backend tensor of a type seen to need no normalising (`remember_tensor`):
    the call passes it to the kernel as it is, which checks its values (the kernel's `finite`,
    `Executor.blocks`)."""
    kind = type(x)
    if kind in _TENSOR_TYPES:
        return (kind, tuple(x.shape), x.dtype)
    return None


def remember_tensor(x, tensors: list) -> bool:
    """Whether `x` went through the input checks unchanged (one tensor, already of the model's
    dtype): then its type takes the fast path (`tensor_key`)."""
    if len(tensors) == 1 and tensors[0] is x:
        _TENSOR_TYPES.add(type(x))
        return True
    return False


_TENSOR_TYPES: set = set()


def wait(result) -> None:
    """Block until a (possibly asynchronous) result is computed: JAX dispatches asynchronously."""
    for leaf in keras.tree.flatten(result):
        block = getattr(leaf, "block_until_ready", None)
        if block is not None:
            block()
        elif hasattr(leaf, "numpy") and not isinstance(leaf, np.ndarray):
            pass  # TensorFlow and PyTorch results are computed when returned (on the CPU)
