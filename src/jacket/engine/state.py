"""One typed state per model and `training` flag: everything jacket keeps between calls.

It lives on the model object itself (`state_of`), so it goes when the model goes: compiled kernels,
what a forward pass said about the outputs (`Entry`), the probes' verdicts, the planner's records
and the prepared executors, each per input signature; and a slot for the layers above the engine
(`wrappers`: `jacket.sparse` keeps its patterns and colorings there).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from .. import backends
from ..trees import skeleton
from . import kernels
from .cut import Cut, Prefix
from .dtypes import keep_float64
from .inputs import Inputs, Leaf, output_leaves
from .model import (
    eager_call,
    keeps_samples_apart,
    lifts_float64,
    make_call,
    model_kind,
    runs_its_graph,
)
from .nondiff import warn_if_cut
from .rules import layers_with_rules


@dataclass(frozen=True)
class Entry:
    """What the model's forward pass on an input signature says about its outputs."""

    y_structure: Any
    out_leaves: list[Leaf]
    activation_size: int | None  # elements of all layer outputs of one sample, where known
    kind: str  # `jacket.engine.model.model_kind`, the layers that run through a rule left out
    plain_kind: str  # the same with every layer counted (the plans without layer rules)

    @property
    def out_size(self) -> int:
        return sum(leaf.size for leaf in self.out_leaves)


class ModelState:
    """What jacket keeps for one model and `training` flag (see the module docstring)."""

    def __init__(self, model, training: bool):
        self.model = model
        self.training = training
        self.backend = backends.current()
        self.traces = 0  # kernel traces (TensorFlow, JAX), kernel runs (PyTorch)
        self.kernels: dict[tuple, Callable] = {}
        self.entries: dict[tuple, Entry] = {}
        self.independent: dict[tuple, bool] = {}  # signature -> samples stay apart (probed)
        self.forward: dict[tuple, str | None] = {}  # per-sample shapes -> name in backend.JVPS
        self.tunings: dict[tuple, Any] = {}  # (signature, options) -> `tuning.Tuning`
        self.executors: dict[tuple, Any] = {}  # (fast key, options) -> `executor.Executor`
        self.starts: dict[Any, list] = {}  # plan -> first seed of each pass
        self.wrappers: dict[tuple, Any] = {}  # state of the layers above (`jacket.sparse`)
        self.cuts_checked = False

    def kernel(self, key: tuple, build: Callable, rules: bool = False) -> Callable:
        """The compiled kernel under `key`, built by `build()` and compiled the first time; with
        `rules`, the model's layers that have a rule on this backend run through it (NOTE:
        [Layer rules] in `jacket.engine.rules`)."""
        compiled = self.kernels.get(key)
        if compiled is None:
            kernel = build()

            def counted(call, *args):
                self.traces += 1  # runs when traced (TensorFlow, JAX), every call on PyTorch
                return kernel(call, *args)

            calls = make_call
            if rules:
                calls = functools.partial(make_call, rules=self.rule_layers())
            compiled = self.backend.compile(counted, self.model, self.training, calls)
            self.kernels[key] = compiled
        return compiled

    def rule_layers(self) -> list:
        """The model's layers that a rule of this backend covers (NOTE: [Layer rules])."""
        inner = self.model.model if isinstance(self.model, (Cut, Prefix)) else self.model
        return layers_with_rules(inner, self.backend)

    def vjp(self, inputs: Inputs, rules: bool = False) -> Callable:
        """`(xs, cts) -> grads`: one VJP of the batched model, compiled (with the layer rules)."""
        return self.kernel(
            ("vjp", inputs.signature) + (("rules",) if rules else ()),
            lambda: kernels.vjp_kernel(self.backend, inputs.structure, len(inputs.leaves)),
            rules=rules,
        )

    def outputs(self, inputs: Inputs) -> Callable:
        """`xs -> ys`: the model's outputs, flat, compiled (a cut's from its inputs and constants)."""
        return self.kernel(
            ("forward", inputs.signature),
            lambda: kernels.forward_kernel(inputs.structure, len(inputs.leaves)),
        )

    def few_outputs(self, inputs: Inputs) -> Callable:
        """`outputs` for a few passes (the coupling probe's): run eagerly, without a trace, where
        the backend says that costs less (`FEW_PASSES_EAGERLY`)."""
        if not self.backend.FEW_PASSES_EAGERLY:
            return self.outputs(inputs)
        kernel = kernels.forward_kernel(inputs.structure, len(inputs.leaves))
        call = eager_call(self.model, self.training)
        return lambda tensors: kernel(call, tensors)

    def value_and_vjp(self, inputs: Inputs) -> Callable:
        """`(xs, cts) -> (ys, grads)`: the outputs and one VJP of the batched model, compiled."""
        return self.kernel(
            ("value_and_vjp", inputs.signature),
            lambda: kernels.value_and_vjp_kernel(
                self.backend, inputs.structure, len(inputs.leaves)
            ),
        )

    def jvp(self, inputs: Inputs, method: str) -> Callable:
        """`(xs, ts) -> tangents`: one JVP by `backend.JVPS[method]`, compiled."""
        return self.kernel(
            ("jvp", inputs.signature, method),
            lambda: kernels.jvp_kernel(
                self.backend, inputs.structure, self.backend.JVPS[method], len(inputs.leaves)
            ),
        )

    def entry(self, fn_name: str, inputs: Inputs, check_cuts: bool = True) -> Entry:
        """The model's outputs on this input signature (from its symbolic output where Keras can
        tell it without running the model, else from one forward pass).

        Once per model, the first entry also looks for outputs whose gradient stops (NOTE:
        [Non-differentiable paths]), unless `check_cuts` is False: the dense Jacobian asks its
        result first (`cuts_checked_by`), the probes leave it to their caller."""
        entry = self.entries.get(inputs.signature)
        if entry is None:
            inner = self.model.model if isinstance(self.model, (Cut, Prefix)) else self.model
            # the output dtype as jacket's own calls give it (float64 kept: NOTE: [Keras and
            # float64] in `jacket.engine.dtypes`), not as Keras's demotion would
            with keep_float64() if lifts_float64(inner) else contextlib.nullcontext():
                y = _symbolic_output(self.model, inputs)
            if y is None:
                call = eager_call(self.model, self.training)
                x = inputs.pack(inputs.tensors)
                constants = inputs.tensors[len(inputs.leaves) :]
                y = call((x, constants)) if constants else call(x)
            entry = Entry(
                skeleton(y),
                output_leaves(fn_name, y, inputs.batch),
                activation_size(self.model),
                model_kind(
                    self.model,
                    frozenset(
                        id(layer) for layer, rule in self.rule_layers() if not rule.keeps_kind
                    ),
                ),
                model_kind(self.model),
            )
            self.entries[inputs.signature] = entry
        if check_cuts and not self.cuts_checked:
            self.cuts_checked_by(fn_name, inputs)
        return entry

    def cuts_checked_by(self, fn_name: str, inputs: Inputs, blocks: list | None = None) -> None:
        """Warn, once per model, where an output's gradient stops (NOTE: [Non-differentiable
        paths]); `blocks`, the blocks of a Jacobian just computed, spare the graph walk when each
        has a finite non-zero entry (NOTE: [A Jacobian that moves has no cut])."""
        if self.cuts_checked:
            return
        self.cuts_checked = True
        if blocks is not None and all(_moves(block, self.backend) for block in blocks):
            return
        warn_if_cut(fn_name, self.model, inputs.structure, inputs.leaves, self.training)

    def starts_for(self, plan) -> list:
        """The first seed of each pass of `plan`, as backend scalars on compiled backends (made
        once per plan, so that one trace serves every pass)."""
        starts = self.starts.get(plan)
        if starts is None:
            starts = list(range(0, plan.rows, plan.chunk))
            if not self.backend.EAGER:
                starts = [keras.ops.convert_to_tensor(start, dtype="int32") for start in starts]
            self.starts[plan] = starts
        return starts


def _moves(block, backend) -> bool:
    """Whether a Jacobian block has a finite entry that is not zero.

    NOTE: [A Jacobian that moves has no cut]
    The graph walk of NOTE: [Non-differentiable paths] warns about an output that depends on the
    inputs only through operations without a gradient; the Jacobian of such an output is zero
    (every backend differentiates through them as zero), in every block of its row. So where each
    block of a Jacobian has a finite entry that is not zero, the walk has nothing to say, and the
    dense Jacobian's first call skips it. On a keras_hub ViT (JAX, batch 2) the walk took 0.46-0.55
    s of a 4.4 s first call: Keras traces each encoder block symbolically to open the custom
    layers. A Jacobian with an all-zero or non-finite block (a cut, a dead ReLU, a NaN) still walks.
    The block is read in place where it is in host memory, else in slices of 64 Ki entries
    until one moves (the first, as a rule), so the check copies no more than that off an
    accelerator. On a 1M-entry block on the CPU the first check took 5-9 ms on each backend,
    where slicing with the backend's ops took 60 ms on JAX (eager slices of new shapes compile).
    """
    view = backend.host_view(block) if not isinstance(block, np.ndarray) else block
    flat = keras.ops.reshape(block, (-1,)) if view is None else view.reshape(-1)
    for start in range(0, int(flat.shape[0]), _SLICE):
        part = flat[start : start + _SLICE]
        part = np.asarray(part if view is not None else keras.ops.convert_to_numpy(part))
        if np.any(np.isfinite(part) & (part != 0)):
            return True
    return False


_SLICE = 1 << 16


def _symbolic_output(model, inputs: Inputs):
    """The output of a Functional or Sequential model as Keras symbolic tensors (no forward pass),
    or None where it cannot be had that way."""
    if isinstance(model, (Cut, Prefix)):
        return model.output_spec(inputs.batch)
    declared = _declared_output(model, inputs)
    if declared is not None:
        return declared
    if type(model).__module__ not in (
        "keras.src.models.functional",
        "keras.src.models.sequential",
    ):
        return None
    specs = [
        keras.KerasTensor((inputs.batch,) + leaf.shape, dtype=leaf.dtype) for leaf in inputs.leaves
    ]
    try:
        y = model.compute_output_spec(inputs.pack(specs), training=False)
    except Exception:  # noqa: BLE001 - a model Keras cannot run symbolically runs for real
        return None
    leaves = keras.tree.flatten(y)
    if not leaves or any(d is None for leaf in leaves for d in getattr(leaf, "shape", (None,))):
        return None  # a size only a real pass tells (an op over the batch axis, say)
    return y


def _declared_output(model, inputs: Inputs):
    """The outputs a Functional graph declared when it was built, for this batch size, where they
    must be what a call gives; else None.

    NOTE: [Outputs the graph declares]
    A Functional model's output tensors, made when it was built, have the batch axis unknown and
    every other size known. For a model that keeps its samples apart by construction (built-in
    layers and per-sample ops only, `keeps_samples_apart`), called on inputs of exactly the
    declared per-sample shape and dtype, the outputs are those with the batch size filled in:
    no layer there reads the batch axis or changes a size by it. Keras's symbolic call, which
    jacket otherwise runs for them, took 0.08-0.14 s of a keras_hub ViT's first call on PyTorch
    (meta tensors, 318 layer calls; an eager forward pass took 0.03 s) and 0.08-0.10 s on JAX.
    Anything else (several inputs, a declared batch size, a size left open, a model computing in
    float64 where Keras demotes it, training mode) is traced as before.
    """
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if graph is None or not runs_its_graph(graph) or len(inputs.leaves) != 1:
        return None
    if len(graph.inputs) != 1:
        return None
    spec, leaf = graph.inputs[0], inputs.leaves[0]
    if spec.shape[0] is not None or tuple(spec.shape[1:]) != tuple(leaf.shape):
        return None
    if keras.backend.standardize_dtype(spec.dtype) != leaf.dtype:
        return None
    outputs = keras.tree.flatten(graph._outputs_struct)
    if any(o.shape[0] is not None or None in tuple(o.shape[1:]) for o in outputs):
        return None
    # (the walks over the layers last, where the signature already matches)
    if lifts_float64(model) or not keeps_samples_apart(model, training=False):
        return None
    return keras.tree.map_structure(
        lambda o: keras.KerasTensor((inputs.batch,) + tuple(o.shape[1:]), dtype=o.dtype),
        graph._outputs_struct,
    )


def activation_size(model) -> int | None:
    """Elements of all layer outputs for one sample, where the model's graph says (Functional)."""
    if isinstance(model, (Cut, Prefix)):
        return model.activation_size()
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    total = 0
    try:
        for layer in layers:
            for out in keras.tree.flatten(layer.output):
                total += math.prod(int(d) for d in out.shape[1:])
    except (AttributeError, ValueError, TypeError):
        return None
    return total or None


_ATTRIBUTE = "_jacket_state"


def state_of(model, training: bool) -> ModelState:
    """The model's state for `training`, kept on the model (bypassing Keras's attribute tracking)."""
    states = getattr(model, _ATTRIBUTE, None)
    if states is None:
        states = {}
        try:
            object.__setattr__(model, _ATTRIBUTE, states)
        except (AttributeError, TypeError):
            pass  # an object that takes no attributes: nothing is kept between calls
    state = states.get(training)
    if state is None:
        state = states[training] = ModelState(model, training)
    return state
