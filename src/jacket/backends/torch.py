"""PyTorch primitives on plain autograd (no `torch.func`), run eagerly.

NOTE: [Why no torch.func here]
`torch.func.functional_call` ignores its parameters for Keras models (Keras reads its own variables),
`vmap` through Keras's Conv2D fails on inputs with several channels ("Tensor.clone(memory_format)
inside vmap"), and forward-mode AD fails through max pooling. Plain autograd works for every layer:
a JVP is the derivative of a VJP with respect to its cotangent (the "double-backward" trick), and
several cotangents are pulled back through one retained graph.
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import torch

from .memory import cpu_description

NAME = "torch"
EAGER = True  # kernels run as written, not traced and compiled
FEW_PASSES_EAGERLY = True  # kernels run eagerly anyway
# The planner's first candidate strategies, in order (NOTE: [Measured plans]): one pass over the
# replicated batch (one Python-level model call instead of one per seed), then autograd's batched
# backward.
PRIOR = {"other": ("replicate", "vmap", "loop")}
LAYER_RULES = ()  # none measured to win here (`benchmarks/layer_survey.py`, `benchmarks/anchors.py`)


def compile(kernel, model, training, make_call):
    """Eager: the kernel runs as written, with autograd on (even inside `torch.no_grad()`).

    NOTE: [One draw per call on PyTorch]
    A kernel calls the model once per pass (and the plan may split a Jacobian into many kernel
    calls). Keras's unseeded `Dropout` on PyTorch draws from torch's global generator, so each
    pass would see its own mask, and the assembled Jacobian would mix them. In training mode,
    every call of the model therefore runs on a fork of the generators reseeded with
    `torch.initial_seed()`: all passes, and `jvp`, `vjp` and `jacobian` alike, see the same draws
    (as TensorFlow and JAX do, whose seed generators are read, never advanced), the caller's
    generators are left as they were, and a new `torch.manual_seed` (or
    `keras.utils.set_random_seed`) gives another draw.
    """
    stateless = training and hasattr(model, "variables")

    def run(*args):
        with torch.enable_grad():
            state = [v.value for v in model.variables] if stateless else None
            call = make_call(model, training, state)
            if training:
                call = _same_draws(call, torch.initial_seed())
            return kernel(call, *args)

    return run


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_description()


def block_until_ready(tree) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_view(tensor):
    """A NumPy view of `tensor` where it lives in host memory (no copy), else None."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16
        return None
    return tensor.detach().numpy()


def _same_draws(call, seed: int):
    """`call`, each run on a fork of torch's generators reseeded with `seed`."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    def seeded(x):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return call(x)

    return seeded


def _watched(xs):
    return [x.detach().requires_grad_(True) for x in xs]


def _grad(ys, xs, cts, **kwargs):
    grads = torch.autograd.grad(ys, xs, cts, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


def as_input(array, dtype):
    return keras.ops.convert_to_tensor(array, dtype=dtype)


def vjp(f, xs, cts):
    with torch.enable_grad():
        xs = _watched(xs)
        ys = f(xs)
        pairs = [(y, c) for y, c in zip(ys, cts) if y.requires_grad]
        if not pairs:
            return [torch.zeros_like(x) for x in xs]
        return _grad([y for y, _ in pairs], xs, [c for _, c in pairs])


def _math_attention():
    """Attention by its plain formula: the fused CPU kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def jvp(f, xs, ts):
    return _double_vjp(f, _watched, xs, ts, keep_graph=False)[1]


def _double_vjp(f, watched, xs, ts, keep_graph: bool):
    """`(ys, J t)` with `J t = d/du <u^T J, t>` (reverse passes only); `keep_graph`: the result's
    graph is kept, so that an enclosing backward goes through it (`jacket.training`)."""
    with torch.enable_grad(), _math_attention():
        xs = watched(xs)
        ys = f(xs)
        out = []
        for y in ys:
            if not y.requires_grad:
                out.append(torch.zeros_like(y))
                continue
            u = torch.zeros_like(y, requires_grad=True)
            grads = torch.autograd.grad(y, xs, u, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, ts) if g is not None and g.requires_grad]
            if not pairs:
                out.append(torch.zeros_like(y))
                continue
            (d,) = torch.autograd.grad(
                [g for g, _ in pairs], u, [t for _, t in pairs], create_graph=keep_graph,
                allow_unused=True,
            )  # fmt: skip
            out.append(torch.zeros_like(y) if d is None else d)
        return ys, out


JVPS = {"double_vjp": jvp}
# a backward that autograd cannot differentiate again may leave a tangent out without an error
TRUSTED_JVP = False


def linearize_vjp(f, xs):
    with torch.enable_grad():
        xs = _watched(xs)
        ys = f(xs)
    live = [i for i, y in enumerate(ys) if y.requires_grad]

    def pullback(cts):
        if not live:
            return [torch.zeros_like(x) for x in xs]
        return _grad([ys[i] for i in live], xs, [cts[i] for i in live], retain_graph=True)

    def batched(stacked):
        """All pullbacks at once: autograd's own batched backward (`is_grads_batched`)."""
        k = stacked[0].shape[0]
        grads = [None] * len(xs)
        if live:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "batching rule not implemented": slower, right
                grads = torch.autograd.grad(
                    [ys[i] for i in live],
                    xs,
                    [stacked[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        return [x.new_zeros((k,) + tuple(x.shape)) if g is None else g for g, x in zip(grads, xs)]

    pullback.batched = batched
    return [y.detach() for y in ys], pullback


def loop(fn, stacked):
    results = [fn([s[i] for s in stacked]) for i in range(stacked[0].shape[0])]
    return [torch.stack([r[j] for r in results]) for j in range(len(results[0]))]


def vmap(fn, stacked):
    """A pullback from `linearize_vjp` is batched by autograd itself; anything else is looped
    (no `torch.func.vmap`: see the NOTE at the top)."""
    batched = getattr(fn, "batched", None)
    if batched is None:
        return loop(fn, stacked)
    return batched(stacked)


# ---- training
# Derivatives that are part of a loss (`jacket.training`): plain autograd with `create_graph=True`,
# so the derivative is itself a node of the graph that the step's `loss.backward()` goes through.
# Inputs that already carry a graph (the output of another model, or of an enclosing derivative)
# are kept as they are, so these compose: a pullback of a pullback is a second derivative.
# NOTE: [Derivatives inside a training step] in `jacket.training._derivatives`.

# A JVP here is two reverse passes (the double VJP), so second derivatives go reverse over
# reverse: one more backward pass through the graph of the first derivative.
TRAIN_FORWARD = False


def _train_watched(xs):
    return [x if x.requires_grad else x.detach().requires_grad_(True) for x in xs]


def train_linearize(f, xs):
    """`(ys, pullback)`: one forward pass; `pullback(cts)` may be called many times (a None
    cotangent leaves its output out), and builds the graph of its result (`create_graph=True`)."""
    with torch.enable_grad():
        xs = _train_watched(xs)
        ys = f(xs)

    def pullback(cts):
        with torch.enable_grad(), _math_attention():
            pairs = [(y, c) for y, c in zip(ys, cts) if c is not None and y.requires_grad]
            if not pairs:
                return [torch.zeros_like(x) for x in xs]
            return _grad(
                [y for y, _ in pairs], xs, [c for _, c in pairs], create_graph=True,
                retain_graph=True,
            )  # fmt: skip

    return ys, pullback


def train_jvp(f, xs, ts):
    """`(ys, df(xs) ts)` by the double VJP (`d/du <u^T J, v>`), its graph kept."""
    return _double_vjp(f, _train_watched, xs, ts, keep_graph=True)


def train_map(fn, stacked):
    """`fn` over axis 0 of a list of tensors, results stacked (a Python loop)."""
    return loop(fn, stacked)


# ---- second order

SECOND_ORDER_MODES = ("reverse",)
SECOND_ORDER_STRATEGY = "replicate"


def vjp_differentiable(f, xs, cts):
    """`vjp` whose result autograd can differentiate again with respect to `xs`: the graph of the
    backward pass is kept (`create_graph=True`), and `xs` stay attached to the caller's graph
    (`vjp` detaches them)."""
    with torch.enable_grad(), _math_attention():
        xs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in xs]
        ys = f(xs)
        pairs = [(y, c) for y, c in zip(ys, cts) if y.requires_grad]
        if not pairs:
            return [torch.zeros_like(x) for x in xs]
        grads = torch.autograd.grad(
            [y for y, _ in pairs],
            xs,
            [c for _, c in pairs],
            create_graph=True,
            allow_unused=True,
        )
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


def jet2(f, xs, ts):
    """`(ys, J t, f''[t, t])` by reverse passes only (NOTE: [Why no torch.func here]): with `u` a
    zero cotangent, `r = <J^T u, t> = u^T J t`; `J t` is `dr/du`, and `f''[t, t]` is
    `d/du <dr/dx, t>` (a third backward pass through the graph of the second)."""
    with torch.enable_grad(), _math_attention():
        xs = _watched(xs)
        ys = f(xs)
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        first = [torch.zeros_like(y) for y in ys]
        second = [torch.zeros_like(y) for y in ys]
        if not live:
            return [y.detach() for y in ys], first, second
        us = [torch.zeros_like(ys[i], requires_grad=True) for i in live]
        grads = torch.autograd.grad(
            [ys[i] for i in live], xs, us, create_graph=True, allow_unused=True
        )
        r = sum((g * t).sum() for g, t in zip(grads, ts) if g is not None)
        if not torch.is_tensor(r) or not r.requires_grad:
            return [y.detach() for y in ys], first, second
        curvature = torch.autograd.grad(r, xs, create_graph=True, allow_unused=True)
        z = sum((h * t).sum() for h, t in zip(curvature, ts) if h is not None and h.requires_grad)
        d_first = torch.autograd.grad(r, us, retain_graph=True, allow_unused=True)
        d_second = [None] * len(us)
        if torch.is_tensor(z) and z.requires_grad:
            d_second = torch.autograd.grad(z, us, allow_unused=True)
        for k, i in enumerate(live):
            if d_first[k] is not None:
                first[i] = d_first[k].detach()
            if d_second[k] is not None:
                second[i] = d_second[k].detach()
        return [y.detach() for y in ys], first, second


def has_float64() -> bool:
    """Whether float64 can be computed (always, here)."""
    return True


def float64_scope():
    """A scope where float64 is float64: everywhere, here."""
    return contextlib.nullcontext()


def square_sum(g):
    """`sum(g**2, axis=0)`."""
    return torch.sum(g * g, dim=0)


def second_order_scope():
    """A scope in which Keras's layers have right second derivatives: everywhere, here."""
    return contextlib.nullcontext()
