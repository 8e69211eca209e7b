"""The forward Laplacian: value, gradient and Laplacian carried through a model in one pass.

NOTE: [The forward Laplacian]
A Laplacian by Hessians costs `in_size` Hessian-vector products, each a forward pass, a backward pass
and the derivative of both. The forward Laplacian (Li et al. 2023, "Forward Laplacian: a new
computational framework for neural network-based variational Monte Carlo"; folx) carries, for every
tensor `h` of the forward pass, the triple `(h, dh/dx_j for every input coordinate j, sum_j
d^2h/dx_j^2)` (a `Jet`) from the inputs to the outputs, in one pass with no backward pass at all:

- a linear map `A` (Dense, convolutions, pooling by averaging, reshapes, padding, merges by sum or
  concatenation, BatchNormalization in inference): `A h`, `A dh`, `A lap(h)` (a bias enters the
  value only);
- an elementwise `phi`: `phi(h)`, `phi'(h) dh`, `phi'(h) lap(h) + phi''(h) sum_j dh_j^2`;
- a product `a * b`: `a b`, `a' b + a b'`, `lap(a) b + a lap(b) + 2 sum_j a'_j b'_j`;
- anything else (a layer or operation without a rule here: attention, LayerNormalization, max
  pooling, a subclassed model): `f(h)`, `J dh_j`, `J lap(h) + sum_j f''[dh_j, dh_j]`, the first and
  second directional derivatives of `f` along each `dh_j` and `J lap(h)` by the backend's `jet2`
  (a JVP of a JVP), on the batch tiled `in_size + 1` times. Exact, slower than a rule.

The input's gradient is the identity, kept with a batch axis of 1 (it is the same for every
sample), and so are the gradients of every linear map of it: after the first Dense layer
`dh/dx` is the kernel itself, and `sum_j dh_j^2` its column norms, computed once for the whole
batch. The cost is about `in_size + 2` forward passes of plain matrix products, against `in_size`
HVPs (each 3 to 5 forward passes) for the trace of the Hessian. A model the walk cannot see into (a
subclassed model, a callable) goes through the fallback as one operation: the same result as
forward-over-forward JVPs. The rules run on Keras's own layers only (the exact classes: a subclass
may change `call`); Functional and Sequential models, nested or not, are walked node by node with
Keras's own graph runner. Wide inputs are split into chunks of coordinates that fit the memory
budget: the Laplacian is a sum over coordinates, so each chunk's pass adds its share.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np

from .cut import Cut
from .dtypes import keep_float64
from .inputs import Inputs, Leaf, numpy_dtype, result_dtype
from .jet_rules import CLOSED_FORMS, ELEMENTWISE, LINEAR, RULES, Jet
from .kernels import split_arguments
from .model import lifts_float64, make_call
from .state import Entry, ModelState

ops = keras.ops

# the chunk's working memory per input coordinate: this many copies of the activations
_COPIES = 3


class ScopedCall:
    """`make_call`'s call, which also lets a kernel read the model's layers under the same state
    (the weights passed as arguments under `jax.jit`: `keras.StatelessScope`)."""

    def __init__(self, model, training: bool, state: list | None = None):
        self.model = model
        self.call = make_call(model, training, state)
        self.mapping = None if state is None else list(zip(model.variables, state))

    def __call__(self, x):
        return self.call(x)

    def scope(self):
        """The state scope of the model's weights, and float64 kept for a float64 model (as in
        `make_call`: NOTE: [Keras and float64] in `jacket.engine.dtypes`)."""
        stack = contextlib.ExitStack()
        if self.mapping is not None:
            stack.enter_context(keras.StatelessScope(state_mapping=self.mapping))
        if lifts_float64(self.model.model if isinstance(self.model, Cut) else self.model):
            stack.enter_context(keep_float64())
        return stack


def scoped_kernel(state: ModelState, key: tuple, build):
    """`state.kernel`, with the kernel's `call` a `ScopedCall`."""
    compiled = state.kernels.get(key)
    if compiled is None:
        kernel = build()

        def counted(call, *args):
            state.traces += 1
            with state.backend.second_order_scope():  # NOTE: [Moments with a second derivative]
                return kernel(call, *args)

        compiled = state.backend.compile(counted, state.model, state.training, ScopedCall)
        state.kernels[key] = compiled
    return compiled


def coordinate_chunk(inputs: Inputs, entry: Entry, memory_budget: int) -> int:
    """Input coordinates per pass of the forward Laplacian: as many as fit `memory_budget`."""
    n = sum(leaf.size for leaf in inputs.leaves)
    itemsize = np.dtype(numpy_dtype(result_dtype(inputs.leaves + entry.out_leaves))).itemsize
    activations = entry.activation_size or 4 * (n + entry.out_size)
    per_coordinate = inputs.batch * itemsize * _COPIES * activations
    chunk = max(1, min(n, memory_budget // max(per_coordinate, 1)))
    return math.ceil(n / math.ceil(n / chunk))


def laplacian_kernel(backend, in_structure, in_leaves: list[Leaf], out_leaves: list[Leaf], B, k):
    """`kernel(call, xs, start)`: the share of the Laplacian of input coordinates `start .. start
    + k`, one `(B, *out_shape)` tensor per output leaf (NOTE: [The forward Laplacian])."""
    n = sum(leaf.size for leaf in in_leaves)
    dtype = result_dtype(in_leaves + out_leaves)

    def kernel(call, xs, start):
        walker = Walker(backend, k, B)
        xs, constants = split_arguments(xs, len(in_leaves))
        coordinates = ops.arange(k, dtype="int32") + start
        jets, offset = [], 0
        for x, leaf in zip(xs, in_leaves):
            columns = ops.arange(leaf.size, dtype="int32") + offset
            eye = ops.cast(ops.equal(coordinates[:, None], columns[None]), x.dtype)
            jets.append(Jet(x, ops.reshape(eye, (k, 1) + leaf.shape), None))
            offset += leaf.size
        assert offset == n
        model = call.model if isinstance(call, ScopedCall) else None
        with call.scope() if isinstance(call, ScopedCall) else contextlib.nullcontext():
            if model is not None and _walkable(model):
                outs = walker.model(model, jets)
            elif isinstance(model, Cut) and not _has_masks(model.program.root):
                outs = walker.cut(model, jets, constants)
            elif constants:  # the cut as one operation, its constants beside the jets
                outs = walker.fallback(call, ((_pack(in_structure, jets), constants),), {})
            else:
                outs = walker.fallback(call, (_pack(in_structure, jets),), {})
        laps = []
        for jet, leaf in zip(keras.tree.flatten(outs), out_leaves):
            if jet.lap is None:
                lap = ops.zeros((B,) + leaf.shape, dtype)
            else:
                lap = ops.broadcast_to(jet.lap, (B,) + tuple(jet.lap.shape[1:]))
                lap = ops.cast(ops.reshape(lap, (B,) + leaf.shape), dtype)
            # PyTorch: the graph to the weights is no part of the result
            laps.append(ops.stop_gradient(lap))
        return laps

    return kernel


def _pack(structure, flat):
    from ..trees import pack

    return pack(structure, flat)


# ------------------------------------------------------------------------------------- the walk


def _has_masks(plan) -> bool:
    """Whether a cut attaches Keras masks to its `wrt` values (NOTE: [How a model is cut]): its
    program then runs as one operation, where Keras's layers read the masks."""
    return bool(plan.masks) or any(_has_masks(child) for _, child in plan.children.values())


def _walkable(model) -> bool:
    return type(model).__module__ in (
        "keras.src.models.functional",
        "keras.src.models.sequential",
    )


class Walker:
    """Carries `Jet`s through a model: rules for Keras's common layers, the fallback elsewhere."""

    def __init__(self, backend, d: int, B: int):
        self.backend, self.d, self.B = backend, d, B

    # -- models

    def model(self, model, jets: list):
        """A Functional or Sequential model, node by node."""
        module = type(model).__module__
        if module == "keras.src.models.sequential":
            functional = getattr(model, "_functional", None)
            if functional is None:  # built without an Input: the layers in turn
                (out,) = jets
                for layer in model.layers:
                    out = self.apply(layer, (out,), {})
                return [out]
            model = functional
        outs = model._run_through_graph(
            jets, operation_fn=lambda op: lambda *args, **kwargs: self.apply(op, args, kwargs)
        )
        return keras.tree.flatten(outs)

    def cut(self, cut, jets: list, constants: list):
        """A model's cut (NOTE: [How a model is cut]), node by node: the `Jet`s of its `wrt`
        values given, its constants (other outputs of the `wrt` calls, model inputs) as they
        are."""
        n = len(cut.extras)
        given = list(jets) + list(constants[:n])

        def step(op, args, kwargs, node):
            out = self.apply(op, args, kwargs)
            return [out] if isinstance(out, Jet) or ops.is_tensor(out) else keras.tree.flatten(out)

        return cut.program(given, list(constants[n:]), False, call_fn=step)

    def apply(self, op, args, kwargs):
        """`op(*args, **kwargs)` where some arguments are `Jet`s."""
        leaves = keras.tree.flatten((args, kwargs))
        jets = [leaf for leaf in leaves if isinstance(leaf, Jet)]
        if not jets:
            return op(*args, **kwargs)
        if _walkable(op):
            (inputs,) = args
            outs = self.model(op, keras.tree.flatten(inputs))
            return outs[0] if len(outs) == 1 else outs
        rule = RULES.get(type(op))
        # a rule takes `Jet`s only: a tensor beside them (a cut's constant) goes to the fallback
        plain = any(ops.is_tensor(leaf) and not isinstance(leaf, Jet) for leaf in leaves)
        if rule is not None and not plain and _same_dtypes(op, jets):
            out = rule(self, op, args, kwargs)
            if out is not NotImplemented:
                return out
        return self.fallback(op, args, kwargs)

    # -- the pieces of the rules

    def full(self, grad):
        """`grad` with its batch axis at full size."""
        if grad.shape[1] == self.B:
            return grad
        return ops.broadcast_to(grad, (grad.shape[0], self.B) + tuple(grad.shape[2:]))

    def linear(self, fn, jets: list, bias=None):
        """`fn`, linear in the `Jet`s (a list of tensors in, one tensor out), on values, gradients
        and Laplacians; `bias` (already broadcastable) is added to the value only."""
        value = fn([jet.value for jet in jets])
        if bias is not None:
            value = ops.add(value, bias)
        width = max(int(jet.grad.shape[1]) for jet in jets)
        grads = []
        for jet in jets:
            grad = jet.grad if jet.grad.shape[1] == width else self.full(jet.grad)
            grads.append(ops.reshape(grad, (self.d * width,) + tuple(grad.shape[2:])))
        grad = fn(grads)
        grad = ops.reshape(grad, (self.d, width) + tuple(grad.shape[1:]))
        lap = None
        if any(jet.lap is not None for jet in jets):
            laps = [
                ops.broadcast_to(jet.lap, jet.value.shape)
                if jet.lap is not None
                else ops.zeros_like(jet.value)
                for jet in jets
            ]
            lap = fn(laps)
        return Jet(value, grad, lap)

    def elementwise(self, fn, jet: Jet) -> Jet:
        """`fn` applied elementwise: `phi'` and `phi''` in closed form where known, else from the
        backend's `jet2` along a tangent of ones."""
        z = jet.value
        closed = CLOSED_FORMS.get(fn)
        if closed is not None:
            y, d1, d2 = closed(z)
        else:
            ys, d1s, d2s = self.backend.jet2(lambda zs: [fn(zs[0])], [z], [ops.ones_like(z)])
            y, d1, d2 = ys[0], d1s[0], d2s[0]
        if d1 is None:  # linear
            return Jet(y, jet.grad, jet.lap)
        grad = ops.multiply(d1[None], jet.grad)
        lap = None
        if d2 is not None:
            lap = ops.multiply(d2, self.backend.square_sum(jet.grad))
        if jet.lap is not None:
            lap = ops.multiply(d1, jet.lap) if lap is None else ops.add(lap, d1 * jet.lap)
        return Jet(y, grad, lap)

    def activation(self, fn, jet: Jet) -> Jet:
        if fn is None or fn is LINEAR:
            return jet
        if fn in ELEMENTWISE:
            return self.elementwise(fn, jet)
        return self.fallback(fn, (jet,), {})

    def product(self, a: Jet, b: Jet) -> Jet:
        value = ops.multiply(a.value, b.value)
        grad = ops.add(ops.multiply(a.grad, b.value), ops.multiply(a.value, b.grad))
        lap = ops.multiply(2.0, ops.sum(ops.multiply(a.grad, b.grad), axis=0))
        lap = ops.cast(lap, value.dtype)
        if a.lap is not None:
            lap = ops.add(lap, ops.multiply(a.lap, b.value))
        if b.lap is not None:
            lap = ops.add(lap, ops.multiply(a.value, b.lap))
        return Jet(value, grad, lap)

    def fallback(self, op, args, kwargs):
        """Any operation: its first and second directional derivatives along every gradient
        direction (and its derivative along the Laplacian), by the backend's `jet2` on the batch
        tiled `d + 1` times (NOTE: [The forward Laplacian])."""
        d, B = self.d, self.B
        jets = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, Jet)]
        values, tangents = [], []
        for jet in jets:
            shape = tuple(jet.value.shape[1:])
            values.append(_tile(jet.value, d + 1))
            lap = (
                ops.zeros_like(jet.value)
                if jet.lap is None
                else ops.broadcast_to(jet.lap, jet.value.shape)
            )
            grad = ops.reshape(self.full(jet.grad), (d * B,) + shape)
            tangents.append(ops.concatenate([lap, ops.cast(grad, lap.dtype)], axis=0))
        structure = []
        # tensors beside the jets with a batch axis (a cut's constants) follow the tiled batch
        held = keras.tree.map_structure(
            lambda leaf: (
                _tile(leaf, d + 1)
                if ops.is_tensor(leaf) and not isinstance(leaf, Jet) and _batched(leaf, B)
                else leaf
            ),
            (args, kwargs),
        )

        def f(zs):
            it = iter(zs)
            a, k = keras.tree.map_structure(
                lambda leaf: next(it) if isinstance(leaf, Jet) else leaf, held
            )
            out = op(*a, **k)
            structure[:] = [out]
            return keras.tree.flatten(out) if not ops.is_tensor(out) else [out]

        ys, firsts, seconds = self.backend.jet2(f, values, tangents)
        outs = []
        for y, first, second in zip(ys, firsts, seconds):
            shape = tuple(y.shape[1:])
            curvature = ops.sum(ops.reshape(second[B:], (d, B) + shape), axis=0)
            outs.append(
                Jet(
                    y[:B],
                    ops.reshape(first[B:], (d, B) + shape),
                    ops.add(first[:B], curvature),
                )
            )
        if ops.is_tensor(structure[0]):
            return outs[0]
        return keras.tree.pack_sequence_as(structure[0], outs)


def _batched(tensor, B: int) -> bool:
    return len(tensor.shape) > 0 and tensor.shape[0] == B


def _tile(x, k: int):
    from .kernels import tile

    return tile(x, k)


def _same_dtypes(op, jets: list) -> bool:
    """A rule runs the layer's math without Keras's autocasting: only where nothing is cast."""
    policy = getattr(op, "dtype_policy", None)
    dtypes = {keras.backend.standardize_dtype(jet.value.dtype) for jet in jets}
    if len(dtypes) != 1:
        return False
    if policy is None:
        return True
    if getattr(policy, "quantization_mode", None):
        return False
    return policy.compute_dtype == policy.variable_dtype == dtypes.pop()
