"""KerasLayer: `tensorflow_hub.KerasLayer` (0.16.1), as a layer of whichever Keras TensorFlow uses.

`tensorflow_hub.KerasLayer` subclasses tf_keras's Layer, so under Keras 3 (TensorFlow's default since 2.16)
`keras.Sequential([hub.KerasLayer(...)])` fails with "Only instances of keras.Layer can be added to a
Sequential model". Here the class is built for the Keras in use: Keras 3 by default, tf_keras when
`TF_USE_LEGACY_KERAS=1` (the same switch TensorFlow reads). Under tf_keras it follows tensorflow_hub's code
line for line (attribute names, errors, logging, shapes); under Keras 3 it also takes what Keras 3 would refuse
or mis-type on its own: Python lists as inputs, and models whose input is not float (the SavedModel's traced
input signature gives the layer's input dtype, so `Sequential([embed, ...])` builds with a string input).
The SavedModel's own tf.Variables become the layer's weights (no copies), so fine-tuning changes the loaded
object and it can be re-exported. the README lists every difference from tensorflow_hub.
"""

from __future__ import annotations

import functools
import json
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


def load_module(handle: Any, tags: Any = None, load_options: Any = None) -> Any:
    """tensorflow_hub.keras_layer.load_module: a callable handle as it is, else `hubd_client.load(handle)`."""
    if callable(handle):
        if tags is not None:
            raise ValueError("Passing a callable handle is mutually exclusive with setting tags.")
        if load_options is not None:
            raise ValueError("Passing a callable handle is mutually exclusive with setting load_options.")
        return handle
    from hubd_client.loading import load

    return load(handle, tags=tags, options=load_options)


def func_has_training_argument(func: Any) -> bool:
    """Whether the SavedModel's callable takes a `training` argument (tensorflow_hub's test, same result)."""
    if not callable(func):
        return False
    from tensorflow.python.util import tf_inspect

    spec = tf_inspect.getfullargspec(func.__call__)
    return "training" in spec.args or "training" in spec.kwonlyargs


def input_tensor_spec(func: Any, signature: str | None) -> Any:
    """The tf.TensorSpec of the single input the callable was traced for, or None if that is not one spec.

    A restored tf.function knows its traces (`concrete_functions`); a live one may have an `input_signature`;
    a signature is a ConcreteFunction taking keyword tensors.
    """
    import tensorflow as tf

    if signature:
        specs = list(func.structured_input_signature[1].values())
    elif getattr(func, "input_signature", None):
        specs = [func.input_signature[0]]
    else:
        call = func.__call__ if callable(func) else None
        traces = getattr(call, "concrete_functions", None) or getattr(func, "concrete_functions", None) or []
        specs = [c.structured_input_signature[0][0] for c in traces if c.structured_input_signature[0]]
    dtypes = {s.dtype for s in specs if isinstance(s, tf.TensorSpec)}
    if len(specs) == 0 or len(dtypes) != 1 or not all(isinstance(s, tf.TensorSpec) for s in specs):
        return None
    return specs[0]


def _is_floating(dtype: Any) -> bool:
    """Whether a layer `dtype` argument (None, a name, a tf.DType, a policy or its config) computes in floats."""
    import tensorflow as tf

    if isinstance(dtype, dict):  # a serialized DTypePolicy
        dtype = dtype.get("config", {}).get("name")
    name = str(getattr(dtype, "name", dtype) or "float32")
    try:
        return bool(tf.as_dtype(name.removeprefix("mixed_")).is_floating)
    except TypeError:
        return True


def _convert_nest_to_shapes(x: Any) -> Any:
    """In a nest, converts raw tuples/lists of int or None to tf.TensorShape (as tensorflow_hub does)."""
    import tensorflow as tf

    if isinstance(x, dict):
        return type(x)([(k, _convert_nest_to_shapes(v)) for k, v in x.items()])
    try:
        return tf.TensorShape(x)
    except TypeError:
        pass  # a container, then
    if isinstance(x, list | tuple):
        return type(x)([_convert_nest_to_shapes(v) for v in x])
    raise TypeError(f"Cannot convert to nest of TensorShapes, found none of TensorShape, dict, list, tuple: {x!r}")


def _convert_nest_from_shapes(x: Any) -> Any:
    import tensorflow as tf

    return tf.nest.map_structure(lambda s: tuple(s.as_list()), x)


def _build(legacy: bool) -> type:
    """The layer class for Keras 3 (`legacy=False`) or tf_keras: one body, with the few places they differ."""
    import tensorflow as tf

    if legacy:
        import tf_keras as keras_module

        register = keras_module.utils.register_keras_serializable
        from tensorflow.python.trackable import data_structures

        no_dependency: Any = data_structures.NoDependency
    else:
        import keras as keras_module

        register = keras_module.saving.register_keras_serializable

        def no_dependency(value: Any) -> Any:
            return value

    @register(package="hubd_client", name="KerasLayer")
    class KerasLayer(keras_module.layers.Layer):  # type: ignore[misc]
        """Wraps a SavedModel (or a callable object) as a Keras layer, with tensorflow_hub's arguments."""

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
            func = load_module(handle, tags, load_options)
            is_hub_module_v1 = getattr(func, "_is_hub_module_v1", False)
            if is_hub_module_v1:
                signature = signature or "default"
                if not signature_outputs_as_dict:
                    output_key = output_key or "default"
            if signature and (bool(output_key is not None) == bool(signature_outputs_as_dict)):
                raise ValueError(
                    "When using a signature, either output_key or signature_outputs_as_dict=True should be set."
                )
            if not signature and signature_outputs_as_dict:
                raise ValueError(
                    "signature_outputs_as_dict is only valid if specifying a signature "
                    "(or using a legacy TF1 Hub format)."
                )
            callable_ = _get_callable(func, handle, signature)
            spec = None if legacy else input_tensor_spec(callable_, signature)
            if spec is not None and "dtype" not in kwargs and not spec.dtype.is_floating:
                kwargs["dtype"] = spec.dtype.name  # Keras 3 would feed it float32 (Sequential, autocast)
            if not legacy and not _is_floating(kwargs.get("dtype")):
                # TF Hub's text recipe: KerasLayer(url, input_shape=[], dtype=tf.string). Keras 3's Sequential
                # turns input_shape into a float32 Input; without it, Sequential builds its Input from the
                # first layer's dtype and the data's shape.
                kwargs.pop("input_shape", None)
            super().__init__(trainable=trainable, **kwargs)
            self._handle = handle
            self._arguments = no_dependency(arguments or {})
            self._signature = signature
            self._signature_outputs_as_dict = signature_outputs_as_dict
            self._output_key = output_key
            if output_shape:
                self._output_shape = no_dependency(_convert_nest_to_shapes(output_shape))
            self._load_options = load_options
            self._func = func
            self._is_hub_module_v1 = is_hub_module_v1
            self._callable = callable_
            self._has_training_argument = func_has_training_argument(callable_)
            self._input_spec_of_func = spec
            self._regularization_losses: list[Any] = []
            self._setup_weights()

        def _setup_weights(self) -> None:
            trainable_ids: set[int] = set()
            for v in getattr(self._func, "trainable_variables", []):
                self._add_existing_weight(v, trainable=True)
                trainable_ids.add(id(v))
            for v in getattr(self._func, "variables", []):
                if id(v) not in trainable_ids:
                    self._add_existing_weight(v, trainable=False)
            for loss in getattr(self._func, "regularization_losses", []):
                if not callable(loss):
                    raise ValueError(
                        "hub.KerasLayer(obj) expects obj.regularization_losses to be an "
                        "iterable of callables, each returning a scalar loss term."
                    )
                if legacy:
                    self.add_loss(self._call_loss_if_trainable(loss))  # tf_keras evaluates callables itself
                else:
                    self._regularization_losses.append(loss)
            if not legacy:
                self.built = True

        def _add_existing_weight(self, weight: Any, trainable: bool) -> None:
            """Registers the SavedModel's own tf.Variable as a weight: no copy, so training updates it."""
            if legacy:
                self.add_weight(
                    name=weight.name,
                    shape=weight.shape,
                    dtype=weight.dtype,
                    trainable=trainable,
                    experimental_autocast=False,
                    getter=lambda *_, **__: weight,
                )
            else:
                name = weight.name.split(":")[0].replace("/", "_")
                wrapped = keras_module.Variable(
                    initializer=weight, trainable=trainable, dtype=weight.dtype, name=name
                )
                self._track_variable(wrapped)

        def _call_loss_if_trainable(self, loss: Any) -> Any:
            return lambda: loss() if self.trainable else 0.0

        if not legacy:

            def _get_own_losses(self) -> list[Any]:  # Keras 3: `losses` and training read this
                own: list[Any] = super()._get_own_losses()
                # as tensorflow_hub's callables under tf_keras: the loss while trainable, else 0.0
                own.extend(loss() if self.trainable else tf.constant(0.0) for loss in self._regularization_losses)
                return own

            def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                # Keras 3 refuses Python lists (and other non-tensors) as positional inputs
                return super().__call__(self._to_tensors(inputs), *args, **kwargs)

        def _to_tensors(self, inputs: Any) -> Any:
            """Python lists, scalars and NumPy arrays become tensors of the dtype the SavedModel takes."""
            if isinstance(inputs, dict):
                return {k: self._to_tensors(v) for k, v in inputs.items()}
            if any(tf.is_tensor(x) or isinstance(x, keras_module.KerasTensor) for x in tf.nest.flatten(inputs)):
                return inputs
            spec = self._input_spec_of_func
            tensor = tf.convert_to_tensor(inputs)
            if (
                spec is not None
                and tensor.dtype != spec.dtype
                and tensor.dtype.is_floating == spec.dtype.is_floating
            ):
                tensor = tf.cast(tensor, spec.dtype)
            return tensor

        def call(self, inputs: Any, training: Any = None) -> Any:
            self._check_trainability()
            args: list[Any] = []
            kwargs = dict(self._arguments)
            if self._signature and isinstance(inputs, dict):
                kwargs.update(inputs)
            elif self._signature and not legacy:
                # Keras 3 cannot pass a dict through Sequential; a one-input signature takes the tensor itself
                names = list(self._callable.structured_input_signature[1].keys())
                if len(names) != 1:
                    raise ValueError(f"signature {self._signature!r} takes {names}: pass a dict of those inputs")
                kwargs[names[0]] = self._cast_to_spec(inputs)
            else:
                args.append(inputs if legacy else self._cast_to_spec(inputs))
            f = functools.partial(self._callable, *args, **kwargs)
            if not self._has_training_argument:
                result = f()
            else:
                if self.trainable:
                    if training is None:
                        training = keras_module.backend.learning_phase() if legacy else False
                else:
                    training = False
                if isinstance(training, bool):
                    result = f(training=training)
                else:
                    result = tf.cond(
                        tf.cast(training, tf.bool), lambda: f(training=True), lambda: f(training=False)
                    )
            if self._output_key:
                if not isinstance(result, dict):
                    raise ValueError(
                        f"Specifying `output_key` is forbidden if output type {type(result)} is not a dict."
                    )
                if self._output_key not in result:
                    raise ValueError(
                        f"KerasLayer output does not contain the output key {self._output_key} "
                        f"(available: {result.keys()})."
                    )
                result = result[self._output_key]
            return self._apply_output_shape_if_set(inputs, result)

        def _cast_to_spec(self, inputs: Any) -> Any:
            """Keras 3 casts inputs to the layer's dtype; give the SavedModel the dtype it was traced for."""
            spec = self._input_spec_of_func
            if spec is None or not tf.is_tensor(inputs) or inputs.dtype == spec.dtype:
                return inputs
            if inputs.dtype == tf.string or spec.dtype == tf.string:
                return inputs  # no cast between strings and numbers: let the function's own error speak
            return tf.cast(inputs, spec.dtype)

        def _check_trainability(self) -> None:
            """Raises or logs errors for unsupported uses of trainable=True (tensorflow_hub's rules)."""
            if not self.trainable:
                return
            if self._is_hub_module_v1:
                raise ValueError(
                    "Setting hub.KerasLayer.trainable = True is unsupported when loading from the TF1 Hub format."
                )
            if self._signature:
                raise ValueError(
                    "Setting hub.KerasLayer.trainable = True is unsupported when calling a SavedModel signature."
                )
            if not self.trainable_weights and not hasattr(self, "_already_logged_trainable_with_zero_weights"):
                from absl import logging

                logging.error("hub.KerasLayer is trainable but has zero trainable weights.")
                self._already_logged_trainable_with_zero_weights = True

        def _apply_output_shape_if_set(self, inputs: Any, outputs: Any) -> Any:
            if not hasattr(self, "_output_shape"):
                return outputs
            batch_size = tf.nest.flatten(inputs)[0].shape[0]

            def inplace_set_shape(tensor: Any, shape: Any) -> None:
                tensor.set_shape(tf.TensorShape(batch_size).concatenate(shape))

            tf.nest.map_structure(inplace_set_shape, outputs, self._output_shape)
            return outputs

        def get_config(self) -> dict[str, Any]:
            config: dict[str, Any] = super().get_config()
            if not isinstance(self._handle, str):
                raise NotImplementedError(
                    "Can only generate a valid config for `hub.KerasLayer(handle, ...)`"
                    "that uses a string `handle`.\n\n"
                    f"Got `type(handle)`: {type(self._handle)}"
                )
            config["handle"] = self._handle
            if hasattr(self, "_output_shape"):
                output_shape = _convert_nest_from_shapes(self._output_shape)
                try:
                    json.dumps(output_shape)
                except TypeError as exc:
                    raise ValueError(
                        f"hub.KerasLayer(..., output_shape=) is not json-serializable.\nGot value: {output_shape}"
                    ) from exc
                config["output_shape"] = output_shape
            if self._arguments:
                for key, value in self._arguments.items():
                    try:
                        json.dumps(value)
                    except TypeError as exc:
                        raise ValueError(
                            f"`hub.KerasLayer(..., arguments)` contains non json-serializablevalues in key: {key}"
                        ) from exc
                config["arguments"] = dict(self._arguments)
            if self._signature:
                config["signature"] = self._signature
            if self._output_key:
                config["output_key"] = self._output_key
            if self._signature_outputs_as_dict:
                config["signature_outputs_as_dict"] = self._signature_outputs_as_dict
            return config

        @property
        def resolved_object(self) -> Any:
            """The object `handle` resolved to in `__init__` (e.g. for BERT's `resolved_object.vocab_file`)."""
            return self._func

        if not legacy:

            def compute_output_spec(self, *args: Any, **kwargs: Any) -> Any:
                # Trace `call` symbolically (Operation's way), not from compute_output_shape with the layer's
                # dtype: a string-input model's compute dtype is "string", its outputs are not.
                return super(keras_module.layers.Layer, self).compute_output_spec(*args, **kwargs)

            def compute_output_shape(self, input_shape: Any) -> Any:
                """From `output_shape` if given; else traced with inputs of the dtype the SavedModel takes."""
                if hasattr(self, "_output_shape"):
                    batch_size = tf.nest.flatten(input_shape)[0]
                    return tf.nest.map_structure(
                        lambda s: (batch_size, *s.as_list()), self._output_shape, expand_composites=False
                    )
                spec = self._input_spec_of_func
                dtype = spec.dtype.name if spec is not None else self.input_dtype
                outputs = self.compute_output_spec(keras_module.KerasTensor(tuple(input_shape), dtype=dtype))
                return tf.nest.map_structure(lambda t: tuple(t.shape), outputs)

        if legacy:

            def compute_output_shape(self, input_shape: Any) -> Any:
                """From `output_shape` if given; else traced with inputs of the dtype the SavedModel takes."""
                if hasattr(self, "_output_shape"):
                    batch_size = tf.nest.flatten(input_shape)[0]
                    return tf.TensorShape((batch_size,)).concatenate(self._output_shape)
                spec = input_tensor_spec(self._callable, self._signature)
                if spec is None or spec.dtype == self.dtype:
                    return super().compute_output_shape(input_shape)
                with tf.__internal__.FuncGraph(f"{self.name}_scratch_graph").as_default():
                    placeholder = tf.compat.v1.placeholder(spec.dtype, shape=input_shape)
                    outputs = self.call(placeholder, training=False)
                return tf.nest.map_structure(lambda t: t.shape, outputs)

    return KerasLayer


def _get_callable(func: Any, handle: Any, signature: str | None) -> Any:
    """tensorflow_hub's choice: the object itself if callable and no signature, else the named signature."""
    if callable(func) and not signature:
        return func
    if not hasattr(func, "signatures"):
        if signature:
            raise ValueError("Loaded object has no signatures.")
        raise ValueError("Loaded object is not callable and has no signatures.")
    if signature is None:
        raise ValueError(
            "Signature name has to be specified for non-callable saved models (if not legacy TF1 Hub format)."
        )
    if signature not in func.signatures:
        raise ValueError(f"Unknown signature {signature} in {handle} (available signatures: {func.signatures}).")
    f = func.signatures[signature]
    if not callable(f):
        raise ValueError(f"Internal error: signature {signature} is not callable in {handle}")
    return f
