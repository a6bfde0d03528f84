"""hubd end to end on a machine with no internet; needs only the installed packages, no checkout:

    pip install ./client '.[tf]'    # hubd-client, and hubd with TensorFlow
    python quickstart.py

1. TensorFlow builds a small text-embedding SavedModel and packs it like a TF Hub archive.
2. A local server speaks the TF Hub hosting protocol for it (as tfhub.dev / Kaggle would).
3. `hubd serve` starts with that server as its mirror, on a private socket and cache.
4. The TF Hub text-classifier recipe runs through hubd: KerasLayer + Dense layers, a few training steps.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HANDLE = "https://tfhub.dev/demo/text-embedding/1"
MIRROR_PATH = "/demo/text-embedding/1?tf-hub-format=compressed"  # what hubd asks its mirror for HANDLE

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
    work = Path(tempfile.mkdtemp(prefix="hubd-quickstart-"))  # 0700: the client trusts a socket only there
    try:
        build_text_embedding(work / "model")
        with tarfile.open(work / "model.tar.gz", "w:gz") as tar:  # TF Hub archives: the files at the top
            for child in sorted((work / "model").iterdir()):
                tar.add(child, arcname=child.name)
        server = serve_archive((work / "model.tar.gz").read_bytes())
        daemon = start_daemon(work, mirror=f"http://127.0.0.1:{server.server_port}")
        try:
            train()
        finally:
            daemon.terminate()
            daemon.wait(60)
            server.shutdown()
    finally:
        for root, dirs, _ in os.walk(work):  # published models are read-only (directories 0555)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(work)


def build_text_embedding(path: Path) -> None:
    """Sentences in, one vector each out (like nnlm): hashed tokens averaged over a trainable table."""
    import numpy as np
    import tensorflow as tf

    obj = tf.train.Checkpoint()
    obj.embeddings = tf.Variable(np.random.default_rng(7).normal(size=(1000, 16)).astype("float32"))
    obj.variables = obj.trainable_variables = [obj.embeddings]
    obj.regularization_losses = []

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def embed(sentences: tf.Tensor) -> tf.Tensor:
        tokens = tf.strings.split(tf.strings.lower(sentences))
        ids = tf.strings.to_hash_bucket_fast(tokens, 1000)
        vectors = tf.ragged.map_flat_values(tf.nn.embedding_lookup, obj.embeddings, ids)
        lengths = tf.cast(tf.expand_dims(tokens.row_lengths(), 1), tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(vectors, axis=1), lengths)

    obj.__call__ = embed
    tf.saved_model.save(obj, str(path), signatures={"default": embed})


def serve_archive(archive: bytes) -> http.server.ThreadingHTTPServer:
    """The TF Hub hosting protocol, for one model: GET /<publisher>/<model>/<version>?tf-hub-format=compressed."""

    class Hosting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != MIRROR_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hosting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_daemon(work: Path, mirror: str) -> subprocess.Popen[bytes]:
    """`hubd serve` on a private socket and cache; returns once it says it is ready (sd_notify READY=1)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / "notify.sock"))
    notify.settimeout(120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBD_")}
    env.update(
        HUBD_CACHE_DIR=str(work / "cache"),
        HUBD_SOCKET=str(work / "hubd.sock"),
        HUBD_MIRROR=mirror,
        NOTIFY_SOCKET=str(work / "notify.sock"),
    )
    log = open(work / "hubd.log", "wb")  # noqa: SIM115 (the daemon writes it until it stops)
    daemon = subprocess.Popen([sys.executable, "-m", "hubd", "serve"], env=env, stdout=log, stderr=log)
    with notify:
        while b"READY=1" not in notify.recv(4096):
            pass
    os.environ["HUBD_SOCKET"] = env["HUBD_SOCKET"]  # this process's hubd_client talks to that daemon
    return daemon


def train() -> None:
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
