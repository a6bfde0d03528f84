"""hubd_client: TF Hub / Kaggle models through the machine's hubd daemon, as a drop-in for tensorflow_hub.

    import hubd_client as hub
    layer = hub.KerasLayer("https://tfhub.dev/google/nnlm-en-dim50/2")

Importing this package loads the standard library only; TensorFlow and Keras are imported when a model is
loaded.
"""

from __future__ import annotations

from hubd_client.errors import DaemonUnavailable, HubdClientError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing alone costs a process ~10 ms
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["DaemonUnavailable", "HubdClientError", "KerasLayer", "install_tfhub", "load", "resolve"]


def resolve(handle: str) -> str:
    """`tensorflow_hub.resolve`: the local directory of `handle`, from the daemon (or the cache when none runs).

    The resolver, its HTTP transport and the handle parser are imported on the first call, so that
    `import hubd_client` stays cheap (bench/bench_import.py).
    """
    from hubd_client.resolver import resolve as resolve_handle

    return resolve_handle(handle)


def install_tfhub() -> None:
    """Register hubd with tensorflow_hub (imports it). Safe to call more than once."""
    from hubd_client.tfhub_plugin import install_tfhub as install

    install()


def load(handle: str, tags: Any = None, options: Any = None) -> Any:
    """`tensorflow_hub.load`: resolve the handle through hubd, then `tf.saved_model.load` the directory.

    Same checks and errors as tensorflow_hub 0.16.1: a non-string handle and a directory without a SavedModel
    raise ValueError; a legacy TF1 Hub module loads with the empty tag set; the result has `_is_hub_module_v1`.
    """
    from hubd_client.loading import load as load_saved_model  # TensorFlow is imported on the first load

    return load_saved_model(handle, tags, options)


def __getattr__(name: str) -> Any:
    if name == "KerasLayer":  # built on first use, for Keras 3 or tf_keras (TF_USE_LEGACY_KERAS=1)
        from hubd_client.keras_layer import keras_layer_class

        return keras_layer_class()
    raise AttributeError(f"module 'hubd_client' has no attribute {name!r}")
