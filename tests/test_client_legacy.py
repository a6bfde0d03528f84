"""tf_keras (TF_USE_LEGACY_KERAS=1) and the tensorflow_hub plug-in: each in a fresh process, since the Keras
flavour is fixed when TensorFlow is first imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import REPO, Upstream
from tests.daemon import Daemon, start_daemon


@pytest.fixture
def daemon(settings: Settings, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(settings, tmp_path)
    yield d
    d.stop()


def run_script(code: str, daemon: Daemon, tmp_path: Path, **env: str) -> str:
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TF_USE_LEGACY"))},
        "HUBD_SOCKET": str(daemon.socket_path),
        "TFHUB_CACHE_DIR": str(tmp_path / "tfhub_modules"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": f"{REPO / 'client'}:{REPO}",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_tf_keras_sequential_text_classifier_and_reusable_model(
    daemon: Daemon, upstream: Upstream, tmp_path: Path
) -> None:
    text, reusable = (f"https://tfhub.dev/{upstream.publish(m)}" for m in ("text_embedding", "reusable"))
    out = run_script(
        f"""
        import numpy as np, tensorflow as tf, tf_keras
        import hubd_client as hub
        layer = hub.KerasLayer("{text}", input_shape=[], dtype=tf.string, trainable=True)
        assert isinstance(layer, tf_keras.layers.Layer)
        model = tf.keras.Sequential([layer, tf.keras.layers.Dense(8, activation="relu"), tf.keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
        before = layer.trainable_weights[0].numpy().copy()
        model.fit(tf.constant(["good film", "bad film"]), tf.constant([1.0, 0.0]), epochs=3, verbose=0)
        assert not np.allclose(layer.trainable_weights[0].numpy(), before), "fine-tuning changed nothing"
        r = hub.KerasLayer("{reusable}", trainable=True)
        y = r(tf.ones([1, 4]), training=True)
        assert sorted(w.name for w in r.trainable_weights) == ["b:0", "w:0"], r.trainable_weights
        assert len(r.losses) == 1 and abs(float(r.losses[0]) - 0.03) < 1e-6, r.losses
        assert np.allclose(y.numpy(), 4.0)
        saved = tf.keras.Sequential([tf.keras.Input(shape=(4,)), r, tf.keras.layers.Dense(1)])
        saved.compile(optimizer="sgd", loss="mse")
        saved.fit(np.ones((4, 4), "float32"), np.ones((4, 1), "float32"), epochs=1, verbose=0)
        saved.save("{tmp_path}/legacy.keras")
        back = tf_keras.models.load_model("{tmp_path}/legacy.keras")
        assert np.allclose(back.predict(np.ones((2, 4)), verbose=0), saved.predict(np.ones((2, 4)), verbose=0))
        print("OK", type(tf.keras.layers.Layer).__module__)
        """,
        daemon,
        tmp_path,
        TF_USE_LEGACY_KERAS="1",
    )
    assert out.startswith("OK")


def test_install_tfhub_routes_unmodified_tensorflow_hub_through_the_daemon(
    daemon: Daemon, upstream: Upstream, settings: Settings, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    handle = f"{upstream.server.url}/{path}"
    out = run_script(
        f"""
        import hubd_client
        hubd_client.install_tfhub()
        import tensorflow as tf, tensorflow_hub as hub
        print(hub.resolve("{handle}"))
        print(hub.load("{handle}")(tf.ones([1, 4])).numpy().tolist())
        layer = hub.KerasLayer("{handle}")
        print(layer(tf.ones([1, 4])).shape)
        """,
        daemon,
        tmp_path,
        TF_USE_LEGACY_KERAS="1",
    )
    resolved, value, shape = out.splitlines()
    assert resolved.startswith(str(settings.cache_dir / "objects"))
    assert value == "[[2.0, 2.0, 2.0]]" and shape == "(1, 3)"
    assert upstream.requests(path) == 1
    assert not (tmp_path / "tfhub_modules").exists() or not any((tmp_path / "tfhub_modules").iterdir())


@pytest.mark.slow
def test_hubd_tfhub_env_var_plugs_in_without_code_changes(
    daemon: Daemon, upstream: Upstream, settings: Settings, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    code = f'import tensorflow_hub as hub; print(hub.resolve("{upstream.server.url}/{path}"))'
    plugged = run_script(code, daemon, tmp_path, HUBD_TFHUB="1")
    assert plugged.strip().startswith(str(settings.cache_dir / "objects"))
    unplugged = run_script(code, daemon, tmp_path)
    assert unplugged.strip().startswith(str(tmp_path / "tfhub_modules"))


@pytest.mark.slow
def test_an_editable_install_ships_the_tfhub_hook(tmp_path: Path) -> None:
    """`pip install -e ./client` installs hubd_client.pth too: HUBD_TFHUB=1 works from a development checkout."""
    import sysconfig

    prefix = tmp_path / "prefix"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed"]
    subprocess.run(
        [*pip, "--prefix", str(prefix), "-e", str(REPO / "client")], check=True, capture_output=True, timeout=240
    )
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert (site_dir / "hubd_client.pth").read_text() == (REPO / "client" / "hubd_client.pth").read_text()
    # the interpreter's start-up processing of that site directory, then: is the import hook in place?
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "from hubd_client.tfhub_plugin import _AfterImport;"
        "print(any(isinstance(f, _AfterImport) for f in sys.meta_path), 'tensorflow_hub' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "PYTHONPATH"))}
    for flag, expected in (("1", "True False"), ("", "False False")):
        result = subprocess.run(
            [sys.executable, "-S", "-c", code, str(site_dir)],
            env={**env, "HUBD_TFHUB": flag},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == expected, result.stderr
