"""The main job: per-sample Jacobians of a small digits classifier, checked and drawn.

The classifier ships with jacket (`jacket/data/digits_cnn.keras`, made by `train_digits_model`), and the
data is scikit-learn's 8x8 handwritten digits, which ship inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODEL_PATH = Path(__file__).parent / "data" / "digits_cnn.keras"
IMAGE_SHAPE = (8, 8, 1)
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_data():
    """`(x_train, y_train, x_test, y_test)`: the 8x8 digits scaled to [0, 1], shape `(n, 8, 8, 1)`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test


def build_digits_model():
    """The classifier's architecture: 8x8x1 -> 10 logits."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.Input(IMAGE_SHAPE, name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.AveragePooling2D(2),  # no max-pooling ties in the blank margins of digits
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, name="logits"),
        ],
        name="digits_cnn",
    )


def train_digits_model(path: str | Path = MODEL_PATH, *, epochs: int = 40, seed: int = 0):
    """Train the bundled classifier and save it to `path` (how `digits_cnn.keras` was made)."""
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = digits_data()
    model = build_digits_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    shipped = build_digits_model()  # the weights alone: no optimizer state in the file
    shipped.set_weights(model.get_weights())
    shipped.save(path)
    return shipped, accuracy


def load_digits_model():
    """The bundled classifier, loaded with Keras's `safe_mode`."""
    import keras

    return keras.saving.load_model(MODEL_PATH, safe_mode=True)


@dataclass
class DemoResult:
    out_dir: Path
    backend: str
    batch: int
    jacobian_shape: tuple
    accuracy: float
    first_call_s: float
    steady_call_ms: float
    check: object
    plan: str
    figure: Path
    array: Path
    predictions: list = field(default_factory=list)


def run_demo(
    out_dir: str | Path = "jacket-demo", *, batch: int = 32, repeats: int = 5
) -> DemoResult:
    """Per-sample Jacobians of the bundled classifier on `batch` test digits.

    Writes `jacobians.npy` (`(batch, 10, 8, 8, 1)`) and `jacobian_rows.png` (each class's row of
    `J` drawn as an 8x8 image, for the first few samples) to `out_dir`.
    """
    import keras

    from .engine import check, jacobian_fn
    from .plot import jacobian_rows_figure
    from .trees import to_numpy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_digits_model()
    _, _, x_test, y_test = digits_data()
    x = x_test[:batch]
    logits = to_numpy(model(x_test, training=False))
    accuracy = float((logits.argmax(axis=1) == y_test).mean())

    jac = jacobian_fn(model)
    start = time.perf_counter()
    J = to_numpy(jac(x))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        to_numpy(jac(x))
        times.append(time.perf_counter() - start)
    report = check(model, x[:4])

    array_path = out_dir / "jacobians.npy"
    np.save(array_path, J)
    figure_path = out_dir / "jacobian_rows.png"
    shown = min(4, batch)
    figure = jacobian_rows_figure(
        J[:shown],
        images=x[:shown],
        row_labels=[f"d logit {c}" for c in range(10)],
        sample_labels=[f"digit {y_test[b]} (pred {logits[b].argmax()})" for b in range(shown)],
    )
    figure.savefig(figure_path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return DemoResult(
        out_dir=out_dir,
        backend=keras.backend.backend(),
        batch=batch,
        jacobian_shape=tuple(J.shape),
        accuracy=accuracy,
        first_call_s=first,
        steady_call_ms=float(np.median(times) * 1e3),
        check=report,
        plan=jac.plan(x).describe(),
        figure=figure_path,
        array=array_path,
        predictions=[int(p) for p in logits[:batch].argmax(axis=1)],
    )
