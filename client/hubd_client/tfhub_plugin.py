"""Make an unmodified `tensorflow_hub` resolve remote handles through hubd.

`install_tfhub()` registers a resolver with tensorflow_hub's registry (the last registered is tried first), so
`hub.resolve`, `hub.load` and `hub.KerasLayer` on http(s) handles get the daemon's shared, verified path.
Under Keras 3 (no TF_USE_LEGACY_KERAS) it also puts hubd's KerasLayer in place of tensorflow_hub's, whose
tf_keras layer no Keras 3 model accepts; under tf_keras, tensorflow_hub's own layer stays (it works there).
With `HUBD_TFHUB=1` in the environment this happens by itself when tensorflow_hub is imported: the
`hubd_client.pth` file installed beside the package (by `pip install ./client`, editable or not) adds an
import hook, and nothing else, at start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_installed = False


class HubdResolver:
    """A tensorflow_hub resolver implementation: `is_supported(handle)` and `__call__(handle)`."""

    def is_supported(self, handle: Any) -> bool:
        return isinstance(handle, str) and handle.startswith(("https://", "http://"))

    def __call__(self, handle: str) -> str:
        from hubd_client.resolver import resolve

        return resolve(handle)


def install_tfhub() -> None:
    """Register hubd with tensorflow_hub (imports it). Safe to call more than once."""
    global _installed
    if _installed:
        return
    import tensorflow_hub
    from tensorflow_hub import registry

    from hubd_client.keras_layer import keras_layer_class, legacy_keras_requested

    registry.resolver.add_implementation(HubdResolver())
    if not legacy_keras_requested():
        tensorflow_hub.KerasLayer = keras_layer_class()
    _installed = True


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs install_tfhub() right after `import tensorflow_hub` finishes, without importing it earlier."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow_hub":
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec without coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        original = spec.loader

        class _Wrapped(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return original.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                original.exec_module(module)
                install_tfhub()

        spec.loader = _Wrapped()
        return spec


def install_on_import_if_requested() -> None:
    """Called from hubd_client.pth at interpreter start: cheap unless HUBD_TFHUB=1."""
    if os.environ.get("HUBD_TFHUB", "").lower() not in ("1", "true", "yes"):
        return
    if "tensorflow_hub" in sys.modules:
        install_tfhub()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
