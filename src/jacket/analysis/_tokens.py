"""Token attribution for text models: a score per token, from the gradient at the embeddings the
token ids produce (`wrt` the Embedding layer), since the ids themselves have no derivative."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_model, choice
from ..engine import vjp
from ..engine.embedding import embedding_layer_name
from ..errors import JacketValueError
from ..trees import to_numpy
from ._attribution import integrated_gradients
from ._batched import _budget, _one_hot, _point, _single, _targets
from .maps import METHODS

TOKEN_METHODS = ("integrated_gradients", "gradient_x_input")


@dataclass
class TokenAttribution:
    """A score per token (see `token_attribution`).

    Attributes:
      scores: `(batch, seq)`: each token's attribution, summed over its embedding.
      attributions: `(batch, seq, dim)`: per embedding value.
      target: `(batch,)` the flat output index attributed.
      method: "integrated_gradients" or "gradient_x_input".
      layer: the embedding layer's name.
      delta: `(batch,)` with integrated gradients, the completeness error
        `sum(scores) - (f(x) - f(x'))`; None for gradient x input.
    """

    scores: np.ndarray
    attributions: np.ndarray
    target: np.ndarray
    method: str
    layer: str
    delta: np.ndarray | None = None


def token_attribution(
    model,
    x,
    *,
    layer=None,
    method: str = "integrated_gradients",
    target=None,
    baseline=None,
    steps: int = 50,
    quadrature: str = "riemann_trapezoid",
    of=None,
    memory_budget: int | str | None = None,
    training: bool = False,
) -> TokenAttribution:
    """Per-token scores of a text model: the attributions at the embeddings the ids produce
    (`wrt=layer`), summed over each token's embedding.

    - "integrated_gradients": integrated gradients over the embeddings (from `baseline`'s, by
      default zero embeddings), so that the scores sum to `f(x) - f(baseline)` (up to the
      quadrature's error, `delta`); batched as `jacket.analysis.integrated_gradients`.
    - "gradient_x_input": the gradient at the embeddings times the embeddings (one VJP).

    Args:
      model: A Functional or Sequential model taking integer token ids (and other inputs, such
        as a padding mask, held constant), with one output (or `of` naming one tensor).
      x: The ids `(batch, seq)`, or the structure of the model's inputs.
      layer: The embedding layer (name, path or object); default the model's first Embedding.
      method: "integrated_gradients" or "gradient_x_input".
      target: As in `jacket.analysis.integrated_gradients`.
      baseline: With integrated gradients, inputs shaped like `x` whose embeddings are the
        baseline (all padding ids, say); default zero embeddings.
      steps, quadrature: The integrated gradients' quadrature (`method` there).
      of, memory_budget, training: As in `jacket.analysis.integrated_gradients`.

    Returns:
      A `TokenAttribution` (`scores` `(batch, seq)`, `attributions`, `target`, `delta`).

    Example:
      >>> t = jacket.analysis.token_attribution(classifier, ids)      # ids: (4, 12) int32
      >>> t.scores.shape, abs(t.delta).max() < 0.01
      ((4, 12), True)
    """
    fn = "token_attribution"
    check_model(fn, model)
    choice(fn, "method", method, TOKEN_METHODS)
    choice(fn, "quadrature", quadrature, METHODS)
    if layer is None:
        layer = embedding_layer_name(model)
        if layer is None:
            raise JacketValueError(
                f"{fn}: the model has no Embedding layer to take by default. Received: "
                "layer=None. Pass `layer=` naming the layer that embeds the tokens."
            )
    name = getattr(layer, "name", str(layer))
    if method == "integrated_gradients":
        ig = integrated_gradients(
            model, x, baseline=baseline, steps=steps, target=target, method=quadrature,
            wrt=layer, of=of, memory_budget=memory_budget, training=training,
        )  # fmt: skip
        attributions, index, delta = ig.attributions, ig.target, ig.delta
    else:
        _budget(fn, memory_budget)
        point = _point(fn, model, x, layer, of, training, arg="layer", outputs=True)
        y = _single(fn, point.outputs)
        index = _targets(fn, point, target, y)
        gradient = to_numpy(vjp(model, point, _one_hot(y, index), training=training))
        attributions = gradient * to_numpy(point.wrt)
        delta = None
    if attributions.ndim < 2:
        raise JacketValueError(
            f"{fn}: the layer's output must be `(batch, seq, ...)`. Received: layer {name!r} "
            f"with values of shape {attributions.shape}. Name the layer that embeds the tokens."
        )
    B, seq = attributions.shape[:2]
    scores = attributions.reshape(B, seq, -1).sum(axis=-1)
    return TokenAttribution(scores, attributions, index, method, name, delta)
