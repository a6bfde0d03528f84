"""KerasLayer and load under Keras 3 (TensorFlow's default), against a real daemon and real SavedModels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="module")
def tf() -> Any:
    if os.environ.get("TF_USE_LEGACY_KERAS"):
        pytest.fail("this module tests Keras 3; unset TF_USE_LEGACY_KERAS (tf_keras has its own test module)")
    import tensorflow

    return tensorflow


@pytest.fixture
def hub(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    daemon: Daemon = start_daemon(settings, tmp_path)
    monkeypatch.setenv("HUBD_SOCKET", str(daemon.socket_path))
    import hubd_client

    yield hubd_client
    daemon.stop()


def tfhub(upstream: Upstream, model: str) -> str:
    return f"https://tfhub.dev/{upstream.publish(model)}"


def test_load_returns_the_saved_model(tf: Any, hub: Any, upstream: Upstream) -> None:
    obj = hub.load(tfhub(upstream, "reusable"))
    out = obj(tf.ones([2, 4]), training=False)
    np.testing.assert_allclose(out.numpy(), np.full((2, 3), 2.0))


def test_text_embedding_in_a_sequential_classifier(tf: Any, hub: Any, upstream: Upstream) -> None:
    import keras

    layer = hub.KerasLayer(tfhub(upstream, "text_embedding"), input_shape=[], dtype=tf.string)
    assert isinstance(layer, keras.layers.Layer)
    model = keras.Sequential([layer, keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    sentences = tf.constant(["a great film", "dull and long", "great acting", "long and dull"])
    labels = tf.constant([1.0, 0.0, 1.0, 0.0])
    history = model.fit(sentences, labels, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    assert model.predict(sentences, verbose=0).shape == (4, 1)
    assert layer.trainable_weights == []  # trainable=False by default, as in tensorflow_hub


def test_tensorflow_hub_keras_layer_fails_in_keras_3_where_ours_works(
    tf: Any, hub: Any, upstream: Upstream
) -> None:
    """The incumbent's KerasLayer subclasses tf_keras's Layer, which Keras 3 models refuse."""
    import keras
    import tensorflow_hub

    path = hub.resolve(tfhub(upstream, "reusable"))
    with pytest.raises(ValueError, match=r"Only instances of `keras\.Layer` can be added"):
        keras.Sequential([keras.Input(shape=(4,)), tensorflow_hub.KerasLayer(path)])
    model = keras.Sequential([keras.Input(shape=(4,)), hub.KerasLayer(path)])
    assert model(np.ones((1, 4), "float32")).shape == (1, 3)


def test_text_embedding_in_the_functional_api(tf: Any, hub: Any, upstream: Upstream) -> None:
    import keras

    inputs = keras.Input(shape=(), dtype="string")
    embedded = hub.KerasLayer(tfhub(upstream, "text_embedding"))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(embedded))
    assert model(tf.constant(["hello world"])).shape == (1, 2)


def test_reusable_model_exposes_weights_training_and_losses(tf: Any, hub: Any, upstream: Upstream) -> None:
    layer = hub.KerasLayer(tfhub(upstream, "reusable"), trainable=True)
    assert sorted(w.name for w in layer.trainable_weights) == ["b", "w"]
    assert [w.name for w in layer.non_trainable_weights] == ["scale"]
    x = tf.ones([1, 4])
    np.testing.assert_allclose(layer(x, training=True).numpy(), [[4.0, 4.0, 4.0]])  # training doubles
    np.testing.assert_allclose(layer(x, training=False).numpy(), [[2.0, 2.0, 2.0]])
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), 0.01 * 12 * 0.25)  # 0.01 * sum(w**2)
    frozen = hub.KerasLayer(tfhub(upstream, "reusable"))
    np.testing.assert_allclose(frozen(x, training=True).numpy(), [[2.0, 2.0, 2.0]])  # frozen: inference mode
    assert [float(v) for v in frozen.losses] == [0.0]  # as tensorflow_hub: a frozen layer adds 0.0


def test_weights_are_shared_between_calls(tf: Any, hub: Any, upstream: Upstream) -> None:
    import keras

    layer = hub.KerasLayer(tfhub(upstream, "reusable"))
    a, b = keras.Input(shape=(4,)), keras.Input(shape=(4,))
    model = keras.Model([a, b], keras.layers.Add()([layer(a), layer(b)]))
    assert len(model.weights) == 3


def test_serving_signature_with_output_key(tf: Any, hub: Any, upstream: Upstream) -> None:
    handle = tfhub(upstream, "signature_only")
    probabilities = hub.KerasLayer(handle, signature="serving_default", output_key="probabilities")
    out = probabilities(tf.constant([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(out.numpy().sum(), 1.0, rtol=1e-6)
    as_dict = hub.KerasLayer(handle, signature="serving_default", signature_outputs_as_dict=True)
    assert sorted(as_dict({"features": tf.constant([[1.0, 0.0, 0.0]])})) == ["logits", "probabilities"]
    with pytest.raises(ValueError, match="Signature name has to be specified for non-callable"):
        hub.KerasLayer(handle)
    with pytest.raises(ValueError, match="either output_key or signature_outputs_as_dict"):
        hub.KerasLayer(handle, signature="serving_default")


def test_layer_from_a_loaded_object(tf: Any, hub: Any, upstream: Upstream) -> None:
    obj = hub.load(tfhub(upstream, "reusable"))
    layer = hub.KerasLayer(obj, trainable=True)
    assert layer.trainable_weights[0].value is obj.trainable_variables[0]


def test_fine_tune_changes_the_model_and_it_can_be_re_exported(
    tf: Any, hub: Any, upstream: Upstream, tmp_path: Path
) -> None:
    import keras

    obj = hub.load(tfhub(upstream, "reusable"))
    before = obj.trainable_variables[0].numpy().copy()
    model = keras.Sequential([keras.Input(shape=(4,)), hub.KerasLayer(obj, trainable=True)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.ones((8, 4), "float32"), np.zeros((8, 3), "float32"), epochs=2, verbose=0)
    assert not np.allclose(obj.trainable_variables[0].numpy(), before)
    tf.saved_model.save(obj, str(tmp_path / "exported"))
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.trainable_variables[0].numpy(), obj.trainable_variables[0].numpy())


def test_model_with_the_layer_saves_and_reloads_through_its_handle(
    tf: Any, hub: Any, upstream: Upstream, tmp_path: Path
) -> None:
    import keras

    handle = tfhub(upstream, "reusable")
    layer = hub.KerasLayer(handle, trainable=True)
    assert layer.get_config()["handle"] == handle
    model = keras.Sequential([keras.Input(shape=(4,)), layer, keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
