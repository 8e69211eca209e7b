"""Sparse Jacobians: detection, coloring, compressed passes, decompression, caching, errors.

Every detected pattern is checked against the nonzeros of Jacobians at random points, and every
sparse result against a dense Jacobian: the framework's own (`oracles.native_jacobian`) for one
model per group of rules (test_every_rule_pattern_and_values, in the default run), jacket's dense
`jacket.jacobian` elsewhere (itself checked against central differences and the frameworks' own
Jacobians in test_jacobian.py).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import keras
import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
from keras import layers
from oracles import native_jacobian, to_numpy

import jacket
from jacket import sparse
from jacket.sparse import SparsityError, SparsityWarning

BACKEND = keras.backend.backend()


# ---------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def warns_sparsity(match):
    """`pytest.warns(SparsityWarning)`; the frameworks' own deprecation warnings, ignored by the
    suite's filters elsewhere, stay ignored inside it."""
    with pytest.warns(SparsityWarning, match=match) as record:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield record


def dense_flat(model, x, **options) -> np.ndarray:
    """The dense per-sample Jacobian `(batch, out_size, in_size)` as float64 NumPy."""
    J = jacket.jacobian(model, x, flatten=True, **options)
    return to_numpy(J)


def check_sparse_matches_dense(model, in_shape, rng, *, exact: bool, fallback=False, **options):
    """The detected pattern covers (or, `exact`, equals) the nonzeros of the dense Jacobian at
    three random points, and the sparse Jacobian there equals the dense one."""
    pattern = jacket.sparsity(model, in_shape)
    x = rng.standard_normal((3,) + in_shape).astype("float32")
    J = dense_flat(model, x, **{k: v for k, v in options.items() if k == "mode"})
    truth = (np.abs(J) > 0).any(axis=0)
    assert pattern.dtype == bool and pattern.shape == truth.shape
    P = pattern.toarray()
    assert not (truth & ~P).any(), f"pattern misses {(truth & ~P).sum()} nonzeros"
    if exact:
        assert (truth == P).all(), f"pattern has {(P & ~truth).sum()} entries that are zero"
    if fallback:
        with warns_sparsity("computed densely"):
            S = jacket.jacobian(model, x, sparse=True, **options)
    else:
        S = jacket.jacobian(model, x, sparse=True, **options)
    assert isinstance(S, jacket.SparseJacobian)
    assert (S.fallback is not None) == fallback, S.fallback
    np.testing.assert_allclose(S.to_dense(flatten=True), J, rtol=0, atol=1e-5 * np.abs(J).max())
    return S


def true_nonzeros(model, in_shape, rng, points=3) -> np.ndarray:
    """Entries nonzero in the dense Jacobian at some of `points` random inputs."""
    x = rng.standard_normal((points,) + in_shape).astype("float32")
    return (np.abs(dense_flat(model, x)) > 0).any(axis=0)


def sequential(in_shape, *stack):
    return keras.Sequential([keras.Input(in_shape), *stack])


def unet(size=20, channels=3):
    """A small U-Net: two levels, max pooling, nearest up-sampling, a skip by concatenation."""
    inputs = keras.Input((size, size, 1))
    c1 = layers.Conv2D(channels, 3, padding="same", activation="relu")(inputs)
    down = layers.MaxPooling2D(2)(c1)
    c2 = layers.Conv2D(2 * channels, 3, padding="same", activation="relu")(down)
    up = layers.UpSampling2D(2)(c2)
    merged = layers.Concatenate()([up, c1])
    c3 = layers.Conv2D(channels, 3, padding="same", activation="relu")(merged)
    outputs = layers.Conv2D(1, 1)(c3)
    return keras.Model(inputs, outputs)


# ------------------------------------------------------------- exact patterns: convolution stacks

EXACT = {
    "conv2d_same": lambda: sequential(
        (7, 6, 2),
        layers.Conv2D(3, 3, padding="same", activation="tanh"),
        layers.Conv2D(2, 3, padding="same"),
    ),
    "conv2d_valid_strided": lambda: sequential(
        (9, 8, 1),
        layers.Conv2D(3, (3, 2), strides=2, padding="valid", activation="tanh"),
        layers.Conv2D(2, 2, strides=(1, 2), padding="same"),
    ),
    "conv2d_dilated": lambda: sequential(
        (9, 9, 1),
        layers.Conv2D(2, 3, dilation_rate=2, padding="same", activation="sigmoid"),
        layers.Conv2D(1, 3, dilation_rate=(1, 2), padding="valid"),
    ),
    "conv1d_causal_strided": lambda: sequential(
        (11, 2),
        layers.Conv1D(3, 3, padding="causal", activation="tanh"),
        layers.Conv1D(2, 3, strides=2, padding="same"),
    ),
    "conv3d": lambda: sequential((4, 5, 3, 1), layers.Conv3D(2, 3, padding="same")),
    "grouped_conv": lambda: sequential((5, 5, 4), layers.Conv2D(4, 3, groups=2, padding="same")),
    "depthwise": lambda: sequential(
        (6, 5, 2), layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")
    ),
    "depthwise_1d_then_separable": lambda: sequential(
        (9, 2),
        layers.DepthwiseConv1D(3, strides=2, padding="valid"),
        layers.SeparableConv1D(3, 2, padding="same"),
    ),
    "separable2d": lambda: sequential((6, 6, 2), layers.SeparableConv2D(3, 3, padding="same")),
    "conv_transpose_same": lambda: sequential(
        (4, 5, 2), layers.Conv2DTranspose(2, 3, strides=2, padding="same")
    ),
    "conv_transpose_valid": lambda: sequential(
        (4, 3, 1), layers.Conv2DTranspose(2, 3, strides=2, padding="valid")
    ),
    "conv1d_transpose": lambda: sequential(
        (5, 2), layers.Conv1DTranspose(2, 4, strides=3, padding="same")
    ),
    "average_pooling": lambda: sequential(
        (13, 12, 2),
        layers.AveragePooling2D(3, strides=2, padding="same"),
        layers.Conv2D(1, 2, padding="same"),
    ),
    "global_pooling": lambda: sequential(
        (5, 4, 3), layers.DepthwiseConv2D(3, padding="same"), layers.GlobalAveragePooling2D()
    ),
    "upsampling_nearest": lambda: sequential(
        (4, 3, 1), layers.UpSampling2D((2, 3)), layers.Conv2D(1, 3, padding="same")
    ),
    "upsampling_bilinear": lambda: sequential(
        (4, 3, 2), layers.UpSampling2D(2, interpolation="bilinear")
    ),
    "upsampling_3d": lambda: sequential(
        (3, 2, 2, 1), layers.UpSampling3D((2, 1, 2)), layers.Conv3D(1, 2, padding="same")
    ),
    "padding_cropping": lambda: sequential(
        (9, 8, 1),
        layers.ZeroPadding2D(((1, 2), (0, 1))),
        layers.Conv2D(2, 3, padding="valid", activation="tanh"),
        layers.Cropping2D(((1, 0), (0, 1))),
        layers.ZeroPadding2D(1),
        layers.Conv2D(1, 3, padding="valid"),
    ),
    "padding_cropping_1d": lambda: sequential(
        (6, 2),
        layers.ZeroPadding1D((2, 1)),
        layers.Conv1D(2, 3),
        layers.Cropping1D((1, 2)),
        layers.UpSampling1D(3),
        layers.Conv1D(1, 2),
    ),
    "channels_first_reshaping": lambda: sequential(
        (2, 4, 3),
        layers.ZeroPadding2D(((1, 0), (0, 2)), data_format="channels_first"),
        layers.UpSampling2D(2, data_format="channels_first"),
        layers.Cropping2D(((2, 1), (0, 3)), data_format="channels_first"),
        layers.Flatten(data_format="channels_first"),
    ),
    "normalisations": lambda: sequential(
        (5, 4, 4),
        layers.Conv2D(4, 3, padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(3, 2, padding="same"),
        layers.LayerNormalization(),
        layers.Softmax(),
    ),
    "group_norm": lambda: sequential((3, 3, 6), layers.GroupNormalization(3)),
    "layer_norm_over_columns_and_channels": lambda: sequential(
        (4, 3, 2), layers.Conv2D(2, 2, padding="same"), layers.LayerNormalization(axis=(2, 3))
    ),
    "pixelwise_dense_and_reshapes": lambda: sequential(
        (4, 5, 3),
        layers.Dense(2, activation="softmax"),
        layers.Permute((2, 1, 3)),
        layers.Reshape((10, 2, 2)),
        layers.Conv2D(1, 3, padding="same"),
    ),
}


# ------------------------------------------------------- every rule in the default run, together

# Branches of one Functional model, each reading the input and flattened at its end, concatenated:
# one model (one detection, one set of compiled kernels) exercises many rules, and the pattern stays
# block-structured, so `exact` still tells a rule that is too wide from a right one. Every rule in
# `jacket.sparse._detect` (each layer class of `_SINGLE`, the merges, Concatenate, channels-first
# layouts) appears in one of these models; the per-layer cases in EXACT run with `-m slow`.


def branches(in_shape, *stacks):
    """`Concatenate([Flatten(stack(x)) for stack in stacks])`; a `(merge, [a_layers], [b_layers])`
    item in a stack merges two sub-branches of the tensor so far."""
    inputs = keras.Input(in_shape)
    outs = []
    for stack in stacks:
        h = inputs
        for item in stack:
            if isinstance(item, tuple):
                merge, *subs = item
                parts = []
                for sub in subs:
                    t = h
                    for layer in sub:
                        t = layer(t)
                    parts.append(t)
                h = merge(parts)
            else:
                h = item(h)
        outs.append(layers.Flatten()(h))
    return keras.Model(inputs, layers.Concatenate()(outs))


def rules_1d():
    return branches(
        (9, 2),
        [layers.Conv1D(2, 3, padding="causal", activation="tanh"), layers.Conv1D(1, 2, strides=2)],
        [layers.DepthwiseConv1D(3, strides=2), layers.SeparableConv1D(2, 2, padding="same")],
        [layers.Conv1DTranspose(2, 3, strides=2, padding="same")],
        [
            layers.AveragePooling1D(2),
            layers.UpSampling1D(2),
            layers.ZeroPadding1D((1, 2)),
            layers.Cropping1D((2, 1)),
        ],
        [layers.Permute((2, 1)), layers.Reshape((3, 6)), layers.Dense(2, activation="softmax")],
        [layers.GlobalAveragePooling1D(), layers.RepeatVector(3)],
        [layers.ZeroPadding1D((1, 0), data_format="channels_first"), layers.SpatialDropout1D(0.3)],
    )


def rules_2d():
    conv = lambda: layers.Conv2D(2, 1, activation="tanh")  # noqa: E731
    return branches(
        (4, 3, 4),
        [layers.Conv2D(4, 3, groups=2, padding="same", activation="tanh")],
        [
            layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
            layers.SeparableConv2D(2, 3, strides=2, padding="same"),
        ],
        [layers.Conv2DTranspose(2, 3, strides=2, padding="valid")],
        [layers.AveragePooling2D(2, padding="same"), layers.UpSampling2D((2, 1))],
        # not in a compressed model: TensorFlow has no forward mode through bilinear resizing
        # (NOTE: [Checked forward mode]), and reverse mode gains nothing on these small inputs
        [layers.UpSampling2D(2, interpolation="bilinear")],
        [layers.GlobalAveragePooling2D()],
        [  # channels first: the input read as 4 channels of 3x4
            layers.ZeroPadding2D(((1, 0), (0, 2)), data_format="channels_first"),
            layers.UpSampling2D(2, data_format="channels_first"),
            layers.Cropping2D(((2, 1), (0, 3)), data_format="channels_first"),
        ],
        [layers.BatchNormalization(), layers.LayerNormalization(axis=(2, 3))],
        [layers.GroupNormalization(2)],
        [layers.UnitNormalization()],
        [
            conv(),
            layers.Activation("sigmoid"),
            layers.ELU(),
            layers.LeakyReLU(0.2),
            layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25)),
            layers.Rescaling(2.0, offset=0.1),
            layers.Identity(),
            layers.ActivityRegularization(),
            layers.Dropout(0.5),
            layers.GaussianNoise(0.1),
            layers.GaussianDropout(0.1),
            layers.AlphaDropout(0.1),
            layers.SpatialDropout2D(0.2),
            layers.Softmax(),
        ],
        [
            (layers.Add(), [conv()], [conv()]),
            (layers.Subtract(), [conv()], [conv()]),
            (layers.Multiply(), [conv()], [conv()]),
            (layers.Average(), [conv()], [conv()]),
        ],
    )


def rules_3d():
    return branches(
        (4, 3, 3, 1),
        [layers.Conv3D(2, (2, 3, 2), strides=(2, 1, 1), activation="tanh")],
        [layers.Conv3DTranspose(1, 2, strides=2, padding="same")],
        [
            layers.UpSampling3D((2, 1, 2)),
            layers.ZeroPadding3D(((1, 0), (0, 1), (1, 1))),
            layers.Cropping3D(((0, 1), (1, 0), (1, 1))),
        ],
        [layers.AveragePooling3D(2, padding="same")],
        [layers.SpatialDropout3D(0.3), layers.GlobalAveragePooling3D()],
        [layers.UpSampling3D(2, data_format="channels_first")],  # 4 channels of 3x3x1
    )


def rules_covered():
    """Rules whose pattern is a superset at a point (which input a max picks, ReLU's zeros)."""
    conv = lambda: layers.Conv2D(2, 3, padding="same", activation="tanh")  # noqa: E731
    return branches(
        (4, 3, 2),
        [conv(), layers.ReLU(), layers.MaxPooling2D(2, padding="same")],
        [layers.GlobalMaxPooling2D()],
        [(layers.Maximum(), [conv()], [conv()])],
        [(layers.Minimum(), [conv()], [conv()])],
        [layers.Reshape((12, 2)), layers.MaxPooling1D(3), layers.GlobalMaxPooling1D()],
        [layers.Reshape((4, 3, 2, 1)), layers.MaxPooling3D(2, padding="same")],
        [layers.Reshape((4, 3, 2, 1)), layers.GlobalMaxPooling3D()],
        [layers.Reshape((12, 2)), layers.AveragePooling1D(3), layers.GlobalAveragePooling1D()],
    )


def image_to_image():
    """Transposed and separable convolutions and normalisations on an image: a pattern sparse
    enough for compressed passes."""
    return sequential(
        (8, 8, 1),
        layers.Conv2DTranspose(3, 3, strides=2, padding="same", activation="tanh"),
        layers.SeparableConv2D(3, 3, strides=2, padding="same"),
        layers.BatchNormalization(),
        layers.LayerNormalization(),
        layers.UnitNormalization(),
        layers.Conv2D(1, 1),
    )


RULE_MODELS = {
    # name: (build, exact pattern, compressed, rtol): "2d" and "covered" read small inputs through
    # branches that see a whole channel (global pooling, normalisations): no coloring gains
    # there (the dense fallback), so only their patterns are checked; the others' values come
    # from compressed passes and are checked too.
    # rtol: about 5x the largest relative error against the framework's own Jacobian measured here
    # (float32 both; TensorFlow / JAX / PyTorch): 1d 0 / 6e-8 / 6e-8, 3d 0 / 0 / 0, image 1.3e-7 /
    # 2e-6 / 0 (its normalisations amplify float32 rounding).
    "1d": (rules_1d, True, True, 1e-6),
    "2d": (rules_2d, True, False, None),
    "3d": (rules_3d, True, True, 1e-6),
    "covered": (rules_covered, False, False, None),
    "image": (image_to_image, True, True, 1e-5),
}


@functools.cache
def rule_model(name):
    """Each model built once for the two tests below (on JAX a build takes seconds)."""
    return RULE_MODELS[name][0]()


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_every_rule_pattern_and_values(name, rng):
    """The pattern against the nonzeros of the framework's own Jacobian (batch_jacobian, jacrev,
    autograd) at three random points: equal (`exact`) or covering them; the sparse values from
    compressed passes against the same Jacobian."""
    _, exact, compressed, rtol = RULE_MODELS[name]
    model = rule_model(name)
    in_shape = tuple(model.inputs[0].shape[1:])
    pattern = jacket.sparsity(model, in_shape)
    x = rng.standard_normal((3,) + in_shape).astype("float32")
    native = native_jacobian(model, x).reshape((3,) + pattern.shape)
    truth = (np.abs(native) > 0).any(axis=0)
    P = pattern.toarray()
    assert not (truth & ~P).any(), f"pattern misses {(truth & ~P).sum()} nonzeros"
    if exact:
        assert (truth == P).all(), f"pattern has {(P & ~truth).sum()} entries that are zero"
    if not compressed:  # the values would come from the dense engine (test_jacobian.py)
        return
    S = jacket.jacobian(model, x, sparse=True)
    assert S.fallback is None and S.n_colors < min(P.shape), (S.fallback, S.n_colors)
    error = np.abs(S.to_dense(flatten=True) - native).max() / np.abs(native).max()
    assert error < rtol, error


def test_every_rule_has_a_default_case():
    """Each layer class with a rule (and each merge) is in one of the default-run models above."""
    from jacket.sparse import _detect

    seen = {
        type(layer).__name__
        for name in RULE_MODELS
        for layer in rule_model(name)._flatten_layers(include_self=False, recursive=True)
    }
    ruled = set(_detect._SINGLE) | set(_detect._MERGE) | {"Concatenate"}
    assert ruled <= seen, sorted(ruled - seen)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_pattern_and_values(name, rng):
    """One layer (or two) per model: a failure names the rule."""
    model = EXACT[name]()
    in_shape = tuple(model.inputs[0].shape[1:])
    check_sparse_matches_dense(model, in_shape, rng, exact=True)


def test_conv_stack_pattern_is_the_receptive_field(rng):
    """3 x 3x3 "same" convolutions: each output pixel sees the 7x7 window around it."""
    model = sequential(
        (12, 12, 1),
        layers.Conv2D(4, 3, padding="same", activation="relu"),
        layers.Conv2D(4, 3, padding="same", activation="relu"),
        layers.Conv2D(1, 3, padding="same"),
    )
    P = jacket.sparsity(model, (12, 12, 1)).toarray().reshape(12, 12, 12, 12)
    i, j, k, m = np.indices(P.shape)
    np.testing.assert_array_equal(P, (abs(i - k) <= 3) & (abs(j - m) <= 3))
    S = check_sparse_matches_dense(model, (12, 12, 1), rng, exact=False)
    assert S.n_colors == 49  # the lower bound: 49 nonzeros in an inner row


# --------------------------------------------------------------------- superset patterns, merges


def test_max_pooling_is_covered(rng):
    model = sequential(
        (12, 11, 2),
        layers.Conv2D(3, 3, padding="same"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Conv2D(1, 3, padding="same"),
    )
    check_sparse_matches_dense(model, (12, 11, 2), rng, exact=False)


def test_unet_with_skip_and_upsampling(rng):
    model = unet()
    S = check_sparse_matches_dense(model, (20, 20, 1), rng, exact=False)
    assert S.density < 0.3
    assert S.nbytes < S.dense_nbytes / 2


def test_branches_merged_by_add_and_concatenate(rng):
    inputs = keras.Input((8, 8, 2))
    a = layers.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
    b = layers.DepthwiseConv2D(1, depth_multiplier=1)(layers.Conv2D(3, 1)(inputs))
    added = layers.Add()([a, b])
    mixed = layers.Concatenate()([added, layers.Multiply()([a, b]), inputs])
    down = layers.Conv2D(2, 3, strides=2, padding="same")(mixed)
    rows = layers.Concatenate(axis=1)([down, layers.AveragePooling2D(2)(layers.Conv2D(2, 1)(a))])
    model = keras.Model(inputs, rows)
    check_sparse_matches_dense(model, (8, 8, 2), rng, exact=False)


def test_residual_written_with_keras_ops(rng):
    """`x + f(x)`, `keras.ops.relu`, a scalar factor and a broadcast product: graph nodes that are
    `keras.ops` calls, not layers, still get exact rules (no warning)."""
    inputs = keras.Input((7, 6, 2))
    h = layers.Conv2D(2, 3, padding="same", activation="tanh")(inputs)
    gate = layers.Conv2D(1, 1)(inputs)  # (7, 6, 1), broadcast over the 2 channels
    out = keras.ops.relu(2.0 * h + inputs) * keras.ops.sigmoid(gate)
    model = keras.Model(inputs, layers.Conv2D(1, 3, padding="same")(out))
    check_sparse_matches_dense(model, (7, 6, 2), rng, exact=False)


def test_several_inputs_and_outputs(rng):
    image = keras.Input((5, 5, 1), name="image")
    mask = keras.Input((5, 5, 1), name="mask")
    joined = layers.Concatenate()([image, mask])
    out = layers.Conv2D(1, 3, padding="same", name="out")(joined)
    side = layers.Conv2D(1, 1, name="side")(mask)
    model = keras.Model({"image": image, "mask": mask}, [out, side])
    x = {
        "image": rng.standard_normal((2, 5, 5, 1)).astype("float32"),
        "mask": rng.standard_normal((2, 5, 5, 1)).astype("float32"),
    }
    S = jacket.jacobian(model, x, sparse=True)
    J = jacket.jacobian(model, x, flatten=True)
    dense = np.concatenate(
        [np.concatenate([to_numpy(J[o][k]) for k in ("image", "mask")], axis=2) for o in (0, 1)],
        axis=1,
    )
    assert S.shape == (2, 50, 50)
    np.testing.assert_allclose(S.to_dense(), dense, atol=1e-6)
    truth = (np.abs(dense) > 0).any(axis=0)
    P = jacket.sparsity(model, {"image": (5, 5, 1), "mask": (5, 5, 1)}).toarray()
    assert (P == truth).all()  # "side" reads the mask only


# ----------------------------------------------------------------- fallbacks: dense, unknown layers


def test_dense_model_falls_back_and_says_so(rng):
    model = sequential((6,), layers.Dense(5, activation="relu"), layers.Dense(3))
    P = jacket.sparsity(model, (6,))
    assert P.nnz == 18  # every output depends on every input
    x = rng.standard_normal((3, 6)).astype("float32")
    with warns_sparsity("computed densely"):
        S = jacket.jacobian(model, x, sparse=True)
    assert S.fallback and S.mode == "dense"
    np.testing.assert_allclose(S.to_dense(), dense_flat(model, x), rtol=1e-6)
    assert "dense fallback" in repr(S)


class Shift(keras.layers.Layer):
    """A layer jacket has no rule for: rolls the image one pixel down."""

    def call(self, x):
        return keras.ops.roll(x, 1, axis=1)


class FlippedConv(keras.layers.Conv2D):
    """A subclass of a known layer that changes what it computes."""

    def call(self, x):
        return keras.ops.flip(super().call(x), axis=2)


@pytest.mark.parametrize("custom", [Shift, lambda: FlippedConv(2, 3, padding="same")])
def test_unknown_layer_never_misses_a_nonzero(custom, rng):
    model = sequential(
        (6, 5, 1),
        layers.Conv2D(2, 3, padding="same", activation="tanh"),
        custom(),
        layers.Conv2D(1, 3, padding="same"),
    )
    with warns_sparsity("conservative"):
        P = jacket.sparsity(model, (6, 5, 1)).toarray()
    truth = true_nonzeros(model, (6, 5, 1), rng)
    assert truth.any() and not (truth & ~P).any()


def test_subclassed_model_gets_the_dense_pattern(rng):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(1, 3, padding="same")

        def call(self, x):
            return self.conv(x)

    model = Net()
    with warns_sparsity("no layer graph"):
        P = jacket.sparsity(model, (4, 4, 1))
    assert P.nnz == 16 * 16


def test_a_single_layer_is_a_model(rng):
    layer = layers.Conv2D(2, 3, padding="same")
    S = check_sparse_matches_dense(layer, (5, 6, 1), rng, exact=True)
    assert S.n_colors == 9


# ------------------------------------------------------------------------------------------ verify


def test_verify_accepts_a_right_pattern(monkeypatch):
    model = EXACT["conv2d_valid_strided"]()
    jacket.sparsity(model, (9, 8, 1), verify=True)  # against the dense Jacobian
    from jacket.sparse import _sparsity

    monkeypatch.setattr(_sparsity, "VERIFY_DENSE_ENTRIES", 0)
    fresh = EXACT["conv2d_valid_strided"]()
    jacket.sparsity(fresh, (9, 8, 1), verify=True)  # by random products


@pytest.mark.parametrize("dense_check", [True, False])
def test_verify_catches_a_wrong_rule(dense_check, monkeypatch):
    from jacket.sparse import _deps, _detect, _sparsity

    if not dense_check:
        monkeypatch.setattr(_sparsity, "VERIFY_DENSE_ENTRIES", 0)
    # pretend a convolution reads only its own pixel: the pattern then misses the neighbours
    monkeypatch.setitem(
        _detect._SINGLE,
        "Conv2D",
        lambda layer, dep, out_shape, ctx: _deps._separable(
            dep, None, np.ones((out_shape[-1], dep.channels), bool), out_shape
        ),
    )
    model = sequential((5, 5, 1), layers.Conv2D(2, 3, padding="same"))
    with pytest.raises(SparsityError, match="misses"):
        jacket.sparsity(model, (5, 5, 1), verify=True)


@pytest.fixture(scope="module")
def conv_model():
    """One model shared by the tests of the API around the passes (its kernels compile once)."""
    keras.utils.set_random_seed(7)
    return EXACT["conv2d_same"]()


# ---------------------------------------------------------------------------------------- coloring


def random_pattern(rng, m, n, density):
    return sp.csr_array(rng.random((m, n)) < density)


@pytest.mark.parametrize("side", ["columns", "rows"])
def test_coloring_is_valid_and_matches_networkx(side, rng):
    P = random_pattern(rng, 40, 30, 0.1)
    M = P.toarray() if side == "columns" else P.toarray().T
    graph = nx.Graph()  # the intersection graph: columns sharing a row
    graph.add_nodes_from(range(M.shape[1]))
    for row in M:
        idx = np.flatnonzero(row)
        graph.add_edges_from((a, b) for a in idx for b in idx if a < b)
    reference = nx.greedy_color(graph, strategy="largest_first")
    reference = np.array([reference[v] for v in range(M.shape[1])])
    # the same greedy as networkx's largest_first, vertex for vertex
    np.testing.assert_array_equal(sparse.color(P, side, strategy="largest_first"), reference)
    colors = sparse.color(P, side)  # "auto": natural order, largest-first where that is better
    assert sparse.is_valid(P, colors, side)
    lower = int(M.sum(axis=1).max())  # a row's nonzeros need distinct colors
    assert lower <= colors.max() + 1 <= reference.max() + 1
    for strategy in ("natural", "smallest_last"):  # ours, and one that networkx runs
        assert sparse.is_valid(P, sparse.color(P, side, strategy=strategy), side)
    # a coloring that is not valid is caught
    assert not sparse.is_valid(P, np.zeros_like(colors), side)


def test_forward_and_reverse_compression_agree(conv_model, rng):
    model = conv_model
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    forward = jacket.jacobian(model, x, sparse=True, mode="forward")
    reverse = jacket.jacobian(model, x, sparse=True, mode="reverse")
    assert (forward.mode, reverse.mode) == ("forward", "reverse")
    np.testing.assert_allclose(forward.values, reverse.values, atol=1e-6)


def test_chunks_and_plan(conv_model, rng):
    model = conv_model
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    fn = jacket.jacobian_fn(model, sparse=True, chunk_size=4)
    plan = fn.plan(x)
    assert plan.chunk == 4 and plan.n_passes == -(-plan.n_colors // 4)
    assert "colors in" in plan.describe()
    whole = jacket.jacobian(model, x, sparse=True)
    np.testing.assert_allclose(fn(x).values, whole.values, atol=1e-6)
    tiny = jacket.jacobian_fn(model, sparse=True, memory_budget=1)  # one color per pass
    assert tiny.plan(x).chunk == 1
    np.testing.assert_allclose(tiny(x).values, whole.values, atol=1e-6)


# ----------------------------------------------------------------------- result type, user pattern


def test_result_type(conv_model, rng):
    model = conv_model
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    S = jacket.jacobian(model, x, sparse=True)
    J = dense_flat(model, x)
    assert S.shape == (3, 84, 84) and S.values.shape == (3, S.nnz) and S.batch == 3
    for b in range(3):
        M = S.to_scipy(b)
        assert isinstance(M, sp.csr_array) and M.shape == (84, 84)
        np.testing.assert_allclose(M.toarray(), J[b], atol=1e-6)
    assert S.to_dense().shape == (3, 7, 6, 2, 7, 6, 2)
    assert S.to_dense(flatten=True).shape == (3, 84, 84)
    assert jacket.jacobian(model, x, sparse=True, flatten=True).to_dense().shape == (3, 84, 84)
    assert S.nbytes < S.dense_nbytes and 0 < S.density < 1
    assert S.dtype == np.float32
    assert "SparseJacobian(batch=3" in repr(S)


def test_a_given_pattern_is_used(conv_model, rng):
    model = conv_model
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    P = jacket.sparsity(model, (7, 6, 2))
    S = jacket.jacobian(model, x, sparsity=P)
    np.testing.assert_allclose(S.to_dense(flatten=True), dense_flat(model, x), atol=1e-5)
    # a larger pattern (a NumPy array) gives the same Jacobian
    larger = P.toarray() | np.eye(*P.shape, k=5, dtype=bool)
    S2 = jacket.jacobian(model, x, sparsity=larger.astype("float32"), mode="reverse")
    assert S2.nnz > S.nnz
    np.testing.assert_allclose(S2.to_dense(), S.to_dense(), atol=1e-5)
    with warns_sparsity("computed densely"):  # all ones: nothing to gain
        S3 = jacket.jacobian(model, x, sparsity=np.ones(P.shape))
    np.testing.assert_allclose(S3.to_dense(), S.to_dense(), atol=1e-5)


# --------------------------------------------------------------------------------- caching, retrace


def test_pattern_and_coloring_are_made_once(rng):
    model = EXACT["conv2d_same"]()
    assert jacket.sparsity(model, (7, 6, 2)) is jacket.sparsity(model, (7, 6, 2))
    fn = jacket.jacobian_fn(model, sparse=True)
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    fn(x)
    prepared = fn.passes(jacket.engine.inputs.prepare_inputs("t", model, x))
    traces = jacket.jacobian_fn(model).trace_count
    fn(x + 1.0)
    jacket.jacobian(model, x * 2.0, sparse=True)  # the one-shot form shares the cache
    assert fn.passes(jacket.engine.inputs.prepare_inputs("t", model, x)) is prepared
    if BACKEND in ("tensorflow", "jax"):
        assert jacket.jacobian_fn(model).trace_count == traces  # nothing traced again


def test_training_mode_is_computed_densely(rng):
    """training=True reaches the dense fallback: through Dropout(0.5) each output row of the
    Jacobian is the inference row dropped (0) or kept and scaled (x2), by one mask."""
    model = sequential(
        (7, 6, 2), layers.Conv2D(2, 3, padding="same", activation="tanh"), layers.Dropout(0.5)
    )
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    with warns_sparsity("dropout masks"):
        S = jacket.jacobian(model, x, sparse=True, training=True)
    assert S.mode == "dense" and "training" in S.fallback
    trained = S.to_dense(flatten=True)
    inference = dense_flat(model, x)
    scale = np.abs(inference).max()
    kept = np.abs(trained - 2 * inference).max(axis=2) <= 1e-6 * scale
    dropped = np.abs(trained).max(axis=2) == 0
    assert (kept ^ dropped).all()  # every row one or the other
    assert 0.3 < kept.mean() < 0.7  # both, about half each
    # the same draws as the dense call in training mode (one mask per call, README)
    np.testing.assert_array_equal(trained, dense_flat(model, x, training=True))


class BatchCentre(keras.layers.Layer):
    """Subtracts the batch mean: samples interact."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


@pytest.mark.parametrize("small", [True, False])
def test_samples_that_interact_are_refused(small, monkeypatch, rng):
    from jacket.sparse import _compressed

    if not small:  # the probe on the batch as given, not on the repeated batch
        monkeypatch.setattr(_compressed, "SMALL_PROBE", 0)
    conv = sequential((6, 6, 1), layers.Conv2D(1, 3, padding="same"))
    model = sequential((6, 6, 1), conv, BatchCentre())
    P = jacket.sparsity(conv, (6, 6, 1))  # the per-sample pattern of `model` too
    x = rng.standard_normal((3, 6, 6, 1)).astype("float32")
    with pytest.raises(jacket.CouplingError, match=r"sparse=True\): .*depends on other samples"):
        jacket.jacobian(model, x, sparsity=P)


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument(conv_model, rng):
    model = conv_model
    x = rng.standard_normal((3, 7, 6, 2)).astype("float32")
    with pytest.raises(jacket.JacketValueError, match="per_sample=False"):
        jacket.jacobian(model, x, sparse=True, per_sample=False)
    with pytest.raises(jacket.JacketTypeError, match="`sparse` must be True or False"):
        jacket.jacobian(model, x, sparse="yes")
    with pytest.raises(jacket.JacketValueError, match=r"shape \(out_size, in_size\) = \(84, 84\)"):
        jacket.jacobian(model, x, sparsity=sp.csr_array((3, 3), dtype=bool))
    with pytest.raises(jacket.JacketTypeError, match="`sparsity` must be a scipy.sparse"):
        jacket.jacobian_fn(model, sparsity="all")
    with pytest.raises(jacket.JacketValueError, match="Leave out the batch axis"):
        jacket.sparsity(model, (1, 7, 6, 2))
    with pytest.raises(jacket.JacketValueError, match="`input_shape` must be the per-sample"):
        jacket.sparsity(model, "7x6")
    with pytest.raises(jacket.JacketValueError, match="`mode` must be one of"):
        jacket.jacobian(model, x, sparse=True, mode="sideways")
    with pytest.raises(jacket.JacketValueError, match="`side` must be"):
        sparse.color(sp.eye_array(3, dtype=bool), "diagonal")


def test_pattern_figure(conv_model):
    from jacket.plot import sparsity_figure

    model = conv_model
    P = jacket.sparsity(model, (7, 6, 2))
    figure = sparsity_figure(P, in_shape=(7, 6, 2), out_shape=(7, 6, 2))
    spy, field = figure.axes[:2]
    # the spy plot: one marker per nonzero, at (column, row)
    cols, rows = spy.lines[0].get_data()
    coo = P.tocoo()
    assert sorted(zip(rows, cols)) == sorted(zip(coo.row, coo.col))
    # the second panel: the inputs the centre output (3, 3, 1) depends on, channels averaged
    centre = np.ravel_multi_index((3, 3, 1), (7, 6, 2))
    row = P.toarray()[centre].reshape(7, 6, 2).astype(float).mean(axis=2)
    np.testing.assert_array_equal(field.images[0].get_array(), row)
    assert field.get_title() == "inputs of output (3, 3, 1)"
