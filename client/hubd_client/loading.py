"""`load`: a SavedModel through hubd, as tensorflow_hub 0.16.1 loads it (`hubd_client.load`, `KerasLayer`).

Kept out of the package's `__init__` so that `keras_layer` can use it without importing the package back.
"""

from __future__ import annotations

import os
from typing import Any

from hubd_client.resolver import resolve


def load(handle: str, tags: Any = None, options: Any = None) -> Any:
    """`tensorflow_hub.load`: resolve the handle through hubd, then `tf.saved_model.load` the directory.

    Same checks and errors as tensorflow_hub 0.16.1: a non-string handle and a directory without a SavedModel
    raise ValueError; a legacy TF1 Hub module loads with the empty tag set; the result has `_is_hub_module_v1`.
    """
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string, got {handle}")
    import tensorflow as tf

    module_path = resolve(handle)
    is_hub_module_v1 = tf.io.gfile.exists(os.path.join(module_path, "tfhub_module.pb"))
    if tags is None and is_hub_module_v1:
        tags = []
    names = (tf.saved_model.SAVED_MODEL_FILENAME_PB, tf.saved_model.SAVED_MODEL_FILENAME_PBTXT)
    if not any(tf.io.gfile.exists(os.path.join(module_path, name)) for name in names):
        raise ValueError(
            "Trying to load a model of incompatible/unknown type. "
            f"'{module_path}' contains neither '{names[0]}' nor '{names[1]}'."
        )
    if options:
        obj = tf.compat.v1.saved_model.load_v2(module_path, tags=tags, options=options)
    else:
        obj = tf.compat.v1.saved_model.load_v2(module_path, tags=tags)
    obj._is_hub_module_v1 = is_hub_module_v1
    return obj
