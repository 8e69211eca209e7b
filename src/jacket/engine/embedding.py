"""Integer model inputs (token ids): the error for a Jacobian with respect to them, and the
Embedding layer it points to (`wrt=`)."""

from __future__ import annotations

import keras

from ..errors import JacketTypeError


def integer_input_error(
    fn_name: str, model, name: str, label: str, declared: str, dtype: str
) -> JacketTypeError:
    """The error for a Jacobian asked with respect to an integer model input."""
    embedding = embedding_layer_name(model)
    hint = f"wrt={embedding!r}" if embedding else "wrt='<embedding layer>'"
    return JacketTypeError(
        f"{fn_name}: model input {name!r} (`{label}`) is declared {declared}: a Jacobian with "
        "respect to integer ids (an Embedding's input, say) does not exist. Received: "
        f"{label}.dtype={dtype}. Differentiate with respect to the embedding output instead: "
        f"pass {hint}."
    )


def embedding_layer_name(model) -> str | None:
    """The name of the first Embedding layer of a model (nested ones as 'model/layer'), or None."""
    if not isinstance(model, keras.Model):
        return None

    def search(layer, prefix):
        for sub in getattr(layer, "layers", []):
            if isinstance(sub, keras.layers.Embedding):
                return prefix + sub.name
            if isinstance(sub, keras.Model):
                found = search(sub, f"{prefix}{sub.name}/")
                if found:
                    return found
        return None

    try:
        return search(model, "")
    except (AttributeError, TypeError):  # pragma: no cover - a model whose layers cannot be read
        return None
