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

from collections.abc import Mapping
from typing import Any

import keras

from ..errors import JacketTypeError, JacketValueError
from ..trees import is_leaf_structure, pack, skeleton
from .embedding import embedding_layer_name, integer_input_error
from .graph import Target, _call_name, _Graph, _Resolver, _tensor_labels, graph_of, has_graph
from .inputs import (
    FLOAT_DTYPES,
    declared_inputs,
)
from .program import Program

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
