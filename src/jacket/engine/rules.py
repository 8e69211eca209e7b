"""Layer rules: a layer run, in jacket's own passes only, through an implementation with the same
forward values and a cheaper batched pullback on the current backend.

NOTE: [Layer rules]
A framework's pullback of a layer is written for one cotangent. Mapped over many (the "vmap"
strategy) some of them batch badly: on JAX, Keras's max pooling is `lax.reduce_window`, whose
pullback (select-and-scatter) took 76 of the 117 ms of all ten per-sample Jacobian rows of the seed
CNN at batch 32. Written as a reshape into windows, an `argmax` one-hot held by `stop_gradient`
and a sum, the same layer gives the same outputs and the same Jacobians, bit for bit, and its
pullback is a select that batches as well as any elementwise op.
- A rule is keyed by the layer's exact class (a subclass may override `call`, so it runs as
  written), applies only to the configurations it covers (`Rule.applies`), and is written once
  in `keras.ops`. Each backend names the rules it uses (`LAYER_RULES`), those measured to win on
  it (`benchmarks/layer_survey.py`; the same rewrite of max pooling gave nothing on TensorFlow,
  whose `MaxPoolGrad` batches well, nor on PyTorch).
- The user's model is never changed: for the duration of one of jacket's own calls of the model
  (`applied`), each covered layer's instance gets a `call` (or the method the rule stands in for,
  such as a convolution's `convolution_op`) that runs the rule when the calling thread is inside
  such a call, and the class's own method otherwise; when the last of jacket's
  calls leaves, the instance is as it was. Another thread calling the model meanwhile runs the
  layer's own `call`.
- Whether rules run is part of the plan (`Plan.rules`), so the planner measures a plan with them
  against the same plan without (NOTE: [Measured plans] in `jacket.engine.tuning`).
  `JACKET_LAYER_RULES=off` turns them off (for comparisons).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

# ---------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    name: str  # what a backend's `LAYER_RULES` names
    applies: Callable  # layer -> bool: the configurations the rule covers
    call: Callable  # (layer, *args, **kwargs) -> outputs, as the layer's `method`
    method: str = "call"  # the method of the layer the rule stands in for
    # whether the layer still counts toward the model's kind (`jacket.engine.model.model_kind`,
    # which picks the strategy a first call runs): a rule that removes what made the layer's
    # pullback slow to batch says False; an unrolled recurrence still compiles as one
    keeps_kind: bool = False
    # layer -> how many copies of its inner operation the rule writes (a depthwise convolution's
    # taps); None: one. The plans' opening depends on the sum (`program_size`)
    size: Callable | None = None
    # whether a first call runs with this rule (NOTE: [A rule's program]): False where the rule
    # costs the compiler more than it saves the first run
    opens: bool = True


def _pooling_windows(layer) -> bool:
    """Windows of any size and strides, with "valid" or "same" padding."""
    return layer.padding in ("valid", "same")


def _channels_last(layer, inputs):
    return keras.ops.moveaxis(inputs, 1, -1) if layer.data_format == "channels_first" else inputs


def _as_given(layer, y):
    return keras.ops.moveaxis(y, -1, 1) if layer.data_format == "channels_first" else y


def _padded(x, size, strides, dilation, padding: str, fill: float) -> tuple:
    """`(x, out)`: `x` (channels last) padded as Keras's "same" pads it (the odd element after),
    and the output size of a sliding window over it along each spatial axis."""
    spatial = tuple(x.shape[1:-1])
    reach = tuple((k - 1) * d + 1 for k, d in zip(size, dilation))
    if padding != "same":
        return x, tuple((n - r) // s + 1 for n, r, s in zip(spatial, reach, strides))
    out = tuple(math.ceil(n / s) for n, s in zip(spatial, strides))
    total = [max((o - 1) * s + r - n, 0) for o, s, r, n in zip(out, strides, reach, spatial)]
    pads = [[0, 0]] + [[t // 2, t - t // 2] for t in total] + [[0, 0]]
    return keras.ops.pad(x, pads, constant_values=fill), out


def _shifted(x, size, strides, dilation, padding: str, fill: float = 0.0) -> list:
    """The inputs of each offset of a sliding window over `x` (channels last): one strided slice
    per offset, in row-major order of the offsets (their pullbacks are pads, where a gather's
    would be a scatter)."""
    x, out = _padded(x, size, strides, dilation, padding, fill)
    return [
        x[
            (slice(None),)
            + tuple(
                slice(i * d, i * d + (o - 1) * s + 1, s)
                for i, d, o, s in zip(at, dilation, out, strides)
            )
        ]
        for at in itertools.product(*(range(k) for k in size))
    ]


def _windows(layer, x, fill: float):
    """The pooling windows of `x` (channels last) side by side on a new last axis, each in
    row-major order: `(batch, *out, channels, prod(pool_size))`. Non-overlapping windows are a
    reshape; overlapping ones a stack of `_shifted` slices."""
    ops = keras.ops
    pool = tuple(layer.pool_size)
    strides = tuple(layer.strides) if layer.strides is not None else pool
    ones = (1,) * len(pool)
    if strides != pool:
        return ops.stack(_shifted(x, pool, strides, ones, layer.padding, fill), -1)
    x, out = _padded(x, pool, pool, ones, layer.padding, fill)
    x = x[(slice(None),) + tuple(slice(0, o * k) for o, k in zip(out, pool))]  # "valid": the rest
    d, channels = len(pool), x.shape[-1]
    split = [-1]
    for o, k in zip(out, pool):
        split += [o, k]
    x = ops.reshape(x, split + [channels])
    order = [0] + [1 + 2 * i for i in range(d)] + [1 + 2 * d] + [2 + 2 * i for i in range(d)]
    return ops.reshape(ops.transpose(x, order), (-1,) + out + (channels, math.prod(pool)))


def _max_pooling(layer, inputs, **kwargs):
    """Max pooling: the windows side by side (`_windows`), the first maximum of each (as the
    framework's own pullback picks it among ties) chosen by a one-hot mask held by
    `stop_gradient`, and summed."""
    ops = keras.ops
    w = _windows(layer, _channels_last(layer, inputs), float("-inf"))
    first = ops.argmax(w, axis=-1)
    mask = ops.equal(ops.arange(w.shape[-1], dtype="int32"), ops.expand_dims(first, -1))
    y = ops.sum(ops.where(ops.stop_gradient(mask), w, ops.zeros_like(w)), axis=-1)
    return _as_given(layer, y)


MAX_POOLING = Rule("max_pooling", _pooling_windows, _max_pooling)

PATCH_CHANNELS = 4  # input channels up to which a convolution runs as patches and a matmul


def _few_channels(layer) -> bool:
    """A plain convolution (stride 1, no dilation, one group) of at most `PATCH_CHANNELS` input
    channels: the first layer of an image model."""
    rank = len(layer.kernel_size)
    channels = layer.kernel.shape[-2]
    return (
        tuple(layer.strides) == (1,) * rank
        and tuple(layer.dilation_rate) == (1,) * rank
        and layer.groups == 1
        and layer.padding in ("valid", "same")
        and channels <= PATCH_CHANNELS
    )


def _conv_patches(layer, inputs, kernel):
    """`convolution_op` as patches and a contraction: the `prod(kernel_size)` shifted copies of
    the input side by side, contracted with the kernel. The values agree with the convolution's
    up to float32 rounding (another order of the same sums). On JAX the batched pullback of a
    convolution to a few channels is slow (seed CNN, batch 32, 10 cotangents: 27.8 ms, against
    2.9 ms through a matmul and pads)."""
    x = _channels_last(layer, inputs)
    size = tuple(layer.kernel_size)
    ones = (1,) * len(size)
    patches = keras.ops.stack(_shifted(x, size, ones, ones, layer.padding), -1)  # (..., c, k)
    kernel = keras.ops.reshape(kernel, (math.prod(size),) + tuple(kernel.shape[-2:]))
    return _as_given(layer, keras.ops.einsum("...ck,kcf->...f", patches, kernel))


def _depthwise(x, kernel, size, strides, dilation, padding):
    """`x` (channels last) convolved channel by channel with `kernel` of shape `(*size, channels,
    multiplier)`, as a sum over the kernel's offsets of the shifted input times that offset's
    weights: output channel `c * multiplier + j`, as Keras orders them."""
    ops = keras.ops
    kernel = ops.reshape(kernel, (math.prod(size),) + tuple(kernel.shape[-2:]))
    y = None
    for i, part in enumerate(_shifted(x, size, strides, dilation, padding)):
        term = ops.expand_dims(part, -1) * kernel[i]  # (batch, *out, channels, multiplier)
        y = term if y is None else y + term
    return ops.reshape(y, (-1,) + tuple(y.shape[1:-2]) + (y.shape[-2] * y.shape[-1],))


def _grouped_depthwise(layer) -> bool:
    """A convolution with one group per input channel (ConvNeXt's 7x7 "depthwise" `Conv2D`)."""
    channels = layer.kernel.shape[-2] * layer.groups
    return (
        layer.groups > 1
        and layer.kernel.shape[-2] == 1
        and channels == layer.groups
        and (layer.padding in ("valid", "same"))
    )


def _grouped_slices(layer, inputs, kernel):
    """`convolution_op` of a grouped convolution with one input channel per group, as
    `_depthwise` (its kernel `(*size, 1, channels * multiplier)` is a depthwise kernel)."""
    size = tuple(layer.kernel_size)
    kernel = keras.ops.reshape(kernel, size + (layer.groups, -1))
    x = _channels_last(layer, inputs)
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    return _as_given(layer, _depthwise(x, kernel, size, strides, dilation, layer.padding))


def _plain_depthwise(layer) -> bool:
    return layer.padding in ("valid", "same")


def _depthwise_slices(layer, inputs):
    """A depthwise convolution as `_depthwise`, then the layer's bias and activation as its `call`
    adds them. The values agree with the convolution's up to float32 rounding. On JAX the batched
    pullback of a depthwise (grouped) convolution is very slow (3x3, batch 8, 16 cotangents:
    157-481 ms, against 1.6-2.0 ms through slices and multiplies; `benchmarks/layer_survey.py`)."""
    x = _channels_last(layer, inputs)
    size = tuple(layer.kernel_size)
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    y = _depthwise(x, layer.kernel, size, strides, dilation, layer.padding)
    if layer.use_bias:
        y = y + layer.bias
    y = _as_given(layer, y)
    return layer.activation(y) if layer.activation is not None else y


def _bilinear(layer) -> bool:
    return layer.interpolation == "bilinear"


def _bilinear_matrix(n: int, factor: int) -> np.ndarray:
    """`(n * factor, n)`: up-sampling of `n` samples by `factor`, bilinear with half-pixel centres
    and the edges clamped, as `ops.image.resize` samples on every backend (`jax.image.resize`,
    `tf.image.resize`, `torch.nn.functional.interpolate(align_corners=False)`)."""
    out = np.arange(n * factor)
    src = np.clip((out + 0.5) / factor - 0.5, 0, n - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, n - 1)
    matrix = np.zeros((n * factor, n))
    np.add.at(matrix, (out, low), 1 - (src - low))
    np.add.at(matrix, (out, high), src - low)
    return matrix


def _bilinear_matrices(layer, inputs):
    """Bilinear `UpSampling2D` as two contractions with the interpolation matrices of the rows and
    the columns. The values agree with `ops.image.resize`'s up to float32 rounding. On JAX the
    batched pushforward and pullback of `jax.image.resize` are slow: a small U-Net at batch 1
    (`benchmarks/anchors.py`, `unet_b1`), forward mode, 338 ms with this rule and 424 ms
    without; the layer alone (`benchmarks/layer_survey.py`) 1.1-1.3x."""
    ops = keras.ops
    x = _channels_last(layer, inputs)
    if None in x.shape[1:3]:  # sizes known only when run: the layer as written
        return type(layer).call(layer, inputs)
    rows, cols = (
        ops.convert_to_tensor(_bilinear_matrix(n, f), x.dtype)
        for n, f in zip(x.shape[1:3], layer.size)
    )
    y = ops.einsum("jw,biwc->bijc", cols, ops.einsum("ih,bhwc->biwc", rows, x))
    return _as_given(layer, y)


def _unfused_attention(layer) -> bool:
    """Attention that the user did not ask to run fused (`flash_attention=True` cannot return the
    scores, which the layer's explicit path computes)."""
    method = getattr(type(layer), "_compute_attention", None)
    return (
        not getattr(layer, "_flash_attention", False)
        and method is not None
        and "return_attention_scores" in inspect.signature(method).parameters
    )


def _explicit_attention(
    layer, query, key, value, attention_mask=None, training=None,
    return_attention_scores=False, **kwargs,
):  # fmt: skip
    """`MultiHeadAttention._compute_attention` through the layer's own explicit path (two
    `einsum`s and its masked softmax, the path it takes when asked for the scores), not the fused
    `ops.dot_product_attention`. The values agree up to float32 rounding. On JAX the batched
    pullback of the fused kernel is slower: keras_hub's ViT at batch 2 (`vit_b2`), 16.4 ms with
    this rule, 18.8 ms without; on PyTorch the rule lost (37.8 against 32.0 ms)."""
    output, scores = type(layer)._compute_attention(
        layer, query, key, value, attention_mask, training, True, **kwargs
    )
    return output, (scores if return_attention_scores else None)


UNROLL_STEPS = 64  # the longest sequence a recurrent layer is unrolled for (one copy per step)


def _rolled(layer) -> bool:
    return not layer.unroll


def _unrolled(layer, sequences, initial_state, mask, training=False):
    """A recurrent layer's `inner_loop` as Keras runs it with `unroll=True` (the cell called once
    per step, in a Python loop), for sequences of at most `UNROLL_STEPS` steps. The same values.
    On TensorFlow the batched pullback of the `while_loop` is slow (`GRU(32)`, 16 steps, batch 8,
    16 cotangents: 6.5-7.9 ms, against 4.5-5.1 ms unrolled; a bidirectional GRU classifier at
    batch 16, jacket's default: 11.5 ms, 8.6 ms unrolled)."""
    steps = sequences.shape[1]
    if steps is None or steps > UNROLL_STEPS:
        return type(layer).inner_loop(layer, sequences, initial_state, mask, training=training)
    from keras.src import backend  # Keras's own recurrence, which `RNN.inner_loop` runs

    tree = keras.tree
    if tree.is_nested(mask):
        mask = mask[0]
    cell = layer.cell
    kwargs = {"training": training} if getattr(cell, "_call_has_training_arg", False) else {}

    def step(inputs, states):
        output, new_states = cell(inputs, states, **kwargs)
        return output, (new_states if tree.is_nested(new_states) else [new_states])

    return backend.rnn(
        step,
        sequences,
        initial_state if tree.is_nested(initial_state) else [initial_state],
        go_backwards=layer.go_backwards,
        mask=mask,
        unroll=True,
        input_length=steps,
        zero_output_for_mask=layer.zero_output_for_mask,
        return_all_outputs=layer.return_sequences,
    )


def _taps(layer) -> int:
    return math.prod(layer.kernel_size)


CONV_PATCHES = Rule(
    "conv_patches", _few_channels, _conv_patches, method="convolution_op", opens=False
)
GROUPED_SLICES = Rule(
    "depthwise_slices", _grouped_depthwise, _grouped_slices, method="convolution_op", size=_taps
)
DEPTHWISE_SLICES = Rule("depthwise_slices", _plain_depthwise, _depthwise_slices, size=_taps)
BILINEAR_MATRICES = Rule("bilinear_matrices", _bilinear, _bilinear_matrices)
EXPLICIT_ATTENTION = Rule(
    "explicit_attention", _unfused_attention, _explicit_attention, method="_compute_attention"
)
UNROLLED = Rule("unrolled", _rolled, _unrolled, method="inner_loop", keeps_kind=True)

RULES: dict[type, tuple[Rule, ...]] = {
    keras.layers.MaxPooling1D: (MAX_POOLING,),
    keras.layers.MaxPooling2D: (MAX_POOLING,),
    keras.layers.MaxPooling3D: (MAX_POOLING,),
    keras.layers.Conv1D: (CONV_PATCHES, GROUPED_SLICES),
    keras.layers.Conv2D: (CONV_PATCHES, GROUPED_SLICES),
    keras.layers.Conv3D: (CONV_PATCHES,),
    keras.layers.DepthwiseConv1D: (DEPTHWISE_SLICES,),
    keras.layers.DepthwiseConv2D: (DEPTHWISE_SLICES,),
    keras.layers.UpSampling2D: (BILINEAR_MATRICES,),
    keras.layers.MultiHeadAttention: (EXPLICIT_ATTENTION,),
    keras.layers.GRU: (UNROLLED,),
    keras.layers.LSTM: (UNROLLED,),
    keras.layers.SimpleRNN: (UNROLLED,),
}  # by exact class: the first rule the backend names that covers the layer's configuration

# ------------------------------------------------------------------------------ which layers


def enabled() -> bool:
    return os.environ.get("JACKET_LAYER_RULES", "on").strip().lower() not in ("off", "0", "false")


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# NOTE: [A rule's program] A rule writes a layer as several operations (a depthwise convolution
# as one shifted slice and product per tap), and the compiler's time grows with them: ConvNeXtTiny
# (18 grouped 7x7 convolutions, 882 taps) compiled in 11-15 s on JAX with its rules, 4-6 s
# without, `jit(vmap(jacrev))` in 7 s; MobileNetV3Small (227 taps) and EfficientNetB0 (289): 7.7
# and 9.5 s with them, 5.8 and 7.7 s without (first calls, batch 2), where the plan without
# rules then runs 1.4-1.7x slower. Above `LARGE_PROGRAM` the first call runs the plan without
# rules, and later calls try the plans with them (`jacket.engine.plan`). So does a model whose
# every rule says it does not open (`Rule.opens`): the convolution as patches (the denoiser, three
# 3x3 convolutions at batch 1 on JAX: first call 1.05-1.18 s with the rule, 0.81-0.88 s without,
# `jit(vmap(jacfwd))` 0.55-0.75 s; in steady state the rule wins by 13-25%). A max pooling rule
# opens: it shortens the first call too (seed CNN, batch 32: 0.52 s against 0.73 s).
LARGE_PROGRAM = 500


def program_size(pairs) -> int:
    """The operations the rules of `pairs` (`layers_with_rules`) write in all."""
    return sum(rule.size(layer) if rule.size is not None else 1 for layer, rule in pairs)


def plain_first(pairs) -> bool:
    """Whether a first call runs without the rules of `pairs` (NOTE: [A rule's program])."""
    return bool(pairs) and (
        program_size(pairs) > LARGE_PROGRAM or not any(rule.opens for _, rule in pairs)
    )


def layers_with_rules(model, backend) -> list[tuple[keras.Layer, Rule]]:
    """The layers of `model` (nested ones included) that a rule of `backend` covers."""
    names = getattr(backend, "LAYER_RULES", ())
    if not names or not isinstance(model, keras.Layer) or not enabled():
        return []
    key = (backend.NAME, tuple(names))
    try:
        found = _FOUND.get(model, {})
    except TypeError:  # pragma: no cover - an object that cannot be weakly referenced
        found = {}
    if key not in found:
        pairs = []
        for layer in model._flatten_layers(include_self=True, recursive=True):
            rule = next(
                (
                    r
                    for r in RULES.get(type(layer), ())
                    if r.name in names and getattr(layer, "built", True) and r.applies(layer)
                ),
                None,
            )
            if rule is not None:
                pairs.append((layer, rule))
        found[key] = pairs
        with contextlib.suppress(TypeError):
            _FOUND[model] = found
    return found[key]


# ------------------------------------------------------------------------- running with rules

_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(layer) -> [layer, how many of jacket's calls use it]
_THREAD = threading.local()  # .active: ids of the layers whose rule runs in this thread


def _active() -> dict:
    active = getattr(_THREAD, "active", None)
    if active is None:
        active = _THREAD.active = {}
    return active


def _dispatch(layer, rule: Rule):
    plain = getattr(type(layer), rule.method)

    def call(*args, **kwargs):
        if id(layer) in _active():
            return rule.call(layer, *args, **kwargs)
        return plain(layer, *args, **kwargs)

    call.__wrapped__ = plain.__get__(layer)  # what `inspect.signature` reads
    return call


@contextlib.contextmanager
def applied(pairs: list[tuple[keras.Layer, Rule]]):
    """Run the rules of `pairs` in this thread for the duration (NOTE: [Layer rules])."""
    if not pairs:
        yield
        return
    with _LOCK:
        for layer, rule in pairs:
            entry = _INSTALLED.get(id(layer))
            if entry is None:
                layer.__dict__[rule.method] = _dispatch(layer, rule)
                _INSTALLED[id(layer)] = [layer, 1]
            else:
                entry[1] += 1
    active = _active()
    for layer, _ in pairs:
        active[id(layer)] = active.get(id(layer), 0) + 1
    try:
        yield
    finally:
        for layer, _ in pairs:
            active[id(layer)] -= 1
            if not active[id(layer)]:
                del active[id(layer)]
        with _LOCK:
            for layer, rule in pairs:
                entry = _INSTALLED[id(layer)]
                entry[1] -= 1
                if not entry[1]:
                    del _INSTALLED[id(layer)]
                    layer.__dict__.pop(rule.method, None)
