"""Non-differentiable paths: where a model's gradient stops, found on its graph.

NOTE: [Non-differentiable paths]
argmax, round, floor, ceil, sign, integer casts, comparisons and `stop_gradient` have a zero (or no)
derivative: every backend differentiates through them as zero, so a Jacobian block whose output
reaches the input only through them is all zeros. That is the right derivative almost everywhere,
but rarely what a caller meant, so jacket says so once per model: a `JacketWarning` naming where
the gradient stops.

The check walks the model's graph of Keras operations from its outputs back to its inputs. A tensor
carries a gradient when it is a float tensor computed from a tensor that carries one by an
operation that passes gradients; integer and boolean tensors never carry one, and the operations of
`_ZERO_GRADIENT` pass none. An output that depends on an input but carries no gradient from it has
a structurally zero Jacobian block; the warning names the operations that cut its paths. A
Functional or Sequential model is walked through its own graph (`model.operations`), a nested one
recursively. Built-in Keras layers pass gradients (those with integer outputs, like
`Discretization`, are caught by their dtype). A custom layer or a subclassed model is opened by
calling its `call` on symbolic tensors, which records the `keras.ops` it uses as a graph of their
own; code that Keras cannot trace symbolically (a backend's own ops, NumPy) is not seen, and no
warning is given for it. A Jacobian that is zero for other reasons (a weight of zero, a dead ReLU)
is a legal result and gets no warning: only structural cuts do. The dense Jacobian walks only where
its result leaves room for a cut (NOTE: [A Jacobian that moves has no cut] in
`jacket.engine.state`); every other call walks on its first entry.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import keras

from ..errors import JacketWarning
from .cut import Cut, Prefix

# keras.ops whose derivative is zero everywhere it exists (their outputs are float)
_ZERO_GRADIENT = frozenset(
    {"Round", "Floor", "Ceil", "Trunc", "Sign", "FloorDivide", "Heaviside", "StopGradient"}
)
_MAX_DEPTH = 8  # nested custom layers opened before giving up (no warning past it)


@dataclass(frozen=True)
class _Flow:
    reachable: bool  # the tensor depends on a model input
    differentiable: bool  # ... and carries a gradient from it
    cuts: tuple[str, ...]  # the operations where gradients from the inputs stopped


_INPUT = _Flow(True, True, ())
_CONSTANT = _Flow(False, False, ())


def warn_if_cut(fn_name: str, model, structure, leaves, training: bool) -> None:
    """Warn (`JacketWarning`) if an output of `model` reaches an input only through operations
    without a gradient. Silent when the graph cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cuts = model_cuts(model, structure, leaves, training)
    except Exception:  # noqa: BLE001 - a model the symbolic walk cannot read: nothing to report
        return
    if cuts:
        hint = ""
        embeddings = [_wrt_name(cut) for cut in cuts if _IDS in cut]
        if embeddings:
            hint = (
                f" An Embedding takes integer ids, whose Jacobian does not exist: differentiate "
                f"with respect to its output instead, wrt={embeddings[0]!r}."
            )
        warnings.warn(
            f"{fn_name}: the gradient stops at {'; '.join(cuts)}: an operation with a zero or "
            "no derivative (argmax, round, floor, sign, an integer cast, a comparison, "
            "stop_gradient). Jacobian entries of outputs that reach the inputs only through it "
            f"are zero.{hint}",
            JacketWarning,
            stacklevel=4,
        )


_IDS = "which reads its input as integer ids"
_GRAPH_CLASSES = ("Functional", "Sequential")


def _wrt_name(cut: str) -> str:
    """The `wrt` name of the output of the Embedding a cut description names: the path of
    nested models down to it, or the first custom layer that holds it."""
    chain = cut.split(_IDS)[0].split(" > ")[-8:]
    names = []
    for link in chain:
        match = re.search(r"layer '([^']+)' \((\w+)\)", link)
        if match is None:
            continue
        names.append(match.group(1))
        if match.group(2) not in _GRAPH_CLASSES:
            break
    return "/".join(names) or "<embedding layer>"


def model_cuts(model, structure, leaves, training: bool) -> list[str]:
    """The operations that cut every gradient path from the inputs to some output of `model`
    (described as "layer 'name' (Class) > operation 'name' (Class)"); empty when there are none.

    `structure` and `leaves` describe the model's inputs (`jacket._model.Inputs`).
    """
    if isinstance(model, Prefix):
        return []
    if isinstance(model, Cut):  # walked from the `wrt` tensors (a cut at the top level only)
        if any(path for path, _ in model.diff) or any(t.path for t in model.of):
            return []
        inputs = [tensor for _, tensor in model.diff]
        flows = _walk(inputs, [x for t in model.of for x in t.tensors], training, 0)
        return _cuts_of(flows)
    if not isinstance(model, keras.Layer):
        return []
    graph = _own_graph(model)
    if graph is not None:
        flows = _walk(*graph, training, 0)
    else:
        if _is_builtin(model):
            return []
        from ..trees import pack

        symbolic = [
            keras.KerasTensor((None,) + tuple(leaf.shape), dtype=leaf.dtype) for leaf in leaves
        ]
        flows = _traced(model, (pack(structure, symbolic),), {}, training, 0)
        if flows is None:
            return []
        flows = [
            _Flow(f.reachable, f.differentiable, tuple(f"{_describe(model)} > {c}" for c in f.cuts))
            for f in flows
        ]
    return _cuts_of(flows)


def _cuts_of(flows) -> list[str]:
    cuts: list[str] = []
    for flow in flows:
        if flow.reachable and not flow.differentiable:
            cuts.extend(cut for cut in flow.cuts if cut not in cuts)
    return cuts


# ---------------------------------------------------------------------------------------- helpers


def _own_graph(layer):
    """`(inputs, outputs)` flat lists of a Functional or Sequential model's graph, else None."""
    from keras.src.models.functional import Functional

    if isinstance(layer, keras.Sequential):
        layer = getattr(layer, "_functional", None)
    if not isinstance(layer, Functional):
        return None
    return keras.tree.flatten(layer.inputs), keras.tree.flatten(layer.outputs)


def _is_builtin(op) -> bool:
    return type(op).__module__.startswith("keras.")


def _is_float(tensor) -> bool:
    return keras.backend.is_float_dtype(tensor.dtype)


def _describe(op) -> str:
    kind = "layer" if isinstance(op, keras.Layer) else "operation"
    return f"{kind} {op.name!r} ({type(op).__name__})"


def _walk(inputs, outputs, training: bool, depth: int) -> list[_Flow]:
    """The flow of gradients from `inputs` to each of `outputs` (symbolic tensors)."""
    memo: dict[int, _Flow] = {id(t): (_INPUT if _is_float(t) else _Flow(True, False, ()))
                              for t in inputs}  # fmt: skip
    node_flows: dict[int, list[_Flow] | None] = {}

    def visit(tensor) -> _Flow:
        # iterative post-order: deep graphs must not hit Python's recursion limit
        stack = [tensor]
        while stack:
            t = stack[-1]
            if id(t) in memo:
                stack.pop()
                continue
            history = getattr(t, "_keras_history", None)
            if history is None:
                memo[id(t)] = _CONSTANT
                stack.pop()
                continue
            node = history.operation._inbound_nodes[history.node_index]
            parents = [p for p in node.arguments.keras_tensors if id(p) not in memo]
            if parents:
                stack.extend(parents)
                continue
            stack.pop()
            memo[id(t)] = _node_flow(t, history, node, memo, node_flows, training, depth)
        return memo[id(tensor)]

    return [visit(t) for t in outputs]


def _node_flow(tensor, history, node, memo, node_flows, training, depth) -> _Flow:
    op = history.operation
    parents = [memo[id(p)] for p in node.arguments.keras_tensors]
    reachable = any(p.reachable for p in parents)
    through = any(p.differentiable for p in parents)
    cuts = tuple(dict.fromkeys(cut for p in parents for cut in p.cuts))
    if not reachable:
        return _CONSTANT
    if through and isinstance(op, keras.layers.Embedding):  # float ids cast to integers inside
        return _Flow(True, False, cuts + (f"{_describe(op)}, {_IDS}",))
    if through:
        if id(node) not in node_flows:
            node_flows[id(node)] = _inner_flows(op, node, training, depth)
        inner = node_flows[id(node)]
        if inner is not None and history.tensor_index < len(inner):
            flow = inner[history.tensor_index]
            if not flow.differentiable:
                where = [f"{_describe(op)} > {cut}" for cut in flow.cuts] or [_describe(op)]
                return _Flow(True, False, cuts + tuple(where))
        elif not isinstance(op, keras.Layer) and type(op).__name__ in _ZERO_GRADIENT:
            return _Flow(True, False, cuts + (_describe(op),))
    if through and not _is_float(tensor):
        return _Flow(True, False, cuts + (f"{_describe(op)} (integer output)",))
    return _Flow(True, through and _is_float(tensor), cuts)


def _inner_flows(op, node, training: bool, depth: int) -> list[_Flow] | None:
    """For a layer whose inside can be read: the flow from its inputs to each of its outputs."""
    if not isinstance(op, keras.Layer) or depth >= _MAX_DEPTH:
        return None
    graph = _own_graph(op)
    if graph is not None:
        return _walk(*graph, training, depth + 1)
    if _is_builtin(op):
        return None  # built-in layers pass gradients (integer outputs are caught by their dtype)
    return _traced(op, node.arguments.args, node.arguments.kwargs, training, depth + 1)


def _traced(layer, args, kwargs, training: bool, depth: int) -> list[_Flow] | None:
    """Call `layer.call` on symbolic tensors and walk the graph its `keras.ops` record."""
    kwargs = dict(kwargs)
    if getattr(layer, "_call_has_training_arg", False):
        kwargs["training"] = training
    inputs = keras.tree.flatten((args, kwargs))
    inputs = [t for t in inputs if isinstance(t, keras.KerasTensor)]
    try:
        with _nodes_restored(layer):
            outputs = layer.call(*args, **kwargs)
            outputs = keras.tree.flatten(outputs)
            if not all(isinstance(t, keras.KerasTensor) for t in outputs):
                return None
            return _walk(inputs, outputs, training, depth)
    except Exception:  # noqa: BLE001 - code Keras cannot trace symbolically: unknown
        return None


@contextlib.contextmanager
def _nodes_restored(layer):
    """Leave the graph records of `layer` and its sublayers as they were (a symbolic call adds
    nodes to every sublayer it calls)."""
    saved = [
        (sub, list(sub._inbound_nodes), list(sub._outbound_nodes))
        for sub in layer._flatten_layers(include_self=True, recursive=True)
    ]
    try:
        yield
    finally:
        for sub, inbound, outbound in saved:
            sub._inbound_nodes[:] = inbound
            sub._outbound_nodes[:] = outbound
