"""The figures of the documentation that jacket draws itself: `make figures` (or
`python docs/figures.py`) writes them into docs/, on the active Keras backend.

- `attribution-maps.png` (docs/attribution.md): saliency, Grad-CAM, integrated gradients and
  SmoothGrad on four test digits of the bundled digits classifier, one row per method, each map
  over its digit, titled with the class attributed (the model's prediction).

`tests/test_attribution.py` runs `attribution_maps` into a temporary folder, so the script cannot
rot; the PNG in docs/ is its output, committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def attribution_maps(path: Path, samples: int = 4) -> Path:
    """One map per method (rows) over `samples` test digits (columns), written to `path`."""
    import numpy as np

    from jacket import analysis, demo, plot

    model = demo.load_digits_model()
    _, _, x_test, _ = demo.digits_data()
    x = x_test[:samples]
    ig = analysis.integrated_gradients(model, x, steps=50)
    maps = {
        "saliency": analysis.saliency(model, x).map,
        "Grad-CAM": analysis.gradcam(model, x).map,
        "integrated gradients": ig.map,
        "SmoothGrad": analysis.smoothgrad(model, x, n=50, sigma=0.15).map,
    }
    images = np.concatenate([x] * len(maps))
    labels = [f"{name}: {int(t)}" for name in maps for t in ig.target]
    figure = plot.attribution_figure(
        images, np.concatenate(list(maps.values())), labels=labels, columns=samples
    )
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main() -> int:
    print(attribution_maps(HERE / "attribution-maps.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
