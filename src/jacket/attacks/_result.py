"""What every attack returns, and what the attacks share: labels, targets, loss gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..engine import vjp
from ..engine.outputs import outputs
from ..errors import JacketTypeError, JacketValueError
from ..trees import to_numpy

NORMS = ("linf", "l2", "l0")


@dataclass
class AttackResult:
    """Adversarial examples and how they fared.

    Attributes:
      x_adv: `(n, *in_shape)` the adversarial examples (dtype of `x`).
      success: `(n,)` whether the model's class on `x_adv` differs from `labels` (untargeted) or
        equals `target` (targeted), for the samples attacked (False for `skipped` ones).
      perturbation: `(n,)` the size of `x_adv - x` in `norm`: "linf" (largest change), "l2"
        (Euclidean length) or "l0" (the fraction of input features changed, as JSMA reports it).
      norm: "linf", "l2" or "l0".
      labels: `(n,)` the class each sample is attacked from (`y`, or the model's prediction on `x`).
      predictions: `(n,)` the model's class on `x_adv`.
      target: `(n,)` target classes of a targeted attack, else None.
      iterations: `(n,)` steps taken per sample (iterative attacks), else None.
      skipped: `(n,)` samples not attacked because the model already gives them their target
        class (JSMA with a `target` equal to the predicted class): `x_adv == x`, no iteration, not
        a success, and left out of `success_rate`. None when every sample was attacked.
    """

    x_adv: np.ndarray
    success: np.ndarray
    perturbation: np.ndarray
    norm: str
    labels: np.ndarray
    predictions: np.ndarray
    target: np.ndarray | None = None
    iterations: np.ndarray | None = None
    skipped: np.ndarray | None = None

    @property
    def attacked(self) -> np.ndarray:
        """`(n,)` the samples attacked (all but the `skipped` ones)."""
        if self.skipped is None:
            return np.ones(self.success.shape, bool)
        return ~self.skipped

    @property
    def success_rate(self) -> float:
        """The share of the attacked samples that succeeded (NaN if none was attacked)."""
        attacked = self.attacked
        return float(self.success[attacked].mean()) if attacked.any() else float("nan")

    @property
    def mean_perturbation(self) -> float:
        """Mean `perturbation` over the successful samples (NaN if none succeeded)."""
        return float(self.perturbation[self.success].mean()) if self.success.any() else float("nan")

    def summary(self) -> dict:
        """Plain numbers for a report: samples (and how many were attacked), success rate, mean
        perturbation, norm."""
        return {
            "samples": int(self.success.size),
            "attacked": int(self.attacked.sum()),
            "success_rate": self.success_rate,
            "mean_perturbation": self.mean_perturbation,
            "norm": self.norm,
            "targeted": self.target is not None,
        }


def perturbation(x: np.ndarray, x_adv: np.ndarray, norm: str) -> np.ndarray:
    """Per-sample size of `x_adv - x` in `norm` ("linf", "l2", or "l0" as a fraction of features)."""
    d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    if norm == "linf":
        return np.abs(d).max(axis=1)
    if norm == "l2":
        return np.sqrt((d**2).sum(axis=1))
    return (d != 0).mean(axis=1)


def classes(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs `(batch, classes)` on `x` and its predicted classes."""
    z = outputs(model, x)
    if z.ndim != 2 or z.shape[1] < 2:
        raise JacketValueError(
            "attacks need a classifier with outputs `(batch, classes)`, at least 2 classes. "
            f"Received: outputs of shape {z.shape}."
        )
    return z, z.argmax(axis=1)


def class_array(fn: str, name: str, value, n: int) -> np.ndarray | None:
    """Class labels (an int for all samples, or one per sample) as an `(n,)` int array."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.ndim > 1:
        raise JacketTypeError(
            f"{fn}: `{name}` must be a class index (int) or one per sample `(n,)` of ints. "
            f"Received: {name} of dtype {array.dtype} and shape {array.shape}."
        )
    if array.ndim == 1 and array.shape[0] != n:
        raise JacketValueError(
            f"{fn}: `{name}` must have one class per sample ({n}). "
            f"Received: {name}.shape={array.shape}."
        )
    return np.broadcast_to(array.astype(np.int64), (n,)).copy()


def check_classes(fn: str, name: str, array: np.ndarray | None, n_classes: int) -> None:
    if array is not None and (np.any(array < 0) or np.any(array >= n_classes)):
        raise JacketValueError(
            f"{fn}: `{name}` must hold classes in [0, {n_classes}) (the model has {n_classes} "
            f"outputs). Received: values from {int(array.min())} to {int(array.max())}."
        )


def loss_gradient(model, x: np.ndarray, z: np.ndarray, label: np.ndarray, logits: bool):
    """`d CE(model(x), label) / dx` per sample, by one VJP.

    For logits `z` the cross-entropy's gradient on the outputs is `softmax(z) - onehot(label)`; for
    probabilities `p`, `-onehot(label) / p_label`.
    """
    batch = len(x)
    rows = np.arange(batch)
    if logits:
        shifted = z - z.max(axis=1, keepdims=True)
        cot = np.exp(shifted)
        cot /= cot.sum(axis=1, keepdims=True)
        cot[rows, label] -= 1.0
    else:
        cot = np.zeros_like(z)
        cot[rows, label] = -1.0 / np.maximum(z[rows, label], np.finfo(z.dtype).tiny)
    # the gradient of the batch's summed loss, which is FGSM's definition: no per-sample probe needed
    return to_numpy(vjp(model, x, cot.astype(z.dtype), per_sample=False))


def output_gradients(model, x: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """`seeds[b, :, j] @ J_b` for each column `j`: `(batch, in_size, k)` from `seeds`
    `(batch, classes, k)`, in one VJP call over the batch tiled `k` times."""
    batch, n_classes, k = seeds.shape
    tiled = np.concatenate([x] * k) if k > 1 else x
    cot = np.moveaxis(seeds, 2, 0).reshape(k * batch, n_classes)
    grads = to_numpy(vjp(model, tiled, cot.astype(x.dtype)))
    return np.moveaxis(grads.reshape(k, batch, -1), 0, 2)


def clip_bounds(fn_name: str, clip) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise JacketTypeError(
            f"{fn_name}: `clip` must be a pair `(low, high)` of numbers or None. "
            f"Received: clip={clip!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise JacketValueError(
            f"{fn_name}: `clip` must be `(low, high)` with finite low < high. "
            f"Received: clip={clip!r}."
        )
    return low, high
