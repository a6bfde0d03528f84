"""The code of TF Hub's guide "SavedModels from TF Hub in TensorFlow 2", run as written, through hubd.

The code comes from the guide itself (tests/guide/tf2-savedmodels-guide.md), not retyped: each ```python block
and the two inline snippets, with only `import tensorflow_hub as hub` changed to `import hubd_client as hub`, and
the `...` the guide leaves to the reader filled in (`_fill`: each must match the guide's text exactly once, so an
edited guide fails here instead of silently testing something else), and `/tmp/my_mul` made a directory of the
test's own, so that concurrent runs cannot overwrite each other's model. `before` and `after` are ours: the data a
reader would have, and what the example must have done.

The guide's handles are served by the hosting server on 127.0.0.1, through a real daemon whose mirror is that
server, as SavedModels built by TensorFlow in this session. Three runs, one process each (the Keras flavour is
fixed when TensorFlow is imported), every example once per run: hubd_client under Keras 3, hubd_client under
tf_keras, and the unmodified guide (`import tensorflow_hub as hub`) under Keras 3 with HUBD_TFHUB=1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

GUIDE = Path(__file__).parent / "guide" / "tf2-savedmodels-guide.md"
NNLM = "https://tfhub.dev/google/nnlm-en-dim128/2"
SERVED = {  # path on the hosting server -> model built by tests/model_factory.py
    "google/nnlm-en-dim128/2": "nnlm",
    "hubd-tests/reusable/1": "reusable",
    "hubd-tests/signature-only/1": "signature_only",
}


CUT_LAYERS = "tf.keras.layers.Dense(3, name='a'), tf.keras.layers.Dense(2, name='b'), tf.keras.layers.Dense(1)"


@dataclass
class Example:
    name: str
    code: str
    before: str = ""
    after: str = ""
    flavours: tuple[str, ...] = ("keras3", "tf_keras", "plugged")


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def _inline(prefix: str) -> str:
    found = re.findall(r"`(" + re.escape(prefix) + r"[^`]*)`", GUIDE.read_text())
    assert len(found) == 1, (prefix, found)
    return str(found[0])


FILLED: set[str] = set()  # the guide's text that _fill replaced


def _fill(code: str, *fills: tuple[str, str]) -> str:
    for old, new in fills:
        FILLED.add(old)
        assert code.count(old) == 1, f"the guide no longer has exactly one {old!r}"
        code = code.replace(old, new)
    return code


def examples() -> list[Example]:
    blocks = _blocks()
    assert len(blocks) == 7, "the guide's code blocks changed: review the examples below"
    embed, classifier, piece, cut_out, my_mul, fine_tune, re_export = blocks
    return [
        Example(
            "embed_python_list",
            embed,
            after="""
assert _out == "(3, 128) <dtype: 'float32'>\\n", _out
assert embed(np.array(["A long sentence.", "single-word"])).shape == (2, 128)  # NumPy arrays too
assert embed.trainable_weights == [] and len(embed.weights) == 1  # non-trainable by default
""",
        ),
        Example(
            "sequential_classifier_trained_on_strings",
            classifier,
            after="""
before = embed.weights[0].numpy().copy()
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
sentences = tf.constant(["a great film", "dull and long", "great acting", "long and dull"])
history = model.fit(sentences, tf.constant([1.0, 0.0, 1.0, 0.0]), epochs=2, verbose=0)
assert len(history.history["loss"]) == 2
p = model.predict(tf.constant(["great film"]), verbose=0)
assert p.shape == (1, 1) and 0.0 < float(p[0, 0]) < 1.0, p
assert np.array_equal(embed.weights[0].numpy(), before)  # the embedding stayed frozen
""",
        ),
        Example(
            "reusable_saved_model_my_mul",
            _fill(
                my_mul,
                (
                    'tf.saved_model.save(MyMulModel(2.0), "/tmp/my_mul")',
                    "tf.saved_model.save(MyMulModel(2.0), MY_MUL)",
                ),
                ('hub.KerasLayer("/tmp/my_mul")', "hub.KerasLayer(MY_MUL)"),
            ),
            before='MY_MUL = os.path.join(os.getcwd(), "my_mul")',
            after="""
printed = _out.splitlines()
assert printed[0] == "tf.Tensor([20. 40.], shape=(2,), dtype=float32)", printed
assert len(layer.trainable_weights) == 1 and "2.0" in printed[1], printed
assert len(layer.losses) == 1 and abs(float(layer.losses[0]) - 0.004) < 1e-7 and "0.004" in printed[2], printed
""",
        ),
        Example(
            "fine_tuning_layer",
            _fill(fine_tune, ("...", '"https://tfhub.dev/hubd-tests/reusable/1"')),
            after="""
assert sorted(w.name.split(":")[0] for w in layer.trainable_weights) == ["b", "w"]
assert np.allclose(layer(tf.ones([1, 4]), training=True), 4.0)  # the SavedModel's training mode
assert len(layer.losses) == 1 and abs(float(layer.losses[0]) - 0.03) < 1e-6  # its regularization loss
""",
        ),
        Example(
            "re_export_fine_tuned",
            _fill(
                re_export,
                ('"https://tfhub.dev/..."', repr(NNLM).replace("'", '"')),
                ("hub.KerasLayer(loaded_obj, trainable=True, ...)", "hub.KerasLayer(loaded_obj, trainable=True)"),
                ("[..., hub_layer, ...]", "[hub_layer, keras.layers.Dense(1)]"),
                ("model.compile(...)", 'model.compile(optimizer="sgd", loss="mse")'),
                (
                    "model.fit(...)",
                    'model.fit(tf.constant(["great film", "dull"]), tf.constant([[1.0], [0.0]]), verbose=0)',
                ),
            ),
            before="keras = tf.keras",
            after=f"""
reloaded = tf.saved_model.load(export_module_dir)
assert np.allclose(reloaded.variables[0].numpy(), loaded_obj.variables[0].numpy())
assert not np.allclose(reloaded.variables[0].numpy(), hub.load("{NNLM}").variables[0].numpy())  # fine-tuned
assert reloaded(tf.constant(["great film"])).shape == (1, 128)
""",
        ),
        Example(
            "load_and_call_a_signature",
            _inline('tensors_out = obj.signatures["serving_default"]'),
            before='obj = hub.load("https://tfhub.dev/hubd-tests/signature-only/1")\n'
            'tensors_in = {"features": tf.constant([[1.0, 0.0, 0.0]])}',
            after='assert sorted(tensors_out) == ["logits", "probabilities"]\n'
            'assert np.isclose(float(tf.reduce_sum(tensors_out["probabilities"])), 1.0)',
        ),
        Example(
            "load_and_call_the_object",
            _inline("output_tensor = obj("),
            before='obj = hub.load("https://tfhub.dev/hubd-tests/reusable/1")\ninput_tensor = tf.ones([2, 4])',
            after="assert output_tensor.shape == (2, 3) and np.allclose(output_tensor, 2.0)",
        ),
        Example(
            "share_a_piece_of_a_keras_model",  # tf_keras only: Keras 3 has no SavedModel `save` nor get_output_at
            _fill(
                piece,
                ("tf.keras.Model(...)", "tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])"),
                ("[piece_to_share, ...]", "[piece_to_share, tf.keras.layers.Dense(1)]"),
                (
                    "full_model.fit(...)",
                    'full_model.compile("sgd", "mse")\nfull_model.fit(np.ones((4, 3)), np.ones(4), verbose=0)',
                ),
                ("piece_to_share.save(...)", 'piece_to_share.save("piece")'),
            )
            + _fill(
                cut_out,
                ("tf.keras.Model(...)", f"tf.keras.Sequential([tf.keras.Input((3,)), {CUT_LAYERS}])"),
                ("sharing_input = full_model.get_layer(...)", "sharing_input = full_model.get_layer('a')"),
                ("sharing_output = full_model.get_layer(...)", "sharing_output = full_model.get_layer('b')"),
                (
                    "piece_to_share.save(..., include_optimizer=False)",
                    'piece_to_share.save("cut", include_optimizer=False)',
                ),
            ),
            after="""
assert hub.KerasLayer("piece")(np.ones((2, 3), "float32")).shape == (2, 2)
assert hub.KerasLayer(os.path.abspath("cut"))(np.ones((2, 3), "float32")).shape == (2, 2)
""",
            flavours=("tf_keras",),
        ),
    ]


FLAVOURS = {
    "keras3": {},
    "tf_keras": {"TF_USE_LEGACY_KERAS": "1"},
    "plugged": {"HUBD_TFHUB": "1"},
}


def run_examples(spec_file: str, out_file: str) -> None:
    """In the subprocess: run every example in one namespace, as a reader runs the guide top to bottom."""
    spec = json.loads(Path(spec_file).read_text())
    namespace: dict[str, Any] = {}
    exec("import os\nimport numpy as np\nimport tensorflow as tf", namespace)
    results = {}
    for example in spec["examples"]:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(example["before"], namespace)
                exec(example["code"], namespace)
            namespace["_out"] = out.getvalue()
            exec(example["after"], namespace)
            exec(spec["finally"], namespace)
            results[example["name"]] = {"ok": True, "error": ""}
        except BaseException:
            results[example["name"]] = {
                "ok": False,
                "error": traceback.format_exc() + "\nprinted:\n" + out.getvalue(),
            }
    Path(out_file).write_text(json.dumps(results))


@pytest.fixture(scope="module", params=list(FLAVOURS))
def guide_run(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    hosting: Any,
    models: dict[str, bytes],
) -> Iterator[tuple[str, dict[str, Any], Path]]:
    from hubd.config import Settings
    from tests.conftest import REPO
    from tests.daemon import start_daemon

    flavour: str = request.param
    if flavour == "plugged" and not (Path(sysconfig.get_path("purelib")) / "hubd_client.pth").is_file():
        pytest.fail("hubd_client.pth is not in site-packages: reinstall hubd-client: `pip install -e ./client`")
    work = tmp_path_factory.mktemp(f"guide-{flavour}")
    settings = Settings(
        cache_dir=work / "cache",
        mirror=hosting.url,
        http_hosts=["127.0.0.1"],
        backoff_base=0.01,
        retries=3,
        read_timeout=10,
    )
    for path, model in SERVED.items():
        hosting.add(path, models[model])
    daemon = start_daemon(settings, work)
    chosen = [e for e in examples() if flavour in e.flavours]
    if flavour != "plugged":
        for e in chosen:
            e.code = (
                _fill(e.code, ("import tensorflow_hub as hub", "import hubd_client as hub"))
                if "import tensorflow_hub" in e.code
                else e.code
            )
        final = ""
    else:  # the guide unmodified; afterwards, check that it went through hubd
        final = f"""
import hubd_client.keras_layer
assert hub.KerasLayer is hubd_client.keras_layer.keras_layer_class(), hub.KerasLayer
assert hub.resolve("{NNLM}").startswith("{settings.cache_dir}/"), hub.resolve("{NNLM}")
"""
    namespace_prelude = "" if flavour == "plugged" else "import hubd_client as hub\n"
    for e in chosen:  # a reader who runs one example alone has done the guide's first import
        e.before = (
            namespace_prelude + ("import tensorflow_hub as hub\n" if flavour == "plugged" else "") + e.before
        )
    spec = work / "spec.json"
    spec.write_text(json.dumps({"examples": [asdict(e) for e in chosen], "finally": final}))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TF_USE_LEGACY"))},
        "HUBD_SOCKET": str(daemon.socket_path),
        "TFHUB_CACHE_DIR": str(work / "tfhub_modules"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": f"{REPO / 'client'}:{REPO}",
        **FLAVOURS[flavour],
    }
    code = "import sys; from tests.test_guide_examples import run_examples; run_examples(*sys.argv[1:])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(spec), str(work / "results.json")],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        yield flavour, json.loads((work / "results.json").read_text()), work
    finally:
        daemon.stop()


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in examples()])
def test_guide_example(guide_run: tuple[str, dict[str, Any], Path], name: str) -> None:
    flavour, results, work = guide_run
    if name not in results:
        pytest.skip(f"not a {flavour} example: Keras 3 models have no SavedModel `save()` nor `get_output_at`")
    assert results[name]["ok"], results[name]["error"]
    if flavour == "plugged":  # tensorflow_hub's own cache stayed empty: hubd fetched everything
        assert not any((work / "tfhub_modules").glob("*/saved_model.pb"))


def test_the_examples_cover_every_code_block_of_the_guide() -> None:
    """Every line of the guide's code that is not a placeholder is run as written (the import aside)."""
    used = "\n".join(e.code for e in examples()).splitlines()
    for block in _blocks():
        for line in block.splitlines():
            if line.strip() and not any(old in line or line in old for old in FILLED):
                assert line in used, line
