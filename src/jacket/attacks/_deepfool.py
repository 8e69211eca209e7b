"""DeepFool (Moosavi-Dezfooli et al. 2016)."""

from __future__ import annotations

import numpy as np

from ..batches import Progress, batches, single_array
from ..checks import check_model, positive_float, positive_int
from ..engine import jacobian
from ..trees import to_numpy
from ._result import AttackResult, classes, clip_bounds, output_gradients, perturbation


def deepfool(
    model,
    x,
    *,
    overshoot: float = 0.02,
    max_iter: int = 50,
    clip: tuple[float, float] | None = None,
    candidates: int = 10,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> AttackResult:
    """DeepFool: the smallest L2 step across the nearest linearized decision boundary, repeated.

    At each step, for the sample's original class `k0` and each other candidate class `k`, with
    `w_k = grad Z_k - grad Z_k0` and `f_k = Z_k - Z_k0` (one Jacobian per step), it moves to the
    nearest boundary `l = argmin_k |f_k| / ||w_k||`: `r = (|f_l| / ||w_l|| + 1e-4) w_l / ||w_l||`.
    The iterate is `x + (1 + overshoot) * r_total`, clipped; a sample stops once its class changes
    (Moosavi-Dezfooli et al. 2016, Algorithm 2, as in the authors' code). Untargeted by nature.

    Args:
      model: A classifier, `(batch, *in_shape)` to `(batch, classes)`, outputting logits.
      x: Inputs `(n, *in_shape)`.
      overshoot: How far past the boundary to go (the paper: 0.02).
      max_iter: Steps at most per sample.
      clip: `(low, high)` bounds of the input domain, or None.
      candidates: How many classes to consider, the highest-scoring on `x` (all if there are at
        most this many). With fewer than all, their gradients come from one VJP call per step.
      batch_size: Samples per engine call.
      progress: Called as `progress(samples_done, n)` after each batch.

    Returns:
      An `AttackResult` with perturbation "l2" and `iterations` (steps per sample).

    Example:
      >>> r = jacket.attacks.deepfool(model, x_test, clip=(0, 1))
      >>> r.success_rate, r.mean_perturbation
    """
    fn = "deepfool"
    check_model(fn, model)
    x = single_array(fn, "x", x)
    overshoot = positive_float(fn, "overshoot", overshoot, allow_zero=True)
    max_iter = positive_int(fn, "max_iter", max_iter)
    clip = clip_bounds(fn, clip)
    candidates = positive_int(fn, "candidates", candidates)
    batch_size = positive_int(fn, "batch_size", batch_size)
    n = len(x)
    x_adv = np.empty_like(x)
    labels = np.empty(n, np.int64)
    predictions = np.empty(n, np.int64)
    steps = np.zeros(n, np.int64)
    stream, _ = batches(fn, x, batch_size)
    for part in stream:
        rows = slice(part.start, part.start + part.valid)
        adv, label, predicted, taken = _attack(model, part.x, overshoot, max_iter, clip, candidates)
        x_adv[rows] = adv[: part.valid]
        labels[rows] = label[: part.valid]
        predictions[rows] = predicted[: part.valid]
        steps[rows] = taken[: part.valid]
        if progress is not None:
            progress(part.start + part.valid, n)
    return AttackResult(
        x_adv=x_adv,
        success=predictions != labels,
        perturbation=perturbation(x, x_adv, "l2"),
        norm="l2",
        labels=labels,
        predictions=predictions,
        iterations=steps,
    )


def _attack(model, x, overshoot, max_iter, clip, candidates):
    """One batch: `(x_adv, labels, predictions, steps)`."""
    batch, shape = len(x), x.shape
    rows = np.arange(batch)[:, None]
    x0 = x.reshape(batch, -1).astype(np.float64)
    z, label = classes(model, x)
    n_classes = z.shape[1]
    # the candidate classes, best first: column 0 is the original class
    order = np.argsort(-z, axis=1, kind="stable")[:, : min(candidates, n_classes)]
    every = order.shape[1] == n_classes
    if not every:
        seeds = np.zeros((batch, n_classes, order.shape[1]), x.dtype)
        seeds[rows, order, np.arange(order.shape[1])[None]] = 1.0
    total = np.zeros_like(x0)
    point = x
    predicted = label.copy()
    active = np.ones(batch, bool)
    steps = np.zeros(batch, np.int64)
    for _ in range(max_iter):
        if not active.any():
            break
        if every:
            J = to_numpy(jacobian(model, point, flatten=True)).astype(np.float64)
            grads = J[rows, order]  # (batch, K, in_size)
        else:
            grads = np.moveaxis(output_gradients(model, point, seeds), 2, 1).astype(np.float64)
        w = grads - grads[:, :1]
        f = z[rows, order].astype(np.float64) - z[rows, order[:, :1]]
        size = np.linalg.norm(w, axis=2)
        distance = np.where(size > 0, np.abs(f) / np.where(size > 0, size, 1.0), np.inf)
        distance[:, 0] = np.inf
        nearest = distance.argmin(axis=1)
        d = distance[rows[:, 0], nearest]
        w_l = w[rows[:, 0], nearest]
        s_l = size[rows[:, 0], nearest]
        active &= np.isfinite(d)  # no class's boundary in reach: nowhere to go
        step = np.zeros_like(x0)
        step[active] = ((d[active] + 1e-4) / s_l[active])[:, None] * w_l[active]
        total += step
        moved = x0 + (1.0 + overshoot) * total
        if clip is not None:
            moved = np.clip(moved, *clip)
            total = (moved - x0) / (1.0 + overshoot)  # keep only the part the bounds allow
        steps += active
        point = moved.astype(x.dtype).reshape(shape)
        z, predicted = classes(model, point)
        active &= predicted == label
    return point, label, predicted, steps
