"""The graph of a Functional or Sequential model, and the tensors of it that `wrt` and `of` name
(NOTE: [How a model is cut] in `jacket.engine.cut`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras

from ..errors import JacketTypeError, JacketValueError

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
