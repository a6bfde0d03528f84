"""hubd end to end on a machine with no internet: run from a checkout with `python examples/quickstart.py`.

1. TensorFlow builds a small text-embedding SavedModel and packs it like a TF Hub archive.
2. A local server speaks the TF Hub hosting protocol for it (as tfhub.dev / Kaggle would).
3. `hubd serve` starts with that server as its mirror, on a private socket and cache.
4. The TF Hub text-classifier recipe runs through hubd: KerasLayer + Dense layers, a few training steps.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path[:0] = [
    str(Path(__file__).resolve().parent.parent),
    str(Path(__file__).resolve().parent.parent / "client"),
]

from hubd.config import Settings  # noqa: E402
from hubd.store import remove_tree  # noqa: E402
from tests.daemon import start_daemon  # noqa: E402
from tests.hosting import HostingServer  # noqa: E402
from tests.model_factory import build_text_embedding, pack  # noqa: E402

HANDLE = "https://tfhub.dev/demo/text-embedding/1"

REVIEWS = [
    ("a wonderful, moving film", 1),
    ("great acting and a great story", 1),
    ("I loved every minute", 1),
    ("beautiful and funny", 1),
    ("a dull, boring mess", 0),
    ("terrible script and bad acting", 0),
    ("I hated it", 0),
    ("boring and far too long", 0),
]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="hubd-quickstart-"))
    build_text_embedding(work / "model")
    pack(work / "model", work / "model.tar.gz")
    with HostingServer() as server:
        server.add("demo/text-embedding/1", (work / "model.tar.gz").read_bytes())
        settings = Settings(cache_dir=work / "cache", mirror=server.url)
        daemon = start_daemon(settings, work)
        os.environ["HUBD_SOCKET"] = str(daemon.socket_path)
        try:
            train(daemon)
        finally:
            daemon.stop()
            remove_tree(work)


def train(daemon: object) -> None:
    import hubd_client as hub
    import keras
    import numpy as np
    import tensorflow as tf

    print(f"resolved {HANDLE} -> {hub.resolve(HANDLE)}")
    model = keras.Sequential(
        [
            hub.KerasLayer(HANDLE, input_shape=[], dtype=tf.string, trainable=True),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    texts = tf.constant([t for t, _ in REVIEWS])
    labels = np.array([y for _, y in REVIEWS], dtype="float32")
    history = model.fit(texts, labels, epochs=20, verbose=0)
    print(
        f"trained: loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}, "
        f"accuracy {history.history['binary_accuracy'][-1]:.2f}"
    )
    print(model.predict(tf.constant(["a great story", "a boring mess"]), verbose=0).ravel())


if __name__ == "__main__":
    main()
