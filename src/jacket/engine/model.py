"""The model as jacket calls it: its call with or without state, and what its layers say about it
(whether samples stay apart, what kind of model it is)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import pathlib
import sys
import weakref

import keras

from .cut import Cut, Prefix
from .dtypes import computes_in_float64, keep_float64
from .rules import applied


def make_call(model, training: bool, state: list | None = None, rules: list = ()):
    """`x_structure -> y_structure` for a Keras layer or model (or the callable itself).

    With `state` (the values of `model.variables`, in order), the model runs statelessly on those
    values: nothing of the model changes (BatchNormalization statistics, seed generators), and under
    `jax.jit` the weights are arguments instead of constants baked into the trace.

    A model that computes in float64 runs with Keras's float64-to-float32 demotion lifted (NOTE:
    [Keras and float64] in `jacket.engine.dtypes`), so its Jacobian is float64 throughout.

    With `rules` (`jacket.engine.rules.layers_with_rules`), those layers run through their rules
    (NOTE: [Layer rules]).
    """
    if rules:
        plain = make_call(model, training, state)

        def call_with_rules(*args):
            with applied(rules):
                return plain(*args)

        return call_with_rules
    if isinstance(model, (Cut, Prefix)):
        call = model.make_call(training, state)
        if not lifts_float64(model.model):
            return call

        def cut_float64(*args):
            with keep_float64():
                return call(*args)

        return cut_float64
    if not isinstance(model, keras.Layer):
        return model  # a plain callable runs as given (NOTE: [Keras and float64])
    lift = lifts_float64(model)
    if state is None:
        if not lift:
            return lambda x: model(x, training=training)

        def call_float64(x):
            with keep_float64():
                return model(x, training=training)

        return call_float64
    mapping = list(zip(model.variables, state))

    def call(x):
        with keras.StatelessScope(state_mapping=mapping):
            with keep_float64() if lift else contextlib.nullcontext():
                return model(x, training=training)

    return call


def lifts_float64(model) -> bool:
    """Whether jacket runs `model` with Keras's float64 demotion lifted (`keep_float64`): a Keras
    model that computes in float64, on a backend that demotes (all but TensorFlow)."""
    return (
        isinstance(model, keras.Layer)
        and keras.backend.backend() != "tensorflow"
        and computes_in_float64(model)
    )


def eager_call(model, training: bool):
    """`make_call` for a run outside compiled code: stateless on the current weights in training
    mode, so nothing of the model changes."""
    state = None
    if training and isinstance(model, (keras.Layer, Cut, Prefix)):
        state = [v.value for v in model.variables]
    return make_call(model, training, state)


# Keras's own layers that may run arbitrary user code or another framework's module.
_OPAQUE_LAYERS = frozenset(
    {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "Layer"}
)


def keeps_samples_apart(model, training: bool) -> bool:
    """True when the model is known, from its layers alone, never to mix samples of a batch.

    NOTE: [Samples apart by construction]
    In inference every built-in Keras layer maps each sample on its own (BatchNormalization reads
    its moving statistics; attention, recurrence and pooling work within a sample). So a
    Sequential or Functional model made only of built-in layers needs no coupling probe. Anything
    else - training mode, a subclassed model or layer, a `Lambda`, a raw `keras.ops` call in a
    Functional graph (`keras.ops.mean(h, axis=0)`) - is left to the probe in `jacket._api`.
    The few layers that `keras.applications` defines for its own models count as built in
    (`_APPLICATION_LAYERS`, by module and exact class): the probe traced and compiled a VJP of
    ConvNeXtTiny at batch 2 for 8-10 s on TensorFlow, more than half of the first call, for two
    layers that scale or pass their input through. So do the layers of keras_hub's ViT
    (`_HUB_LAYERS`, read the same way), a Functional model of any class that leaves its call to
    Keras (a keras_hub backbone: `runs_its_graph`), and an index that keeps the batch axis
    (`h[:, 0]`, the class token).
    """
    if isinstance(model, (Cut, Prefix)):
        model = model.model  # a cut of a model that keeps its samples apart keeps them apart
    if training or not isinstance(model, keras.Layer):
        return False
    return _built_in_only(model)


# Layers of `keras.applications`' own models, each sample on its own in inference (read in Keras
# 3.15): `LayerScale` is `x * gamma`, `StochasticDepth` passes `x` through (it drops paths only
# in training), `CustomScaleLayer` is `x[0] + x[1] * scale`. An exact class: a subclass may
# override `call`.
_APPLICATION_LAYERS = frozenset(
    {
        ("keras.src.applications.convnext", "LayerScale"),
        ("keras.src.applications.convnext", "StochasticDepth"),
        ("keras.src.applications.inception_resnet_v2", "CustomScaleLayer"),
    }
)


# Layers of keras_hub's ViT (`keras_hub.models.ViTBackbone`), each sample on its own in inference
# (read in keras_hub 0.32): `MLP` is two Dense layers with Dropout between; `ViTEncoderBlock` is
# LayerNormalization, MultiHeadAttention over the tokens of one sample, Dropout and that `MLP`
# with residual sums; `ViTEncoder` a stack of them and a LayerNormalization;
# `ViTPatchingAndEmbedding` a strided Conv2D, a reshape that keeps the batch axis, the class token
# tiled over the batch and concatenated on the token axis, and position embeddings added. The
# coupling probe took 0.9 s of the ViT's 3.9 s first call on JAX (batch 2, 2-core CPU).
_HUB_LAYERS = frozenset(
    ("keras_hub.src.models.vit.vit_layers", name)
    for name in ("MLP", "ViTEncoderBlock", "ViTEncoder", "ViTPatchingAndEmbedding")
)
_KNOWN_LAYERS = _APPLICATION_LAYERS | _HUB_LAYERS


# `keras.ops` that map elements to elements (`x + y` in a Functional graph is a `numpy.Add`):
# each output sample reads only the same sample of each input, as long as broadcasting does not
# pair one input's batch axis with another axis (`(B, 1) + (B,)` is `(B, B)`), so `_elementwise`
# also asks that every tensor of each of its nodes has the output's rank.
_ELEMENTWISE_OPS = frozenset(
    [("keras.src.ops.numpy", name) for name in (
        "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Negative",
        "Absolute", "Square", "Sqrt", "Exp", "Log", "Power", "Tanh", "Clip",
    )]
    + [("keras.src.ops.nn", name) for name in (
        "Relu", "Relu6", "Sigmoid", "Softplus", "Silu", "Gelu", "HardSigmoid", "Elu", "Selu",
        "LeakyRelu",
    )]
)  # fmt: skip


def _per_sample_op(operation) -> bool:
    """A layer-less node of a Functional graph that keeps each sample on its own: an elementwise
    op (`_elementwise`) or an index that keeps the whole batch axis (`h[:, 0]`)."""
    cls = type(operation)
    if (cls.__module__, cls.__qualname__) == ("keras.src.ops.numpy", "GetItem"):
        nodes = getattr(operation, "_inbound_nodes", None)
        return bool(nodes) and all(_keeps_batch(node.arguments.args) for node in nodes)
    return _elementwise(operation)


def _keeps_batch(args) -> bool:
    """`x[key]` with a key whose first entry takes the whole batch axis and whose others are
    Python ints and slices (a tensor index may pick samples)."""
    if len(args) != 2 or not isinstance(args[1], tuple) or not args[1]:
        return False
    first, *rest = args[1]
    return first == slice(None) and all(
        isinstance(k, (int, slice)) and not isinstance(k, bool) for k in rest
    )


def _elementwise(operation) -> bool:
    cls = type(operation)
    if (cls.__module__, cls.__qualname__) not in _ELEMENTWISE_OPS:
        return False
    nodes = getattr(operation, "_inbound_nodes", None)
    return bool(nodes) and all(
        len({len(t.shape) for t in list(node.input_tensors) + list(node.outputs)}) == 1
        for node in nodes
    )


def _built_in_only(layer) -> bool:
    cls = type(layer)
    if (cls.__module__, cls.__qualname__) in _KNOWN_LAYERS:
        return True
    if cls.__module__.startswith("keras.src.") and cls.__name__ in _OPAQUE_LAYERS:
        return False
    if runs_its_graph(layer) or (
        isinstance(layer, keras.Model) and cls.__module__.startswith("keras.src.")
    ):
        if cls.__module__ == "keras.src.models.sequential":
            children = layer.layers
        elif hasattr(layer, "operations"):
            children = layer.operations  # every node, the layer-less ops included
        else:
            return False
        return all(
            _built_in_only(child) if isinstance(child, keras.Layer) else _per_sample_op(child)
            for child in children
        )
    if not cls.__module__.startswith("keras.src.layers."):
        return False
    return all(
        _built_in_only(child)
        for child in layer._flatten_layers(include_self=False, recursive=False)
    )


def runs_its_graph(layer) -> bool:
    """Whether `layer` is a Functional model whose class, wherever it comes from, leaves the
    call to Keras's Functional (a keras_hub backbone): it computes its graph and nothing else."""
    for klass in type(layer).__mro__:
        if (klass.__module__, klass.__name__) == ("keras.src.models.functional", "Functional"):
            return True
        if {"call", "__call__", "_run_through_graph", "_standardize_inputs"} & vars(klass).keys():
            return False
    return False


_RECURRENT = ("RNN", "LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")


_MAX_POOLING = ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D")


def model_kind(model, ruled: frozenset = frozenset()) -> str:
    """ "recurrent", "max_pooling", "depthwise", "conv", "dense" or "other": what decides the
    fastest way to batch a model's pullbacks (see `jacket.engine.plan`), from the classes of its
    layers; those of `ruled` (ids of layers that run through a layer rule, NOTE: [Layer rules])
    do not count."""
    if isinstance(model, (Cut, Prefix)):
        model = model.model
    if not isinstance(model, keras.Layer):
        return "other"
    names = {
        cls.__name__
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if id(layer) not in ruled
        for cls in type(layer).__mro__
    }
    if names & set(_RECURRENT):
        return "recurrent"
    if names & set(_MAX_POOLING):
        return "max_pooling"
    if any(name.startswith(("DepthwiseConv", "SeparableConv")) for name in names):
        return "depthwise"
    if any(name.startswith("Conv") for name in names):
        return "conv"
    if "Dense" in names or "EinsumDense" in names:
        return "dense"
    return "other"


def architecture(model) -> str | None:
    """A digest of what decides how `model` computes, never its weights: for every layer, its
    class, its configuration, the shapes and dtypes of its variables, and for a class that is not
    Keras's own the hash of the code that defines it (`_source_digest`); for a Functional model
    its graph (in its config).
    None for what is not a Keras layer or model, or a class whose source cannot be read: such a
    model's plans are measured in every process (NOTE: [The plan cache]). A cut between layers
    (`jacket.engine.cut`) adds its `wrt`, `of` and constants to its model's."""
    if isinstance(model, (Cut, Prefix)):
        described = architecture(model.model)
        if described is None:
            return None
        text = described + model.describe()
        return hashlib.sha256(text.encode()).hexdigest()
    if not isinstance(model, keras.Layer):
        return None
    parts = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        cls = type(layer)
        item = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        if not cls.__module__.startswith("keras.src."):
            item["source"] = _source_digest(cls)
            if item["source"] is None:
                return None
        try:
            item["config"] = layer.get_config()
        except Exception:  # noqa: BLE001 - a layer without a config: its class and source tell
            item["config"] = None
        item["variables"] = [
            [list(v.shape), str(v.dtype)] for v in getattr(layer, "_trainable_variables", [])
        ] + [[list(v.shape), str(v.dtype)] for v in getattr(layer, "_non_trainable_variables", [])]
        parts.append(item)
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _source_digest(cls) -> str | None:
    """A hash of the code that defines `cls`: the whole file of its module where it has one (any
    change there changes the hash, a superset of the class's own lines), else the class's source
    as `inspect` finds it (a notebook's cell); None where neither can be read.

    NOTE: [The source of a layer class]
    `inspect.getsource` finds a class's lines by scanning and tokenizing its file: 0.155 s for the
    eleven keras_hub classes of the benchmark's ViT, most of the plan-cache key and a third of its
    first call on PyTorch (2-core CPU). Reading and hashing those files takes a few milliseconds.
    The digest is kept per class for the process.
    """
    digest = _SOURCES.get(cls)
    if digest is not None:
        return digest
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    try:
        if isinstance(path, str) and path.endswith(".py"):
            text = cls.__qualname__.encode() + b"\0" + pathlib.Path(path).read_bytes()
        else:
            text = inspect.getsource(cls).encode()
    except (OSError, TypeError):
        return None
    digest = _SOURCES[cls] = hashlib.sha256(text).hexdigest()
    return digest


_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # class -> `_source_digest`
