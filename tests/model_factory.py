"""Builds real SavedModels with TensorFlow and packs them as hosting-protocol archives (.tar.gz).

Run as a script in its own process (`python tests/model_factory.py OUT_DIR [--large-mb N]`), so the test
process and the daemon never import TensorFlow. Writes OUT_DIR/<name>.tar.gz and OUT_DIR/index.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

EMBED_DIM = 8
BUCKETS = 500


def build_reusable(path: Path) -> None:
    """A Reusable SavedModel (TF Hub's definition): variables, a `training` argument, regularization losses."""
    obj = tf.train.Checkpoint()
    obj.w = tf.Variable(tf.fill([4, 3], 0.5), name="w")
    obj.b = tf.Variable(tf.zeros([3]), name="b")
    obj.scale = tf.Variable(2.0, trainable=False, name="scale")
    obj.variables = [obj.w, obj.b, obj.scale]
    obj.trainable_variables = [obj.w, obj.b]

    @tf.function
    def call(x: tf.Tensor, training: bool = False) -> tf.Tensor:
        y = tf.matmul(x, obj.w) + obj.b
        return y * obj.scale if training else y

    spec = tf.TensorSpec([None, 4], tf.float32)
    call.get_concrete_function(spec, True)
    call.get_concrete_function(spec, False)
    obj.__call__ = call
    obj.regularization_losses = [tf.function(lambda: 0.01 * tf.reduce_sum(tf.square(obj.w)), input_signature=[])]
    tf.saved_model.save(obj, str(path))


def build_text_embedding(path: Path) -> None:
    """Sentences in, one vector each out (like nnlm): hashed tokens averaged over a trainable embedding table.

    A Reusable SavedModel, as TF Hub's text embeddings are: `variables`, `trainable_variables`, a `default`
    signature for TF1-style users.
    """
    obj = tf.train.Checkpoint()
    rng = np.random.default_rng(7)
    obj.embeddings = tf.Variable(rng.normal(size=(BUCKETS, EMBED_DIM)).astype("float32"), name="embeddings")
    obj.variables = [obj.embeddings]
    obj.trainable_variables = [obj.embeddings]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def embed(sentences: tf.Tensor) -> tf.Tensor:
        tokens = tf.strings.split(tf.strings.lower(sentences))
        ids = tf.strings.to_hash_bucket_fast(tokens, BUCKETS)
        vectors = tf.ragged.map_flat_values(tf.nn.embedding_lookup, obj.embeddings, ids)
        return tf.math.divide_no_nan(
            tf.reduce_sum(vectors, axis=1), tf.cast(tf.expand_dims(tokens.row_lengths(), 1), tf.float32)
        )

    obj.__call__ = embed
    obj.regularization_losses = []
    tf.saved_model.save(obj, str(path), signatures={"default": embed})


def build_nnlm(path: Path, dim: int = 128) -> None:
    """The interface of https://tfhub.dev/google/nnlm-en-dim128/2: `obj(sentences)` on a [None] string tensor
    returns [None, dim] float32; a `default` signature returns {"default": ...}; a trainable embedding table."""
    obj = tf.train.Checkpoint()
    rng = np.random.default_rng(5)
    obj.embeddings = tf.Variable(rng.normal(size=(BUCKETS, dim)).astype("float32"), name="embeddings")
    obj.variables = [obj.embeddings]
    obj.trainable_variables = [obj.embeddings]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def embed(sentences: tf.Tensor) -> tf.Tensor:
        tokens = tf.strings.split(tf.strings.lower(sentences))
        ids = tf.strings.to_hash_bucket_fast(tokens, BUCKETS)
        vectors = tf.ragged.map_flat_values(tf.nn.embedding_lookup, obj.embeddings, ids)
        return tf.math.divide_no_nan(
            tf.reduce_sum(vectors, axis=1), tf.cast(tf.expand_dims(tokens.row_lengths(), 1), tf.float32)
        )

    obj.__call__ = embed
    obj.regularization_losses = []
    default = tf.function(lambda sentences: {"default": embed(sentences)}, input_signature=embed.input_signature)
    tf.saved_model.save(obj, str(path), signatures={"default": default})


def build_nested_outputs(path: Path, kind: str) -> None:
    """A callable without variables whose output is a list (`kind="list"`) or a dict of two tensors whose last
    dimension is unknown to the trace, so only KerasLayer's `output_shape` can make it static."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def call(x: tf.Tensor) -> object:
        doubled, summed = 2.0 * x, tf.reduce_sum(x, axis=1, keepdims=True) + 0.0 * x
        return [doubled, summed] if kind == "list" else {"doubled": doubled, "summed": summed}

    module.__call__ = call
    tf.saved_model.save(module, str(path))


def build_signature_only(path: Path) -> None:
    """A model reachable only through a serving signature that returns a dict (TF1-export style)."""
    module = tf.Module()
    module.kernel = tf.Variable([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]], name="kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="features")])
    def serve(features: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = tf.matmul(features, module.kernel)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def build_large(path: Path, megabytes: int) -> None:
    """A model whose variables are `megabytes` MB of random float32: nearly incompressible, like real weights."""
    module = tf.Module()
    rng = np.random.default_rng(11)
    rows = max(1, megabytes * 2**20 // (4 * 1024))
    module.weights = tf.Variable(rng.random((rows, 1024), dtype=np.float32), name="weights")
    module.__call__ = tf.function(
        lambda x: tf.matmul(x, module.weights, transpose_b=True), input_signature=[tf.TensorSpec([None, 1024])]
    )
    tf.saved_model.save(module, str(path))


def pack(model_dir: Path, archive: Path) -> str:
    """Pack like TF Hub archives are packed: the SavedModel's files at the top of the tar."""
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for child in sorted(model_dir.iterdir()):
            tar.add(child, arcname=child.name)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--large-mb", type=int, action="append", default=[])
    parser.add_argument("--only-large", action="store_true")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    builders = {
        "reusable": build_reusable,
        "text_embedding": build_text_embedding,
        "signature_only": build_signature_only,
        "nnlm": build_nnlm,
        "list_output": lambda path: build_nested_outputs(path, "list"),
        "dict_output": lambda path: build_nested_outputs(path, "dict"),
    }
    if args.only_large:
        builders = {}
    index = {}
    for name, build in builders.items():
        build(out / name)
        index[name] = pack(out / name, out / f"{name}.tar.gz")
    for mb in args.large_mb:
        name = f"large_{mb}mb"
        build_large(out / name, mb)
        index[name] = pack(out / name, out / f"{name}.tar.gz")
    (out / "index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    main()
