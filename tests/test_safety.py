"""Interacting samples (`per_sample="diagonal"`, the cached coupling probe) and non-differentiable
paths (zeros with a `JacketWarning` naming where the gradient stops), on every backend."""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import keras
import numpy as np
import pytest
from keras import layers, ops
from oracles import assert_close, central_differences, native_jacobian, to_numpy
from scenarios import seed_mlp

import jacket
from jacket.engine import probes

# ------------------------------------------------------------------------------ interacting samples


class BatchMean(layers.Layer):
    """Subtracts the batch mean: every sample's output depends on every sample's input."""

    def call(self, x):
        return x - ops.mean(x, axis=0, keepdims=True)


class Square(layers.Layer):
    """A custom (so probed) layer that keeps samples apart."""

    def call(self, x):
        return x * x


def batchnorm_model():
    return keras.Sequential(
        [
            layers.Input((3,), dtype="float64"),
            layers.Dense(4, activation="tanh", dtype="float64"),
            layers.BatchNormalization(dtype="float64"),
            layers.Dense(2, dtype="float64"),
        ]
    )


def batch_mean_model():
    return keras.Sequential(
        [
            layers.Input((3,), dtype="float64"),
            layers.Dense(4, activation="tanh", dtype="float64"),
            BatchMean(dtype="float64"),
            layers.Dense(2, dtype="float64"),
        ]
    )


def _diagonal_oracle(call, x):
    """The per-sample blocks of the full Jacobian, by central differences of the whole batch."""
    full = central_differences(call, x, per_sample=False)  # (B, *out, B, *in)
    out_nd = full.ndim - 2 * x.ndim + 1
    moved = np.moveaxis(full, 1 + out_nd, 1)  # (B, B, *out, *in)
    return np.stack([moved[b, b] for b in range(x.shape[0])])


@pytest.mark.parametrize(
    "build, training",
    [(batchnorm_model, True), (batch_mean_model, False)],
    ids=["batchnorm_training", "batch_mean"],
)
@pytest.mark.parametrize("chunk_size, flatten", [(None, False), (3, True)])  # one pass; several
def test_diagonal_blocks_of_coupled_models_match_finite_differences(
    build, training, chunk_size, flatten, rng
):
    model = build()
    x = rng.normal(size=(5, 3))
    with pytest.raises(jacket.CouplingError, match="per_sample='diagonal'|per_sample=\"diagonal\""):
        jacket.jacobian(model, x, training=training)
    J = jacket.jacobian(
        model, x, training=training, per_sample="diagonal", chunk_size=chunk_size, flatten=flatten
    )
    expected = _diagonal_oracle(lambda v: model(v, training=training), x)  # (5, 2, 3)
    assert tuple(J.shape) == (5, 2, 3)
    assert_close(J, expected, rtol=1e-6)
    # and the blocks are those of the full Jacobian jacket gives (a second strategy)
    full = to_numpy(jacket.jacobian(model, x, training=training, per_sample=False))
    np.testing.assert_allclose(to_numpy(J), np.stack([full[b, :, b] for b in range(5)]), 0, 1e-12)


def test_diagonal_equals_per_sample_where_samples_do_not_interact(rng):
    model = seed_mlp("float64")
    x = rng.normal(size=(4, 5))
    diagonal = jacket.jacobian_fn(model, per_sample="diagonal")
    assert not diagonal.plan(x).per_sample  # computed through the full Jacobian
    assert_close(diagonal(x), to_numpy(jacket.jacobian(model, x)), rtol=1e-12)


def test_diagonal_option_errors():
    model = seed_mlp()
    with pytest.raises(
        jacket.JacketValueError,
        match="must be True, False or 'diagonal'. Received: per_sample='diag'",
    ):
        jacket.jacobian_fn(model, per_sample="diag")
    with pytest.raises(
        jacket.JacketValueError, match="Received: per_sample='diagonal' with sparse"
    ):
        jacket.jacobian_fn(model, per_sample="diagonal", sparse=True)
    with pytest.raises(jacket.JacketValueError, match="strategy='replicate' with per_sample='diag"):
        jacket.jacobian_fn(model, per_sample="diagonal", strategy="replicate")


def _count_probe_runs(monkeypatch) -> dict:
    """Patch the engine so that every forward pass and every VJP its probe runs is counted."""
    calls = {"forward": [], "vjp": []}
    probe = probes._probe

    def counted_probe(state, inputs, entry):
        def counting(kind):
            make = getattr(state, kind)

            def counted(inputs_):
                kernel = make(inputs_)

                def run(*args):
                    calls["forward" if kind == "few_outputs" else "vjp"].append(inputs_.signature)
                    return kernel(*args)

                return run

            return counted

        state.vjp, state.few_outputs = counting("vjp"), counting("few_outputs")
        try:
            return probe(state, inputs, entry)
        finally:
            del state.vjp, state.few_outputs

    monkeypatch.setattr(probes, "_probe", counted_probe)
    return calls


def test_coupling_probe_runs_once_per_model_and_shape(monkeypatch, rng):
    calls = _count_probe_runs(monkeypatch)
    f64 = dict(dtype="float64")
    model = keras.Sequential([layers.Input((3,), **f64), layers.Dense(4, **f64), Square(**f64)])
    x = rng.normal(size=(6, 3))
    J = jacket.jacobian(model, x)
    # samples apart: the outputs outside each half of every bit stayed (NOTE: [Outputs that do
    # not move]), so no VJP ran: one forward pass as it is, one per half of every bit
    per_signature = 1 + 2 * math.ceil(math.log2(6))
    assert len(calls["forward"]) == per_signature and not calls["vjp"]
    jacket.jacobian(model, x + 1)  # the same signature: the verdict is cached
    jacket.jacobian(model, x, flatten=True)  # other options, same model and shape
    jacket.vjp(model, x, np.ones((6, 4)))
    assert len(calls["forward"]) == per_signature and not calls["vjp"]
    jacket.jacobian(model, x[:3])  # a new shape: probed again
    assert len(calls["forward"]) == per_signature + 1 + 2 * math.ceil(math.log2(3))
    # the probe's verdict was right: the per-sample blocks are those of the full Jacobian
    assert_close(J, central_differences(lambda v: model(v), x), rtol=1e-6)

    coupled = keras.Sequential([layers.Input((3,)), layers.Dense(4), BatchMean()])
    before = len(calls["forward"])
    for _ in range(2):
        with pytest.raises(jacket.CouplingError):
            jacket.jacobian(coupled, x)
    # the outputs moved at the first half, and the VJP probe, which decides, stops at the first
    # leaking bit; only the first call probes
    assert len(calls["forward"]) - before == 2
    assert 1 <= len(calls["vjp"]) <= 2 * math.ceil(math.log2(6))
    after_first = len(calls["vjp"])
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(coupled, x)
    assert len(calls["vjp"]) == after_first


def test_jvp_from_reverse_passes_at_batch_1_does_not_tile_a_model_that_mixes_samples(
    monkeypatch, rng
):
    """`x - mean(x, axis=0)` at batch 1 has the Jacobian 0. Where forward mode failed its check,
    `J v` comes from reverse passes, whose plan must not tile the batch ("replicate"): tiled,
    the mean mixed the copies, and PyTorch returned `v`."""
    monkeypatch.setattr(probes, "forward_method", lambda *args: None)  # the reverse route

    def centre(z):
        return z - ops.mean(z, axis=0, keepdims=True)

    x, v = rng.normal(size=(1, 3)), rng.normal(size=(1, 3))
    np.testing.assert_allclose(to_numpy(jacket.jvp(centre, x, v)), 0.0, atol=1e-6)


def test_a_kept_coupling_verdict_names_non_finite_inputs_first(rng):
    model = batch_mean_model()
    x = rng.normal(size=(4, 3))
    with pytest.raises(jacket.CouplingError):
        jacket.jacobian(model, x)
    x[1, 0] = np.nan  # the same signature: the verdict is kept, and the NaN is named first
    with pytest.raises(jacket.JacketValueError, match="NaN or inf"):
        jacket.jacobian(model, x)


class StoppedMean(layers.Layer):
    """`x - stop_gradient(mean over the batch)`: the values depend on other samples, the
    derivative does not (it is the identity)."""

    def call(self, x):
        return x - ops.stop_gradient(ops.mean(x, axis=0, keepdims=True))


def test_values_that_move_without_a_derivative_leave_the_verdict_to_the_vjp_probe(monkeypatch, rng):
    calls = _count_probe_runs(monkeypatch)
    model = keras.Sequential([layers.Input((3,), dtype="float64"), StoppedMean(dtype="float64")])
    x = rng.normal(size=(4, 3))
    J = to_numpy(jacket.jacobian(model, x))
    assert len(calls["forward"]) == 2  # the outputs moved at the first half
    assert len(calls["vjp"]) == 2 * math.ceil(math.log2(4))  # every split probed: apart
    np.testing.assert_array_equal(J, np.broadcast_to(np.eye(3), (4, 3, 3)))


def test_the_vjp_probe_runs_directly_where_the_vjp_is_built_anyway(monkeypatch, rng):
    calls = _count_probe_runs(monkeypatch)
    f64 = dict(dtype="float64")
    model = keras.Sequential([layers.Input((3,), **f64), layers.Dense(4, **f64), Square(**f64)])
    x, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 4))
    grads = to_numpy(jacket.vjp(model, x, u))
    assert not calls["forward"] and len(calls["vjp"]) == 2 * math.ceil(math.log2(4))
    J = central_differences(lambda v: model(v), x)  # (4, 4, 3)
    assert_close(grads, np.einsum("bo,boi->bi", u, J), rtol=1e-6)


# ------------------------------------------------------------------------ non-differentiable paths


class RoundLayer(layers.Layer):
    def call(self, x):
        return ops.round(x)


class ArgmaxLayer(layers.Layer):
    def call(self, x):
        return ops.cast(ops.argmax(x, axis=-1), x.dtype)[:, None]


class MaskRelu(layers.Layer):
    """ReLU written with a comparison: differentiable through `x`, so no warning."""

    def call(self, x):
        return x * ops.cast(x > 0, x.dtype)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(dtype="float64")
        self.dense = layers.Dense(4, dtype="float64")
        self.stop = StopLayer(dtype="float64", name="stopper")

    def call(self, x):
        return self.stop(self.dense(x))


class StopLayer(layers.Layer):
    def call(self, x):
        return ops.stop_gradient(x) * 2.0


@contextlib.contextmanager
def _jacket_warnings():
    """The messages of the `JacketWarning`s raised inside; other warnings keep pytest's filters
    (`pytest.warns` would record the frameworks' own deprecations and re-raise them as errors)."""
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", jacket.JacketWarning)
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, jacket.JacketWarning):
                messages.append(str(message))
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield messages


def _functional(cut):
    x = keras.Input((3,), dtype="float64")
    h = layers.Dense(4, dtype="float64")(x)
    return keras.Model(x, cut(h))


CUT_MODELS = {
    # name: (build, words the warning must hold: where the gradient stops[, oracle])
    # stop_gradient changes the derivative, not the function: its oracle is the framework's own
    # Jacobian; the others' is finite differences (zero away from the steps)
    "sequential_round": (
        lambda: keras.Sequential(
            [
                layers.Input((3,), dtype="float64"),
                layers.Dense(4, dtype="float64"),
                RoundLayer(dtype="float64", name="rounder"),
                layers.Dense(2, dtype="float64"),
            ]
        ),
        ["layer 'rounder' (RoundLayer)", "(Round)"],
    ),
    "functional_argmax": (
        lambda: _functional(lambda h: ops.cast(ops.argmax(h, axis=-1), "float64")[:, None]),
        ["(Argmax)", "integer output"],
    ),
    "functional_cast_int32": (
        lambda: _functional(lambda h: ops.cast(ops.cast(h * 10, "int32"), "float64")),
        ["(Cast)", "integer output"],
    ),
    "functional_stop_gradient": (
        lambda: _functional(lambda h: ops.stop_gradient(h) + 1.0),
        ["(StopGradient)"],
        "native",
    ),
    "functional_comparison": (
        lambda: _functional(lambda h: ops.cast(ops.greater(h, 0.0), "float64")),
        ["(Greater)", "integer output"],
    ),
    "custom_layer_argmax": (
        lambda: ArgmaxLayer(dtype="float64", name="picker"),
        ["layer 'picker' (ArgmaxLayer)", "(Argmax)"],
    ),
    "subclassed_stop_gradient": (
        Subclassed,
        ["layer 'stopper' (StopLayer)", "(StopGradient)"],
        "native",
    ),
}


@pytest.mark.parametrize("name", sorted(CUT_MODELS))
def test_cut_gradients_give_zeros_and_one_warning_naming_the_layer(name, rng):
    build, words, *oracle = CUT_MODELS[name]
    model = build()
    x = rng.normal(size=(3, 3)) + 0.123  # away from rounding and sign boundaries
    with _jacket_warnings() as record:
        J = jacket.jacobian(model, x)
    (message,) = record
    for word in words:
        assert word in message, (word, message)
    if oracle == ["native"]:
        expected = native_jacobian(model, x)
    else:
        expected = central_differences(lambda v: model(v), x, eps=1e-7)
    assert np.all(expected == 0.0)  # the oracle agrees the gradient is cut
    assert_close(J, expected, rtol=0.0, atol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jacket.JacketWarning)  # once per model
        jacket.jacobian(model, x[:2])


def test_one_cut_output_warns_and_the_other_is_exact(rng):
    x_in = keras.Input((3,), dtype="float64")
    h = layers.Dense(4, activation="tanh", dtype="float64")(x_in)
    model = keras.Model(x_in, [ops.floor(h * 3.0), layers.Dense(2, dtype="float64")(h)])
    x = rng.normal(size=(2, 3))
    with _jacket_warnings() as record:
        J = jacket.jacobian(model, x)
    assert len(record) == 1 and re.search(r"operation 'floor[_0-9]*' \(Floor\)", record[0])
    assert np.all(to_numpy(J[0]) == 0.0)
    assert_close(J[1], central_differences(lambda v: model(v)[1], x), rtol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: seed_mlp("float64"),
        lambda: keras.Sequential(
            [
                layers.Input((3,), dtype="float64"),
                MaskRelu(dtype="float64"),
                layers.Dense(2, dtype="float64"),
            ]
        ),
        lambda: _functional(lambda h: h + ops.stop_gradient(ops.round(h))),  # a side path
        lambda: _functional(lambda h: ops.where(h > 0, h, 0.1 * h)),
        lambda: layers.Dense(2, dtype="float64"),
    ],
    ids=["mlp", "mask_relu", "stop_gradient_side_path", "where", "dense_layer"],
)
def test_no_warning_when_every_output_carries_a_gradient(build, rng):
    model = build()
    in_size = (
        5
        if getattr(model, "name", "").startswith("sequential")
        and len(model.layers) == 2
        and model.layers[0].__class__ is layers.Dense
        else 3
    )
    x = rng.normal(size=(2, in_size)) + 0.123
    with warnings.catch_warnings():
        warnings.simplefilter("error", jacket.JacketWarning)
        J = jacket.jacobian(model, x)
    assert np.abs(to_numpy(J)).max() > 0
    assert_close(J, central_differences(lambda v: model(v), x), rtol=1e-5)


def test_a_zero_jacobian_without_a_cut_is_legal_and_silent(rng):
    model = keras.Sequential(
        [layers.Input((3,), dtype="float64"), layers.Dense(2, dtype="float64")]
    )
    model.layers[0].kernel.assign(np.zeros((3, 2)))
    x = rng.normal(size=(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jacket.JacketWarning)
        J = jacket.jacobian(model, x)
    assert np.all(to_numpy(J) == 0.0)


def test_the_walk_runs_only_where_the_jacobian_leaves_room_for_a_cut(rng, monkeypatch):
    # NOTE: [A Jacobian that moves has no cut]: a dense Jacobian whose every block has a finite
    # non-zero entry needs no walk; a zero block (here: a weight of zero) walks, and so does the
    # first entry of any other call
    from jacket.engine import state as state_module

    walks = []
    monkeypatch.setattr(state_module, "warn_if_cut", lambda *args: walks.append(args[0]))
    x = rng.normal(size=(2, 3))
    jacket.jacobian(_functional(ops.tanh), x)
    assert walks == []
    model = keras.Model(*_two_outputs())
    model.layers[-1].kernel.assign(np.zeros((4, 2)))
    jacket.jacobian(model, x)
    assert walks == ["jacobian"]
    jacket.jvp(_functional(ops.tanh), x, np.ones_like(x))
    assert walks == ["jacobian", "jvp"]


def _two_outputs():
    x = keras.Input((3,), dtype="float64")
    h = layers.Dense(4, activation="tanh", dtype="float64")(x)
    return x, [h, layers.Dense(2, dtype="float64")(h)]


def test_the_walk_leaves_the_models_graph_as_it_was(rng):
    model = Subclassed()
    model(rng.normal(size=(2, 3)))
    before = {id(layer): len(layer._inbound_nodes) for layer in model._flatten_layers()}
    with _jacket_warnings() as record:
        jacket.jacobian(model, rng.normal(size=(2, 3)))
    assert len(record) == 1
    after = {id(layer): len(layer._inbound_nodes) for layer in model._flatten_layers()}
    assert after == before


# ------------------------------------------------------------------------------ untrusted files


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of `a + b` from those of `a` and `b` (`len2 = len(b)`)."""

    def times(matrix, vector):
        out, i = 0, 0
        while vector:
            if vector & 1:
                out ^= matrix[i]
            vector >>= 1
            i += 1
        return out

    def square(matrix):
        return [times(matrix, matrix[n]) for n in range(32)]

    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = square(odd)
    odd = square(even)
    while len2:
        even = square(odd)
        if len2 & 1:
            crc1 = times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = square(even)
        if len2 & 1:
            crc1 = times(odd, crc1)
        len2 >>= 1
    return crc1 ^ crc2


def _zip_bomb(path, name: str = "x.npy", size: int = 1 << 30) -> None:
    """A real zip bomb: one member, an `.npy` of `size` bytes of zeros (float32), deflated to about
    a thousandth. Each MiB of zeros is deflated with a full flush, so the compressed MiBs are all
    alike and the file is written without compressing a GiB (and its CRC computed by combining)."""
    import struct
    import zlib

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, "float32"))
    header["shape"] = (size // 4,)
    buffer = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    head = buffer.getvalue()
    mib = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert block == deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    data = first + block * (size >> 20) + deflate.flush()
    crc = zlib.crc32(mib)
    for _ in range((size >> 20).bit_length() - 1):  # size is a power of two MiB
        crc = _crc32_combine(crc, crc, len(mib) << _)
    assert _crc32_combine(zlib.crc32(mib), zlib.crc32(mib), 1 << 20) == zlib.crc32(mib + mib)
    crc = _crc32_combine(zlib.crc32(head), crc, size)
    total, encoded = len(head) + size, name.encode()
    fields = (20, 20, 0, 8, 0, 0, crc, len(data), total, len(encoded))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields[1:], 0) + encoded
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, *fields, 0, 0, 0, 0, 0, 0) + encoded
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local + data), 0)
    with open(path, "wb") as file:
        file.write(local + data + central + end)


def test_zip_bombs_are_refused_before_they_inflate(tmp_path):
    import time
    import zipfile

    from jacket import io

    bomb = tmp_path / "x.npz"
    _zip_bomb(bomb)
    assert bomb.stat().st_size < 2 << 20
    with zipfile.ZipFile(bomb) as archive:  # it is a valid archive that inflates to 1 GiB
        (member,) = archive.infolist()
        assert member.file_size > 1 << 30
        with archive.open(member) as stream:
            assert np.lib.format.read_magic(stream) == (1, 0)
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            assert shape == ((1 << 30) // 4,) and dtype == np.float32
            assert stream.read(1 << 20) == bytes(1 << 20)
    start = time.perf_counter()
    for read in (lambda: io.read_inputs(bomb, None), lambda: io.read_result(bomb)):
        with pytest.raises(jacket.JacketValueError, match=r"zip bomb") as info:
            read()
        assert "'x.npy'" in str(info.value) and "1.0 GiB" in str(info.value)
    model_bomb = tmp_path / "model.keras"
    bomb.rename(model_bomb)
    with pytest.raises(jacket.JacketValueError, match=r"refused to open .*model.keras.*zip bomb"):
        io.load_model(model_bomb)
    assert time.perf_counter() - start < 2.0  # refused from the directory, nothing inflated


def test_archives_over_the_size_limit_are_refused_unless_raised(tmp_path, monkeypatch, rng):
    from jacket import io

    x = rng.normal(size=(4, 300))
    path = tmp_path / "x.npz"
    np.savez(path, x=x)  # 9.6 KB uncompressed
    monkeypatch.setenv("JACKET_MAX_ARCHIVE_BYTES", "4KiB")
    with pytest.raises(
        jacket.JacketValueError, match=r"9.5 KiB uncompressed, more than .* 4.0 KiB"
    ):
        io.read_result(path)
    with pytest.raises(jacket.JacketValueError, match="JACKET_MAX_ARCHIVE_BYTES=16GiB"):
        io.read_inputs(path, None)
    monkeypatch.setenv("JACKET_MAX_ARCHIVE_BYTES", "1MiB")
    array, key = io.read_result(path)
    assert key == "x" and np.array_equal(array, x)
    monkeypatch.setenv("JACKET_MAX_ARCHIVE_BYTES", "lots")
    with pytest.raises(jacket.JacketValueError, match="Received: JACKET_MAX_ARCHIVE_BYTES='lots'"):
        io.read_result(path)


def test_archives_with_too_many_members_are_refused(tmp_path, monkeypatch):
    from jacket import io
    from jacket.io import models

    monkeypatch.setattr(models, "MAX_ARCHIVE_MEMBERS", 3)
    path = tmp_path / "x.npz"
    np.savez(path, *[np.zeros(2) for _ in range(4)])
    with pytest.raises(jacket.JacketValueError, match="it has 4 members, more than the 3"):
        io.read_result(path, "arr_0")
    np.savez(path, *[np.arange(2.0) for _ in range(3)])
    assert np.array_equal(io.read_result(path, "arr_2")[0], np.arange(2.0))


@pytest.mark.parametrize("name", ["../escape.npy", "/absolute.npy", "a/../../b.npy", "C:/x.npy"])
@pytest.mark.parametrize("suffix", [".npz", ".keras"])
def test_archive_members_named_outside_are_refused(name, suffix, tmp_path):
    import zipfile

    from jacket import io

    path = tmp_path / f"x{suffix}"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok.npy", b"")
        archive.writestr(zipfile.ZipInfo(name), b"")
    with zipfile.ZipFile(path) as archive:
        assert name in archive.namelist()  # the crafted name is really stored
    with pytest.raises(jacket.JacketValueError, match=r"has an absolute path or climbs out"):
        io.load_model(path) if suffix == ".keras" else io.read_inputs(path, None)
    assert not (tmp_path.parent / "escape.npy").exists()


class _Planted:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_pickled_arrays_are_never_unpickled(tmp_path):
    from jacket import io

    marker = tmp_path / "pickle-ran"
    path = tmp_path / "x.npz"
    np.savez(path, x=np.array([_Planted(str(marker))], dtype=object))
    with pytest.raises(jacket.JacketValueError, match="non-numeric"):
        io.read_inputs(path, None)
    with pytest.raises(jacket.JacketValueError):
        io.read_result(path)
    npy = tmp_path / "x.npy"
    np.save(npy, np.array([_Planted(str(marker))], dtype=object))
    with pytest.raises(jacket.JacketValueError):
        io.read_inputs(npy, None)
    assert not marker.exists()
    np.load(path, allow_pickle=True)["x"]  # the oracle: unpickling it does run the code
    assert marker.exists()


def _h5_model(path):
    model = keras.Sequential([layers.Input((3,)), layers.Dense(2)])
    model.save(path)
    return model


def test_hdf5_models_that_read_other_files_are_refused(tmp_path, rng):
    import h5py

    from jacket import io

    model = _h5_model(tmp_path / "m.h5")
    x = rng.normal(size=(2, 3)).astype("float32")
    loaded = io.load_model(tmp_path / "m.h5")  # the honest file loads
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6)

    (tmp_path / "secret.bin").write_bytes(bytes(40))
    linked = tmp_path / "linked.h5"
    _h5_model(linked)
    with h5py.File(linked, "a") as file:
        file["elsewhere"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/")
    with pytest.raises(jacket.JacketValueError, match="'elsewhere' links to the file"):
        io.load_model(linked)
    external = tmp_path / "external.h5"
    _h5_model(external)
    with h5py.File(external, "a") as file:
        file.create_dataset("raw", (10,), "f4", external=[(str(tmp_path / "secret.bin"), 0, 40)])
    with pytest.raises(jacket.JacketValueError, match="dataset 'raw' stores its data in other"):
        io.load_model(external)


def test_hdf5_models_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    from jacket import io

    _h5_model(tmp_path / "m.h5")  # 3 * 2 + 2 float32 weights: 32 bytes
    monkeypatch.setenv("JACKET_MAX_ARCHIVE_BYTES", "16")
    with pytest.raises(jacket.JacketValueError, match="datasets declare 32 bytes, more than .* 16"):
        io.load_model(tmp_path / "m.h5")


def test_hdf5_lambda_layers_are_refused_without_unsafe(tmp_path, rng):
    from jacket import io

    model = keras.Sequential([layers.Input((3,)), layers.Lambda(lambda t: t * 2.0)])
    model.save(tmp_path / "m.h5")
    with pytest.raises(jacket.JacketValueError, match="Lambda layer.*--unsafe"):
        io.load_model(tmp_path / "m.h5")
    x = rng.normal(size=(2, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(io.load_model(tmp_path / "m.h5", unsafe=True)(x)), 2 * x)


@pytest.mark.parametrize("suffix", [".zarr", ".npz"])
def test_output_names_cannot_escape_the_result(suffix, tmp_path, rng):
    from jacket import io

    names = ["..", "../../up", "a/b", "c\\d", ".", "", "\x00nul"]
    x = {name: rng.normal(size=(2, 1)) for name in names}
    J = {out: {name: rng.normal(size=(2, 1, 1)) for name in names} for out in ("..", "/abs")}
    blocks = io.jacobian_blocks(J, x)
    assert len(blocks) == 2 * len(names)  # no two names collapse into one key
    for key in blocks:
        parts = key.split("/")
        assert len(parts) == 2 and not {"", ".", ".."} & set(parts) and "\\" not in key, key
    out = tmp_path / "inside" / f"J{suffix}"
    out.parent.mkdir()
    io.write_result(out, blocks)
    written = {p.resolve() for p in tmp_path.rglob("*")}
    assert all(out.parent.resolve() in p.parents or p == out.parent.resolve() for p in written)
    for key, block in blocks.items():  # each block reads back under its key (the oracle)
        assert np.array_equal(np.asarray(io.read_result(out, key)[0]), block)


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b", "C:/x", "a\\..\\b", "."])
def test_result_keys_naming_a_path_outside_are_refused(key, tmp_path):
    from jacket import io

    with pytest.raises(jacket.JacketValueError, match="must be one or more plain names"):
        io.write_result(tmp_path / "J.zarr", {key: np.zeros((2, 1))})
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape").exists()
