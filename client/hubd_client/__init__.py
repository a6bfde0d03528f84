"""hubd_client: TF Hub / Kaggle models through the machine's hubd daemon, as a drop-in for tensorflow_hub.

    import hubd_client as hub
    layer = hub.KerasLayer("https://tfhub.dev/google/nnlm-en-dim50/2")

Importing this package loads the standard library only; TensorFlow and Keras are imported when a model is
loaded.
"""

from __future__ import annotations

from typing import Any

from hubd_client.errors import DaemonUnavailable, HubdClientError
from hubd_client.resolver import resolve
from hubd_client.tfhub_plugin import install_tfhub

__version__ = "0.1.0"
__all__ = ["DaemonUnavailable", "HubdClientError", "KerasLayer", "install_tfhub", "load", "resolve"]


def load(handle: str, tags: Any = None, options: Any = None) -> Any:
    """`tf.saved_model.load` of the model's path, like `tensorflow_hub.load`."""
    from hubd_client.loading import load as _load

    return _load(handle, tags=tags, options=options)


def __getattr__(name: str) -> Any:
    if name == "KerasLayer":  # built on first use, for Keras 3 or tf_keras (TF_USE_LEGACY_KERAS=1)
        from hubd_client.keras_layer import keras_layer_class

        return keras_layer_class()
    raise AttributeError(f"module 'hubd_client' has no attribute {name!r}")
