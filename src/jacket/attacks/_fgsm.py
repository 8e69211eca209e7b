"""The fast gradient sign method (Goodfellow et al. 2015)."""

from __future__ import annotations

import numpy as np

from ..batches import Progress, batches, pad, single_array
from ..checks import check_model, positive_float, positive_int
from ._result import (
    AttackResult,
    check_classes,
    class_array,
    classes,
    clip_bounds,
    loss_gradient,
    perturbation,
)


def fgsm(
    model,
    x,
    *,
    eps: float,
    y=None,
    target=None,
    clip: tuple[float, float] | None = None,
    logits: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> AttackResult:
    """Fast gradient sign method: one step of size `eps` along the sign of the loss gradient.

    Untargeted: `x_adv = clip(x + eps * sign(d CE(model(x), y) / dx))`, away from the label `y`.
    Targeted: `x_adv = clip(x - eps * sign(d CE(model(x), target) / dx))`, toward `target`. The
    gradient is one VJP of the cross-entropy's gradient on the outputs.

    Args:
      model: A classifier, `(batch, *in_shape)` to `(batch, classes)`.
      x: Inputs `(n, *in_shape)`.
      eps: Step size (the L-infinity size of the perturbation before clipping).
      y: True classes `(n,)` (or one int); default: the model's predictions on `x`.
      target: Target classes `(n,)` or one int, for a targeted attack.
      clip: `(low, high)` bounds of the input domain, or None.
      logits: True if the model outputs logits, False if it outputs probabilities.
      batch_size: Samples per engine call.
      progress: Called as `progress(samples_done, n)` after each batch.

    Returns:
      An `AttackResult`, perturbation in "linf".

    Example:
      >>> r = jacket.attacks.fgsm(model, x_test, eps=0.1, clip=(0, 1))
      >>> r.success_rate, r.mean_perturbation
    """
    fn = "fgsm"
    check_model(fn, model)
    x = single_array(fn, "x", x)
    eps = positive_float(fn, "eps", eps)
    clip = clip_bounds(fn, clip)
    batch_size = positive_int(fn, "batch_size", batch_size)
    n = len(x)
    y = class_array(fn, "y", y, n)
    target = class_array(fn, "target", target, n)
    x_adv = np.empty_like(x)
    labels = np.empty(n, np.int64)
    predictions = np.empty(n, np.int64)
    stream, _ = batches(fn, x, batch_size)
    for part in stream:
        rows = slice(part.start, part.start + part.valid)
        z, predicted = classes(model, part.x)
        check_classes(fn, "y", y, z.shape[1])
        check_classes(fn, "target", target, z.shape[1])
        label = predicted if y is None else pad(y[rows], len(part.x))
        if target is None:
            gradient = loss_gradient(model, part.x, z, label, logits)
            moved = part.x.astype(np.float64) + eps * np.sign(gradient)
        else:
            gradient = loss_gradient(model, part.x, z, pad(target[rows], len(part.x)), logits)
            moved = part.x.astype(np.float64) - eps * np.sign(gradient)
        if clip is not None:
            moved = np.clip(moved, *clip)
        moved = moved.astype(x.dtype)
        x_adv[rows] = moved[: part.valid]
        labels[rows] = label[: part.valid]
        predictions[rows] = classes(model, moved)[1][: part.valid]
        if progress is not None:
            progress(part.start + part.valid, n)
    success = predictions != labels if target is None else predictions == target
    return AttackResult(
        x_adv=x_adv,
        success=success,
        perturbation=perturbation(x, x_adv, "linf"),
        norm="linf",
        labels=labels,
        predictions=predictions,
        target=target,
    )
