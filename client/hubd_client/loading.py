"""load(handle): `tf.saved_model.load` of the resolved path (TensorFlow is imported here, not before)."""

from __future__ import annotations

from typing import Any

from hubd_client.resolver import resolve


def load(handle: str, tags: Any = None, options: Any = None) -> Any:
    import tensorflow as tf

    path = resolve(handle)
    if options is not None:
        return tf.saved_model.load(path, tags=tags, options=options)
    return tf.saved_model.load(path, tags=tags)
