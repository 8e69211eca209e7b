"""A model's graph run between `wrt` and `of` (NOTE: [How a model is cut] in `jacket.engine.cut`):
the nodes to run, and the program that runs them with any `call_fn` (the layers, or the sparsity
detection's dependency sets)."""

from __future__ import annotations

import math
from typing import Any

import keras

from ..errors import JacketValueError
from .graph import _Graph

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
