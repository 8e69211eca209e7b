"""Cuts: a model differentiated with respect to any of its layers (`wrt`) and of any others (`of`).

NOTE: [How a model is cut]
A Functional or Sequential model keeps its graph: each layer call is a node whose arguments are
symbolic tensors (`KerasTensor`s) made by earlier nodes. A cut is that graph run with some tensors
given instead of computed:

- `wrt` names tensors of the graph (a layer's outputs, a model input); their values are the
  differentiated inputs of the cut, injected where the graph would compute them. Each is an
  independent variable: a path from one `wrt` tensor to `of` through another stops at the other
  (partial derivatives). The values come from one forward pass of the model on `x` (the
  "prefix", compiled like any kernel), so a Jacobian at a layer is taken at the activations `x`
  produces there.
- `of` names the tensors the cut returns (default: the model's outputs).
- Only the nodes between them run: the graph is walked back from `of` and stops at the `wrt`
  tensors. Model inputs the walk still reaches (a residual path from the input, the token ids an
  Embedding's mask is computed from, an integer `padding_mask`) are constants: passed to every
  kernel as arguments beside the differentiated inputs, never differentiated (`Inputs.constants`;
  the kernels split them off by count, `jacket.engine.kernels.split_arguments`).
- A mask that Keras attached to a `wrt` tensor (an `Embedding(mask_zero=True)` output) is part of
  the graph too (the `not_equal` node that computes it): it is computed from the constants and
  attached to the injected value, so the layers after it see the mask they see in the model.
- A layer inside a nested model (`"resnet50/conv5_block3_out"`, or its name alone where it is
  the only layer of that name) is reached by running that nested model's own graph the same way
  inside the outer one.
- Integer model inputs beside float ones (a `padding_mask`) are constants by default: the
  Jacobian is then with respect to the float inputs, keyed by input name.

The cut is an object the engine differentiates like a model (`make_call`, its own `ModelState`,
the coupling probe, the planner, the plan cache keyed by the model's architecture and the cut's
canonical names). It is made once per model and `wrt`/`of` and kept on the model.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras

from ..errors import JacketTypeError, JacketValueError
from ..trees import is_leaf_structure, pack, skeleton
from .inputs import (
    FLOAT_DTYPES,
    declared_inputs,
    embedding_layer_name,
    integer_input_error,
)

# --------------------------------------------------------------------------------------- graphs


def graph_of(model):
    """The Functional graph of a Functional or (built) Sequential model, else None."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def has_graph(model) -> bool:
    return isinstance(model, keras.Model) and graph_of(model) is not None


class _Graph:
    """One Functional graph, at a path of nested-model calls from the top model."""

    def __init__(self, functional, path: tuple, prefix: str):
        self.functional = functional
        self.path = path  # the calls of nested models leading here, outermost first
        self.prefix = prefix  # how names inside are shown: "" or "encoder/"
        order = []
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for node in functional._nodes_by_depth[depth]:
                order.append(node)
        self.nodes = order
        self.rank = {id(node): i for i, node in enumerate(order)}
        self.inputs = keras.tree.flatten(functional.inputs)
        self.input_ids = {id(t): i for i, t in enumerate(self.inputs)}
        self.outputs = keras.tree.flatten(functional.outputs)
        self._children: dict[int, _Graph] = {}

    def producer(self, tensor):
        history = tensor._keras_history
        return history.operation._inbound_nodes[history.node_index]

    def calls(self, op) -> list:
        """The calls (nodes) of `op` in this graph, in the graph's order."""
        return [node for node in op._inbound_nodes if id(node) in self.rank]

    def operations(self) -> list:
        seen, out = set(), []
        for node in self.nodes:
            if node.operation is not None and id(node.operation) not in seen:
                seen.add(id(node.operation))
                out.append(node.operation)
        return out

    def child(self, node) -> _Graph | None:
        """The graph of the nested model `node` calls, or None when it calls no graph model."""
        if id(node) not in self._children:
            inner = graph_of(node.operation) if isinstance(node.operation, keras.Model) else None
            if inner is None:
                self._children[id(node)] = None
            else:
                name = _call_name(self, node)
                self._children[id(node)] = _Graph(
                    inner, self.path + (node,), f"{self.prefix}{name}/"
                )
        return self._children[id(node)]

    def nested(self) -> list:
        """`(node, child graph)` for every call of a nested graph model here."""
        out = []
        for node in self.nodes:
            if node.operation is not None and not node.is_input:
                child = self.child(node)
                if child is not None:
                    out.append((node, child))
        return out


def _call_name(graph: _Graph, node) -> str:
    calls = graph.calls(node.operation)
    name = node.operation.name
    return name if len(calls) == 1 else f"{name}:{calls.index(node)}"


# -------------------------------------------------------------------------------------- targets


@dataclass(frozen=True, eq=False)
class Target:
    """One named item of `wrt` or `of`: a call (node) of the graph and the tensors it names."""

    path: tuple  # the nested-model calls leading to the node's graph, outermost first
    node: Any
    tensors: tuple  # the node's outputs it names (all of them, or the one asked for)
    label: str  # canonical: "dense", "encoder/conv:1", "lstm[0]"
    graph: _Graph

    @property
    def key(self) -> tuple:
        return tuple(id(n) for n in self.path) + (id(self.node),) + tuple(map(id, self.tensors))


_NAME = re.compile(r"^(?P<name>.+?)(?::(?P<call>\d+))?(?:\[(?P<out>\d+)\])?$")


class _Resolver:
    """Finds the targets `wrt` and `of` name in a model's graph, with the library's errors."""

    def __init__(self, fn_name: str, model, top: _Graph):
        self.fn_name, self.model, self.top = fn_name, model, top

    def items(self, arg: str, spec) -> tuple[Any, list[Target]]:
        """`(structure, targets)`: the structure of the leaves `spec` names (a target of
        several outputs is a list of them) and its targets in order."""
        if isinstance(spec, Mapping):
            keys = sorted(spec)  # the order `keras.tree.flatten` gives a dict's leaves
            resolved = [self.one(arg, spec[key], f"{arg}[{key!r}]") for key in keys]
            structure = {k: _target_structure(t) for k, t in zip(keys, resolved)}
            return {k: structure[k] for k in spec}, resolved
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise JacketValueError(
                    f"{self.fn_name}: `{arg}` must name at least one layer. Received: "
                    f"{arg}={spec!r}. Pass a layer name, a layer, or a list of them."
                )
            resolved = [self.one(arg, item, f"{arg}[{i}]") for i, item in enumerate(spec)]
            return type(spec)(_target_structure(t) for t in resolved), resolved
        target = self.one(arg, spec, arg)
        return _target_structure(target), [target]

    def one(self, arg: str, item, shown: str) -> Target:
        if isinstance(item, str):
            return self.by_name(arg, item, shown)
        if isinstance(item, keras.KerasTensor):
            return self.by_tensor(arg, item, shown)
        if isinstance(item, keras.Operation):
            return self.by_operation(arg, item, shown)
        raise JacketTypeError(
            f"{self.fn_name}: `{arg}` must be a layer name, a layer, a KerasTensor of the model, "
            f"or a list of them. Received: {shown} of type {type(item).__name__}."
        )

    # ------------------------------------------------------------------------- by name

    def by_name(self, arg: str, name: str, shown: str) -> Target:
        graph = self.top
        parts = name.split("/")
        if len(parts) == 1:
            found = self._input_key(name)
            if found is not None:
                return found
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            op, call, out = self._parse(graph, part)
            if op is None:
                if len(parts) == 1:
                    return self._nested_search(arg, name, shown)
                raise self._unknown(arg, name, shown, graph)
            node = self._choose_call(arg, graph, op, call, name, shown)
            if last:
                return self._target(graph, node, out, arg, shown)
            child = graph.child(node)
            if child is None:
                raise JacketValueError(
                    f"{self.fn_name}: `{arg}` names {name!r}, but {graph.prefix}{part!r} is not a "
                    f"Functional or Sequential model with layers inside. Received: {shown}="
                    f"{name!r}. Name a layer of the model (nested ones as 'model/layer')."
                )
            graph = child
        raise AssertionError("unreachable")  # pragma: no cover

    def _input_key(self, name: str) -> Target | None:
        """A model input by the key the model's dict of inputs gives it."""
        structure = getattr(self.top.functional, "_inputs_struct", None)
        if isinstance(structure, Mapping) and name in structure:
            tensor = structure[name]
            node = self.top.producer(tensor)
            return Target((), node, (tensor,), name, self.top)
        return None

    def _parse(self, graph: _Graph, part: str):
        """`(operation, call index or None, output index or None)` of one part of a name."""
        ops = {op.name: op for op in graph.operations()}
        if part in ops:
            return ops[part], None, None
        match = _NAME.match(part)
        if match and match.group("name") in ops and (match.group("call") or match.group("out")):
            call = match.group("call")
            out = match.group("out")
            return (
                ops[match.group("name")],
                None if call is None else int(call),
                None if out is None else int(out),
            )
        return None, None, None

    def _choose_call(self, arg, graph: _Graph, op, call, name, shown):
        calls = graph.calls(op)
        label = f"{graph.prefix}{op.name}"
        if call is not None:
            if call >= len(calls):
                raise JacketValueError(
                    f"{self.fn_name}: `{arg}` names call {call} of {label!r}, which is called "
                    f"{len(calls)} time(s) in the model. Received: {shown}={name!r}. Name a call "
                    f"from 0 to {len(calls) - 1}."
                )
            return calls[call]
        if len(calls) > 1:
            choices = " or ".join(f"'{label}:{i}'" for i in range(len(calls)))
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is ambiguous: layer {label!r} is called {len(calls)} "
                f"times in the model (a shared layer). Received: {shown}={name!r}. Name the call "
                f"to choose: {choices} (in the order of the model's graph)."
            )
        return calls[0]

    def _nested_search(self, arg: str, name: str, shown: str) -> Target:
        found = []  # (graph, operation)

        def search(graph):
            for _, child in graph.nested():
                for op in child.operations():
                    if op.name == name or self._parse(child, name)[0] is op:
                        found.append((child, op))
                search(child)

        search(self.top)
        if not found:
            raise self._unknown(arg, name, shown, self.top)
        labels = sorted({f"{g.prefix}{op.name}" for g, op in found})
        if len(labels) > 1 or len({id(op) for _, op in found}) > 1:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is ambiguous: {name!r} is a layer of several models "
                f"nested in the model: {', '.join(map(repr, labels))}. Received: {shown}="
                f"{name!r}. Name one of them."
            )
        if len(found) > 1:  # one nested model called several times
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is ambiguous: {labels[0]!r} is inside a nested model "
                f"called several times, so {name!r} has several values. Received: {shown}="
                f"{name!r}. Name the call of the nested model, e.g. "
                f"{self._with_calls(found[0][0])}{name!r}."
            )
        return self.by_name(arg, labels[0], shown)

    def _with_calls(self, graph: _Graph) -> str:
        parts, current = [], self.top
        for node in graph.path:
            calls = current.calls(node.operation)
            parts.append(f"{node.operation.name}:{calls.index(node)}")
            current = current.child(node)
        return "'" + "/".join(parts) + "/' + "

    def _unknown(self, arg: str, name: str, shown: str, graph: _Graph) -> JacketValueError:
        names = [op.name for op in graph.operations()]
        for _, child in graph.nested() if graph is self.top else []:
            names += [f"{child.prefix}{op.name}" for op in child.operations()]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        shown_names = ", ".join(map(repr, names[:12])) + (" ..." if len(names) > 12 else "")
        return JacketValueError(
            f"{self.fn_name}: `{arg}` names no layer of the model. Received: {shown}={name!r}. "
            f"Its layers: {shown_names}.{hint}"
        )

    # --------------------------------------------------------------- by object or tensor

    def by_operation(self, arg: str, op, shown: str) -> Target:
        found = []

        def search(graph):
            if graph.calls(op):
                found.append(graph)
            for _, child in graph.nested():
                search(child)

        search(self.top)
        if not found:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is a layer that is not part of the model. Received: "
                f"{shown}={type(op).__name__} {op.name!r}. Pass a layer of the model (or its "
                "name)."
            )
        if len(found) > 1:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is ambiguous: layer {op.name!r} is called inside "
                f"several nested models. Received: {shown}={op.name!r}. Name it with its path, "
                f"e.g. {found[0].prefix + op.name!r}."
            )
        graph = found[0]
        node = self._choose_call(arg, graph, op, None, op.name, shown)
        return self._target(graph, node, None, arg, shown)

    def by_tensor(self, arg: str, tensor, shown: str) -> Target:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is a KerasTensor made by no layer. Received: {shown}="
                f"{tensor!r}. Pass a tensor of the model's graph, such as `layer.output`."
            )
        node = history.operation._inbound_nodes[history.node_index]
        found = []

        def search(graph):
            if id(node) in graph.rank:
                found.append(graph)
            for _, child in graph.nested():
                search(child)

        search(self.top)
        if not found:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is a KerasTensor of another graph than the model's. "
                f"Received: {shown}={tensor!r}. Pass a tensor of the model's graph, such as "
                "`model.get_layer(name).output`."
            )
        if len(found) > 1:
            raise JacketValueError(
                f"{self.fn_name}: `{arg}` is ambiguous: the tensor is inside a nested model called "
                f"several times. Received: {shown}={tensor!r}. Name it with its path instead."
            )
        return self._target(found[0], node, history.tensor_index, arg, shown)

    def _target(self, graph: _Graph, node, out, arg, shown) -> Target:
        outputs = list(node.outputs)
        name = _call_name(graph, node)
        if out is not None:
            if out >= len(outputs):
                raise JacketValueError(
                    f"{self.fn_name}: `{arg}` names output {out} of {graph.prefix + name!r}, "
                    f"which has {len(outputs)}. Received: {shown}. Name an output from 0 to "
                    f"{len(outputs) - 1}."
                )
            label = f"{graph.prefix}{name}[{out}]" if len(outputs) > 1 else graph.prefix + name
            return Target(graph.path, node, (outputs[out],), label, graph)
        return Target(graph.path, node, tuple(outputs), graph.prefix + name, graph)


def _target_structure(target: Target):
    return None if len(target.tensors) == 1 else [None] * len(target.tensors)


def _tensor_labels(targets: list[Target]) -> list[str]:
    labels = []
    for target in targets:
        if len(target.tensors) == 1:
            labels.append(target.label)
        else:
            labels += [f"{target.label}[{i}]" for i in range(len(target.tensors))]
    return labels


# -------------------------------------------------------------------------------------- programs


class _Plan:
    """How one graph level of a cut runs: the nodes to call, in order, and what is given."""

    def __init__(self, graph: _Graph):
        self.graph = graph
        self.given: dict[int, tuple] = {}  # id(tensor) -> (tensor, index into the given values)
        self.wanted: list[tuple] = []  # (tensor, index into the outputs)
        self.children: dict[int, tuple] = {}  # id(node) -> (node, _Plan)
        self.outputs_needed = False
        self.used: set[int] = set()  # given tensors the outputs depend on
        self.needed_inputs: list[int] = []  # indices into graph.inputs
        self.steps: list = []
        self.mask_steps: list = []
        self.masks: dict[int, Any] = {}  # id(given tensor) -> its mask's KerasTensor

    def add(self, path: tuple, tensor, index: int, given: bool) -> None:
        if path:
            node = path[0]
            if id(node) not in self.children:
                self.children[id(node)] = (node, _Plan(self.graph.child(node)))
            self.children[id(node)][1].add(path[1:], tensor, index, given)
        elif given:
            self.given[id(tensor)] = (tensor, index)
        else:
            self.wanted.append((tensor, index))

    def has_wanted(self) -> bool:
        return bool(self.wanted) or any(p.has_wanted() for _, p in self.children.values())

    def plan(self, outputs_needed: bool) -> None:
        self.outputs_needed = outputs_needed
        for tensor, _ in self.given.values():
            mask = keras.src.backend.get_keras_mask(tensor)
            if isinstance(mask, keras.KerasTensor):
                self.masks[id(tensor)] = mask
        roots = [t for t, _ in self.wanted] + (list(self.graph.outputs) if outputs_needed else [])
        inputs: set[int] = set()
        used: set[int] = set()
        needed = self._walk(roots, inputs, used, with_children=True)
        self.mask_steps = self._mask_walk(list(self.masks.values()), inputs)
        masked = {id(n) for n in self.mask_steps}
        self.used = used
        self.needed_inputs = sorted(inputs)
        self.steps = sorted(
            (n for k, n in needed.items() if k not in masked),
            key=lambda n: self.graph.rank[id(n)],
        )

    def _mask_walk(self, roots, inputs: set) -> list:
        """The nodes that compute the masks of the given tensors, dependencies first (a mask's
        nodes may lie outside the graph's own record, as in a deserialised copy)."""
        order, state = [], {}
        for root in roots:
            stack = [(root, False)]
            while stack:
                tensor, expanded = stack.pop()
                if id(tensor) in self.given:
                    continue
                if id(tensor) in self.graph.input_ids:
                    inputs.add(self.graph.input_ids[id(tensor)])
                    continue
                history = getattr(tensor, "_keras_history", None)
                if history is None:
                    continue
                node = history.operation._inbound_nodes[history.node_index]
                if expanded:
                    if state.get(id(node)) != "done":
                        state[id(node)] = "done"
                        order.append(node)
                    continue
                if id(node) in state:
                    continue
                state[id(node)] = "open"
                stack.append((tensor, True))
                stack += [(t, False) for t in node.arguments.keras_tensors]
        return order

    def _walk(self, roots, inputs: set, used: set, with_children: bool) -> dict:
        graph = self.graph
        needed: dict[int, Any] = {}
        with_outputs: set[int] = set()
        stack: list = list(roots)
        if with_children:
            stack += [("child", node) for node, p in self.children.values() if p.has_wanted()]
        while stack:
            item = stack.pop()
            if isinstance(item, tuple):  # a nested model with outputs of `of` inside
                node = item[1]
                if id(node) not in needed:
                    needed[id(node)] = node
                    child = self.children[id(node)][1]
                    child.plan(outputs_needed=False)
                    stack += self._child_arguments(node, child)
                continue
            tensor = item
            if id(tensor) in self.given:
                used.add(id(tensor))
                continue
            if id(tensor) in graph.input_ids:
                inputs.add(graph.input_ids[id(tensor)])
                continue
            node = graph.producer(tensor)
            if id(node) not in graph.rank:
                raise AssertionError(f"tensor {tensor!r} is not in the graph it was found in")
            is_child = with_children and id(node) in self.children
            if id(node) in needed and not (is_child and id(node) not in with_outputs):
                continue
            needed[id(node)] = node
            if is_child:
                with_outputs.add(id(node))
                child = self.children[id(node)][1]
                child.plan(outputs_needed=True)
                stack += self._child_arguments(node, child)
            else:
                stack += list(node.arguments.keras_tensors)
        return needed

    def _child_arguments(self, node, child: _Plan) -> list:
        arguments = _nested_arguments(node, child.graph)
        return [arguments[i] for i in child.needed_inputs]

    def run(self, inputs: dict, given: list, out: list, training: bool, call_fn=None) -> dict:
        """Run this level: `inputs` maps the ids of the graph's inputs to values, `given` holds
        the given values by index; wanted values go into `out`. Returns the computed values."""
        values = dict(inputs)
        for key, (_, index) in self.given.items():
            values[key] = given[index]
        for node in self.mask_steps:
            self._step(node, values, given, out, training, call_fn)
        if call_fn is None:
            for key, mask in self.masks.items():
                if id(mask) in values:
                    keras.src.backend.set_keras_mask(values[key], values[id(mask)])
        for node in self.steps:
            self._step(node, values, given, out, training, call_fn)
        for tensor, index in self.wanted:
            out[index] = values[id(tensor)]
        return values

    def _step(self, node, values: dict, given: list, out: list, training: bool, call_fn) -> None:
        if all(id(t) in values for t in node.outputs) and node.outputs:
            return
        entry = self.children.get(id(node))
        if entry is not None:
            child = entry[1]
            arguments = _nested_arguments(node, child.graph)
            child_inputs = {}
            for i in child.needed_inputs:
                value = values[id(arguments[i])]
                spec = child.graph.inputs[i]
                if call_fn is None and keras.backend.standardize_dtype(value.dtype) != (
                    keras.backend.standardize_dtype(spec.dtype)
                ):
                    value = keras.ops.cast(value, spec.dtype)
                child_inputs[id(spec)] = value
            inner = child.run(child_inputs, given, out, training, call_fn)
            if child.outputs_needed:
                for t, inner_t in zip(node.outputs, child.graph.outputs):
                    values[id(t)] = inner[id(inner_t)]
            return
        args, kwargs = node.arguments.fill_in(values)
        if call_fn is not None:
            outputs = call_fn(node.operation, args, kwargs, node)
        else:
            outputs = keras.tree.flatten(_operation_fn(node.operation, training)(*args, **kwargs))
        for t, value in zip(node.outputs, outputs):
            values[id(t)] = value


def _nested_arguments(node, child: _Graph) -> list:
    """The outer tensors a nested model's call passes to each of its inputs."""
    args = node.arguments.args
    flat = keras.tree.flatten(args[0]) if args else []
    if len(flat) != len(child.inputs) or not all(isinstance(t, keras.KerasTensor) for t in flat):
        raise JacketValueError(
            f"cut: the call of the nested model {node.operation.name!r} passes its inputs in a "
            "form jacket cannot match to the model's inputs. Received: a nested model called "
            f"with {len(flat)} tensor(s) for {len(child.inputs)} input(s). Name a layer outside "
            "it, or call the nested model with one tensor per input."
        )
    return flat


def _operation_fn(operation, training: bool):
    """The operation, called as a Functional model calls it (the `training` flag passed on)."""
    try:
        from keras.src.models.functional import operation_fn
    except ImportError:  # pragma: no cover - another Keras layout

        def operation_fn(op, training=None):
            def call(*args, **kwargs):
                if getattr(op, "_call_has_training_arg", False):
                    kwargs["training"] = training
                return op(*args, **kwargs)

            return call

    return operation_fn(operation, training=training)


class Program:
    """A model's graph run with `given` tensors injected, returning the `wanted` ones (both as
    `(path, tensor)` pairs); the model inputs it still needs are `inputs`, read from the top."""

    def __init__(self, top: _Graph, given: list[tuple], wanted: list[tuple]):
        self.top = top
        self.root = _Plan(top)
        for i, (path, tensor) in enumerate(given):
            self.root.add(path, tensor, i, True)
        for j, (path, tensor) in enumerate(wanted):
            self.root.add(path, tensor, j, False)
        self.n_given, self.n_wanted = len(given), len(wanted)
        self.root.plan(outputs_needed=False)
        self.inputs = [top.inputs[i] for i in self.root.needed_inputs]  # constants, in order

    def depends(self) -> bool:
        """Whether the wanted tensors depend on any given one."""
        return _any_used(self.root)

    def __call__(self, given: list, inputs: list, training: bool, call_fn=None) -> list:
        out: list = [None] * self.n_wanted
        seeded = {id(t): v for t, v in zip(self.inputs, inputs)}
        self.root.run(seeded, list(given), out, training, call_fn)
        return out

    def activation_size(self) -> int | None:
        """Elements of the outputs of the nodes that run, per sample, where their shapes say."""
        total = 0

        def count(plan: _Plan):
            nonlocal total
            for node in plan.steps + plan.mask_steps:
                for t in node.outputs:
                    shape = tuple(t.shape[1:])
                    if any(d is None for d in shape):
                        raise ValueError
                    total += math.prod(shape)
            for _, child in plan.children.values():
                count(child)

        try:
            count(self.root)
        except ValueError:
            return None
        return total or None


def _any_used(plan: _Plan) -> bool:
    return bool(plan.used) or any(_any_used(child) for _, child in plan.children.values())


# ------------------------------------------------------------------------------------------ cuts


class Cut:
    """A model cut between `wrt` and `of` (NOTE: [How a model is cut]): a function of the `wrt`
    values (and of constants: model inputs, other outputs of the `wrt` layers) returning the `of`
    values, which the engine differentiates like a model."""

    def __init__(self, model, top: _Graph, wrt: list[Target], in_structure, of: list[Target],
                 out_structure, wrt_inputs_only: bool):  # fmt: skip
        self.model = model
        self.top = top
        self.wrt, self.of = wrt, of
        self.in_structure, self.out_structure = in_structure, out_structure
        diff = [(t.path, tensor) for t in wrt for tensor in t.tensors]
        seen = {id(tensor) for _, tensor in diff}
        extras = []  # the other outputs of the `wrt` calls: given too, held constant
        for t in wrt:
            for tensor in t.node.outputs:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    extras.append((t.path, tensor))
        self.diff, self.extras = diff, extras
        self.labels = _tensor_labels(wrt)
        wanted = [(t.path, tensor) for t in of for tensor in t.tensors]
        self.out_labels = _tensor_labels(of)
        self.program = Program(top, diff + extras, wanted)
        self.inputs = self.program.inputs  # the model inputs held constant
        self.wrt_inputs_only = wrt_inputs_only
        self.name = f"cut of {model.name!r} from {self.labels} to {self.out_labels}"
        self._prefixes: dict = {}

    # ------------------------------------------------------------- what the engine asks of it

    @property
    def variables(self):
        return self.model.variables

    def make_call(self, training: bool, state=None):
        """`x -> y`, or `(x, constants) -> y` for a cut with constants: the cut as a function of
        one argument (stateless on `state`, as `jacket.engine.model.make_call`)."""
        mapping = None if state is None else list(zip(self.model.variables, state))
        held = bool(self.extras or self.inputs)

        def call(arg):
            x, constants = arg if held else (arg, ())
            flat = [x] if is_leaf_structure(self.in_structure) else keras.tree.flatten(x)
            n = len(self.extras)
            given = list(flat) + list(constants[:n])
            if mapping is None:
                out = self.program(given, list(constants[n:]), training)
            else:
                with keras.StatelessScope(state_mapping=mapping):
                    out = self.program(given, list(constants[n:]), training)
            return pack(self.out_structure, out)

        return call

    def __call__(self, x, constants=(), training: bool = False):
        """The `of` values at the `wrt` values `x` (and the constants)."""
        call = self.make_call(training)
        return call((x, constants)) if (self.extras or self.inputs) else call(x)

    def output_spec(self, batch: int):
        """The cut's outputs as symbolic tensors of this batch size, or None where a size is
        unknown before running."""
        specs = []
        for _, tensor in [(t.path, x) for t in self.of for x in t.tensors]:
            shape = tuple(tensor.shape[1:])
            if any(d is None for d in shape):
                return None
            specs.append(keras.KerasTensor((batch,) + shape, dtype=tensor.dtype))
        return pack(self.out_structure, specs)

    def activation_size(self) -> int | None:
        return self.program.activation_size()

    def canonical(self) -> tuple:
        """`(wrt, of)` as names that find this cut again in a copy of the model (its float64
        twin): each layer by its label, in the structure it was given."""

        def names(spec, targets):
            if spec is None:
                return None
            labels = iter(t.label for t in targets)
            if isinstance(spec, Mapping):
                by_key = dict(zip(sorted(spec), labels))
                return {k: by_key[k] for k in spec}
            if isinstance(spec, (list, tuple)):
                return type(spec)(labels)
            return next(labels)

        wrt, of = self.spec
        return names(wrt, self.wrt), names(of, self.of)

    def describe(self) -> str:
        """What decides how the cut computes (for the plan cache key)."""
        return repr((self.labels, self.out_labels, [t.name for t in self.inputs]))

    # ------------------------------------------------------------------------------- prefix

    def prefix(self, with_outputs: bool) -> Prefix:
        """The forward pass from the model's inputs to the `wrt` values (and the `of` values)."""
        found = self._prefixes.get(with_outputs)
        if found is None:
            found = self._prefixes[with_outputs] = Prefix(self, with_outputs)
        return found

    def __repr__(self) -> str:
        return f"Cut({self.name})"


class Prefix:
    """The model run from its inputs to a cut's `wrt` tensors (and its `of` tensors): the values
    a cut is evaluated at. The engine compiles it like a model (its own `ModelState`)."""

    def __init__(self, cut: Cut, with_outputs: bool):
        self.cut = cut
        self.model = cut.model
        wanted = cut.diff + cut.extras
        if with_outputs:
            wanted = wanted + [(t.path, x) for t in cut.of for x in t.tensors]
        self.program = Program(cut.top, [], wanted)
        self.inputs = self.program.inputs
        self.n_wanted = len(wanted)
        self.name = f"prefix of {cut.name}"

    @property
    def variables(self):
        return self.model.variables

    def make_call(self, training: bool, state=None):
        mapping = None if state is None else list(zip(self.model.variables, state))

        def call(arg):
            _, constants = arg if self.inputs else (arg, ())
            if mapping is None:
                return self.program([], list(constants), training)
            with keras.StatelessScope(state_mapping=mapping):
                return self.program([], list(constants), training)

        return call

    def __call__(self, x, constants=(), training: bool = False):
        call = self.make_call(training)
        return call((x, constants)) if self.inputs else call(x)

    def output_spec(self, batch: int):
        return None

    def activation_size(self) -> int | None:
        return self.program.activation_size()

    def describe(self) -> str:
        return "prefix " + self.cut.describe()


# ------------------------------------------------------------------------------ making a cut


def check_graph_model(fn_name: str, model, why: str) -> _Graph:
    """The model's top graph, or the library's error saying what works instead."""
    graph = graph_of(model) if isinstance(model, keras.Model) else None
    if graph is not None:
        return _graph_cached(model, graph)
    if isinstance(model, keras.Sequential):
        raise JacketValueError(
            f"{fn_name}: {why} needs the model's graph of layers, and this Sequential model is not "
            "built yet. Received: an unbuilt Sequential model. Give it an `keras.Input(shape)` "
            "first layer, or call it once on a batch."
        )
    kind = (
        f"a subclassed model ({type(model).__name__})"
        if isinstance(model, keras.Model)
        else f"a {type(model).__name__}"
    )
    raise JacketTypeError(
        f"{fn_name}: {why} needs a Functional or Sequential model, whose graph of layers jacket "
        f"can cut; {kind} runs its layers in Python code it cannot cut. Received: {kind}. Pass "
        "the part you want as a model or function of its own and its input explicitly: e.g. "
        "`jacket.jacobian(lambda h: head(h), h)` with `h` the layer's output, or build the model "
        "with the Functional API."
    )


def _graph_cached(model, graph) -> _Graph:
    cached = getattr(model, "_jacket_graph", None)
    if cached is None or cached.functional is not graph:
        cached = _Graph(graph, (), "")
        try:
            object.__setattr__(model, "_jacket_graph", cached)
        except (AttributeError, TypeError):  # pragma: no cover
            pass
    return cached


def integer_inputs(model) -> list[bool] | None:
    """Per declared input (in flatten order), whether it is integer; None when undeclared."""
    declared = declared_inputs(model)
    if declared is None:
        return None
    specs = [declared] if is_leaf_structure(declared) else keras.tree.flatten(declared)
    return [keras.backend.standardize_dtype(s.dtype) not in FLOAT_DTYPES for s in specs]


def _freeze(spec):
    """A hashable key of a `wrt`/`of` argument (layers and tensors by identity)."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return ("dict",) + tuple((k, _freeze(v)) for k, v in spec.items())
    if isinstance(spec, (list, tuple)):
        return (type(spec).__name__,) + tuple(_freeze(v) for v in spec)
    return ("id", id(spec))


def cut_for(fn_name: str, model, wrt, of) -> Cut | None:
    """The model's cut for `wrt` and `of` (made once, kept on the model); None when the call is
    the model itself (no `wrt`, no `of`, no integer input held constant)."""
    if wrt is None and of is None:
        integer = integer_inputs(model) if isinstance(model, keras.Model) else None
        if not integer or not any(integer) or all(integer) or not has_graph(model):
            return None
    cuts = getattr(model, "_jacket_cuts", None)
    if cuts is None:
        cuts = {}
        try:
            object.__setattr__(model, "_jacket_cuts", cuts)
        except (AttributeError, TypeError):  # pragma: no cover
            pass
    key = (_freeze(wrt), _freeze(of))
    try:
        found = cuts.get(key)
    except TypeError:  # an unhashable name
        found = None
    if found is None:
        found = _make_cut(fn_name, model, wrt, of)
        found.spec = (wrt, of)
        cuts[key] = found
    return found


def _make_cut(fn_name: str, model, wrt, of) -> Cut:
    top = check_graph_model(fn_name, model, "`wrt` or `of`" if (wrt, of) != (None, None) else "")
    resolver = _Resolver(fn_name, model, top)
    inputs_only = False
    if wrt is None:
        declared = declared_inputs(model)
        specs = [declared] if is_leaf_structure(declared) else keras.tree.flatten(declared)
        floats = [s for s in specs if keras.backend.standardize_dtype(s.dtype) in FLOAT_DTYPES]
        if not floats:
            spec = specs[0]
            raise integer_input_error(
                fn_name, model, spec.name, "x", keras.backend.standardize_dtype(spec.dtype),
                keras.backend.standardize_dtype(spec.dtype),
            )  # fmt: skip
        names = _input_keys(declared)
        if len(floats) == len(specs):
            in_structure = None if is_leaf_structure(declared) else skeleton(declared)
            targets = [Target((), top.producer(s), (s,), names[id(s)], top) for s in specs]
        else:  # integer inputs held constant: the Jacobian is keyed by input name
            in_structure = {names[id(s)]: None for s in floats}
            targets = sorted(  # the order `keras.tree.flatten` gives a dict's leaves
                (Target((), top.producer(s), (s,), names[id(s)], top) for s in floats),
                key=lambda t: t.label,
            )
        inputs_only = True
    else:
        in_structure, targets = resolver.items("wrt", wrt)
        inputs_only = all(
            not t.path and len(t.tensors) == 1 and id(t.tensors[0]) in top.input_ids
            for t in targets
        )
    for target in targets:
        for tensor in target.tensors:
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if dtype not in FLOAT_DTYPES:
                if id(tensor) in top.input_ids and not target.path:
                    raise integer_input_error(fn_name, model, target.label, "x", dtype, dtype)
                embedding = embedding_layer_name(model)
                hint = f" (pass wrt={embedding!r}, the embedding output)" if embedding else ""
                raise JacketTypeError(
                    f"{fn_name}: `wrt` names {target.label!r}, whose output is {dtype}: only "
                    f"float tensors have a derivative. Received: wrt={wrt!r}. Name a layer with "
                    f"a float output{hint}."
                )
    if of is None:
        outputs = getattr(top.functional, "_outputs_struct", None)
        of_targets = [
            Target((), top.producer(t), (t,), _output_label(top, t), top) for t in top.outputs
        ]
        out_structure = None if outputs is None else skeleton(outputs)
        if isinstance(model, keras.Sequential) or (
            isinstance(out_structure, list) and len(out_structure) == 1
        ):
            out_structure = None  # Keras returns a one-output list as the tensor
    else:
        out_structure, of_targets = resolver.items("of", of)
    cut = Cut(model, top, targets, in_structure, of_targets, out_structure, inputs_only)
    if not cut.program.depends():
        raise JacketValueError(
            f"{fn_name}: `of` ({', '.join(map(repr, cut.out_labels))}) does not depend on `wrt` "
            f"({', '.join(map(repr, cut.labels))}): the Jacobian would be zero. Received: "
            f"wrt={wrt!r}, of={of!r}. Name a `wrt` layer before the `of` layers in the model's "
            "graph."
        )
    return cut


def _output_label(top: _Graph, tensor) -> str:
    node = top.producer(tensor)
    return _call_name(top, node)


def _input_keys(declared) -> dict:
    """id(input KerasTensor) -> the key the model's input structure gives it (or its name)."""
    if isinstance(declared, Mapping):
        return {id(v): k for k, v in declared.items()}
    specs = [declared] if is_leaf_structure(declared) else keras.tree.flatten(declared)
    return {id(s): s.name for s in specs}


def graph_layers(model) -> list[tuple[str, Any]]:
    """`[(name, layer)]`: every layer call of a Functional or Sequential model in the order of its
    graph, those inside nested models in place of the nested model's call, each with the name
    `wrt`/`of` take (`"dense"`, `"shared:1"`, `"encoder/conv"`); empty for other models."""
    graph = graph_of(model) if isinstance(model, keras.Model) else None
    if graph is None:
        return []
    out: list[tuple[str, Any]] = []

    def visit(g: _Graph):
        for node in g.nodes:
            if node.operation is None or node.is_input:
                continue
            child = g.child(node)
            if child is not None:
                visit(child)
            else:
                out.append((g.prefix + _call_name(g, node), node.operation))

    visit(_graph_cached(model, graph))
    return out
