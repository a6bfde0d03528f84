"""KerasLayer: `hub.KerasLayer`'s arguments and meaning, as a layer of whichever Keras TensorFlow uses.

`tensorflow_hub.KerasLayer` subclasses tf_keras's Layer, so under Keras 3 (TensorFlow's default since 2.16)
`keras.Sequential([hub.KerasLayer(...)])` fails with "Only instances of keras.Layer can be added to a
Sequential model". Here the class is built for the Keras in use: Keras 3 by default, tf_keras when
`TF_USE_LEGACY_KERAS=1` (the same switch TensorFlow reads). The SavedModel's own tf.Variables become the
layer's weights (no copies), so fine-tuning changes the loaded object and it can be re-exported.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

_CLASSES: dict[str, type] = {}


def legacy_keras_requested() -> bool:
    return os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes")


def keras_layer_class() -> type:
    flavour = "tf_keras" if legacy_keras_requested() else "keras"
    if flavour not in _CLASSES:
        _CLASSES[flavour] = _build(legacy=flavour == "tf_keras")
    return _CLASSES[flavour]


class _Model:
    """What both flavours share: load the object, pick the callable, call it with hub.KerasLayer's rules."""

    def __init__(
        self,
        handle: Any,
        tags: Any,
        signature: str | None,
        signature_outputs_as_dict: bool | None,
        output_key: str | None,
        output_shape: Any,
        load_options: Any,
        arguments: dict[str, Any] | None,
    ) -> None:
        from hubd_client.loading import load

        self.handle = handle
        self.obj = load(handle, tags=tags, options=load_options) if isinstance(handle, str) else handle
        self.signature = signature
        self.outputs_as_dict = signature_outputs_as_dict
        self.output_key = output_key
        self.output_shape = output_shape
        self.arguments = dict(arguments or {})
        if signature and (output_key is not None) == bool(signature_outputs_as_dict):
            raise ValueError(
                "When using a signature, either output_key or signature_outputs_as_dict=True should be set."
            )
        if not signature and signature_outputs_as_dict:
            raise ValueError("signature_outputs_as_dict is only valid if specifying a signature.")
        self.callable = self._pick_callable()
        self.has_training_argument = _accepts_training(self.callable)

    def _pick_callable(self) -> Any:
        signatures = getattr(self.obj, "signatures", {})
        if self.signature:
            if self.signature not in signatures:
                raise ValueError(
                    f"the SavedModel has no signature {self.signature!r}; it has {sorted(signatures.keys())}"
                )
            return signatures[self.signature]
        if not callable(self.obj):
            raise ValueError(
                f"the SavedModel {self.handle!r} is not callable; "
                f"pass signature= one of {sorted(signatures.keys())}"
            )
        return self.obj.__call__

    def variables(self) -> list[tuple[Any, bool]]:
        """(tf.Variable, trainable) pairs, as a Reusable SavedModel declares them: trainable ones first."""
        source = self.obj if hasattr(self.obj, "variables") else self.callable
        trainable = list(getattr(source, "trainable_variables", []))
        seen = {id(v) for v in trainable}
        others = [v for v in getattr(source, "variables", []) if id(v) not in seen]
        return [(v, True) for v in trainable] + [(v, False) for v in others]

    def regularization_losses(self) -> list[Any]:
        losses = list(getattr(self.obj, "regularization_losses", []))
        for loss in losses:
            if not callable(loss):
                raise ValueError("obj.regularization_losses must be callables returning a scalar loss term")
        return losses

    def call(self, inputs: Any, training: Any) -> Any:
        import tensorflow as tf

        args: list[Any] = []
        kwargs = dict(self.arguments)
        if self.signature and isinstance(inputs, dict):
            kwargs.update(inputs)
        elif self.signature:
            names = list(self.callable.structured_input_signature[1].keys())
            if len(names) != 1:
                raise ValueError(f"signature {self.signature!r} takes {names}: pass a dict of those inputs")
            kwargs[names[0]] = inputs
        else:
            args.append(inputs)
        f = functools.partial(self.callable, *args, **kwargs)
        if not self.has_training_argument:
            result = f()
        elif isinstance(training, bool) or training is None:
            result = f(training=bool(training))
        else:
            result = tf.cond(tf.cast(training, tf.bool), lambda: f(training=True), lambda: f(training=False))
        if self.output_key is not None:
            if not isinstance(result, dict):
                raise ValueError(f"output_key is set but the model returned {type(result).__name__}, not a dict")
            if self.output_key not in result:
                raise ValueError(f"output key {self.output_key!r} not among {sorted(result)}")
            result = result[self.output_key]
        if self.output_shape:
            result = _with_static_shape(result, self.output_shape)
        return result

    def config(self) -> dict[str, Any]:
        if not isinstance(self.handle, str):
            raise NotImplementedError(
                "a KerasLayer built from a loaded object cannot be serialized; build it from a handle instead"
            )
        config: dict[str, Any] = {"handle": self.handle}
        if self.signature:
            config["signature"] = self.signature
        if self.outputs_as_dict:
            config["signature_outputs_as_dict"] = True
        if self.output_key is not None:
            config["output_key"] = self.output_key
        if self.output_shape:
            config["output_shape"] = self.output_shape
        if self.arguments:
            config["arguments"] = self.arguments
        return config


def _accepts_training(fn: Any) -> bool:
    spec = getattr(fn, "function_spec", None)
    if spec is not None:
        full = spec.fullargspec
        return "training" in (full.args or []) or "training" in (full.kwonlyargs or [])
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _is_string_dtype(dtype: Any) -> bool:
    return dtype is not None and str(getattr(dtype, "name", dtype)) == "string"


def _with_static_shape(result: Any, output_shape: Any) -> Any:
    import tensorflow as tf

    def apply(tensor: Any, shape: Any) -> Any:
        tensor.set_shape(tf.TensorShape([None, *list(shape)]))
        return tensor

    if isinstance(result, dict) and isinstance(output_shape, dict):
        return {k: apply(v, output_shape[k]) if k in output_shape else v for k, v in result.items()}
    return apply(result, output_shape)


def _build(legacy: bool) -> type:
    """The layer class for Keras 3 (`legacy=False`) or tf_keras: the same code, two ways to adopt weights."""
    if legacy:
        import tf_keras as keras_module

        register = keras_module.utils.register_keras_serializable
    else:
        import keras as keras_module

        register = keras_module.saving.register_keras_serializable

    @register(package="hubd_client", name="KerasLayer")
    class KerasLayer(keras_module.layers.Layer):  # type: ignore[misc]
        """hub.KerasLayer, with tensorflow_hub's arguments and their meaning."""

        def __init__(
            self,
            handle: Any,
            trainable: bool = False,
            arguments: dict[str, Any] | None = None,
            _sentinel: Any = None,
            tags: Any = None,
            signature: str | None = None,
            signature_outputs_as_dict: bool | None = None,
            output_key: str | None = None,
            output_shape: Any = None,
            load_options: Any = None,
            **kwargs: Any,
        ) -> None:
            model = _Model(
                handle,
                tags,
                signature,
                signature_outputs_as_dict,
                output_key,
                output_shape,
                load_options,
                arguments,
            )
            if not legacy and _is_string_dtype(kwargs.get("dtype")):
                # TF Hub's text recipe: KerasLayer(url, input_shape=[], dtype=tf.string). Keras 3's Sequential
                # turns input_shape into a float32 Input and would cast the sentences; without it, Sequential
                # builds its Input from the first layer's dtype (string) and the data's shape.
                kwargs.pop("input_shape", None)
            super().__init__(trainable=trainable, **kwargs)
            self._hub = model
            for variable, is_trainable in model.variables():
                self._adopt(variable, is_trainable)
            self._regularization = model.regularization_losses()
            if legacy:  # tf_keras takes loss callables and evaluates them itself
                for loss in self._regularization:
                    self.add_loss(lambda _loss=loss: _loss() if self.trainable else 0.0)
            else:
                self.built = True

        def _adopt(self, variable: Any, trainable: bool) -> None:
            """Make the SavedModel's own tf.Variable a weight of this layer: no copy, so training updates it."""
            if legacy:
                self.add_weight(
                    name=variable.name,
                    shape=variable.shape,
                    dtype=variable.dtype,
                    trainable=trainable,
                    experimental_autocast=False,
                    getter=lambda *_, _v=variable, **__: _v,  # registers the existing variable, creates none
                )
            else:
                name = variable.name.split(":")[0].replace("/", "_")
                wrapped = keras_module.Variable(
                    initializer=variable, trainable=trainable, dtype=variable.dtype, name=name
                )
                self._track_variable(wrapped)

        def call(self, inputs: Any, training: Any = None) -> Any:
            if legacy and self.trainable and training is None:
                training = keras_module.backend.learning_phase()
            result = self._hub.call(inputs, training if self.trainable else False)
            if not legacy and self.trainable:  # Keras 3 collects losses added during the call
                for loss in self._regularization:
                    self.add_loss(loss())
            return result

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), **self._hub.config()}

    return KerasLayer
