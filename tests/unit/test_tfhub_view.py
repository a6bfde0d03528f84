"""hubd.tfhub_view: tfhub_modules/ laid out as tensorflow_hub's own cache, linking only to healthy objects."""

from __future__ import annotations

import hashlib
import os

import pytest

from hubd.store import ObjectMeta, Store
from hubd.tfhub_view import VIEW_DIR, TfhubView, link_name, spellings
from tests.unit.trees import meta_of, ref_to, write_tree

TFHUB = "https://tfhub.dev/google/nnlm-en-dim128/2"
KAGGLE = "https://www.kaggle.com/models/google/nnlm/TensorFlow2/en-dim128/2"


def published(store: Store, files: dict[str, bytes] | None = None) -> ObjectMeta:
    staging = store.new_staging()
    meta = meta_of(write_tree(staging.tree, files))
    store.publish(staging.tree, meta)
    staging.cleanup()
    return meta


def test_link_names_are_tensorflow_hubs_sha1_of_the_handle_as_written() -> None:
    assert link_name(TFHUB) == hashlib.sha1(TFHUB.encode()).hexdigest()
    assert link_name(TFHUB) != link_name(TFHUB + "/")


def test_the_usual_spellings_of_a_tfhub_handle_each_get_a_name() -> None:
    names = spellings("tfhub.dev/google/nnlm-en-dim128/2")
    assert {TFHUB, TFHUB + "/", "tfhub.dev/google/nnlm-en-dim128/2"} <= names


def test_kaggle_handles_are_spelled_in_short_and_long_form_and_any_framework_case() -> None:
    names = spellings(KAGGLE)
    long = "https://www.kaggle.com/models/google/nnlm/frameworks/tensorflow2/variations/en-dim128/versions/2"
    assert {KAGGLE, long, long.replace("tensorflow2", "TensorFlow2") + "/"} <= names


def test_something_that_is_not_a_handle_is_spelled_only_as_written() -> None:
    assert spellings("not a handle") == {"not a handle"}


def test_every_spelling_links_relatively_to_the_object_with_a_descriptor(store: Store) -> None:
    meta = published(store)
    view = TfhubView(store)
    view.link(ref_to(meta, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB))
    for spelling in spellings(TFHUB):
        link = store.root / VIEW_DIR / link_name(spelling)
        assert os.readlink(link) == f"../objects/{meta.digest}"
        assert (link / "saved_model.pb").is_file()  # resolves to the tree, wherever the cache is mounted
        assert (link.parent / f"{link.name}.descriptor.txt").read_text().startswith(f"Module: {spelling}\n")


def test_relinking_a_handle_to_a_new_object_replaces_its_links(store: Store) -> None:
    old, new = published(store, {"saved_model.pb": b"v1"}), published(store, {"saved_model.pb": b"v2"})
    view = TfhubView(store)
    view.link(ref_to(old, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB))
    view.link(ref_to(new, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB))
    assert os.readlink(store.root / VIEW_DIR / link_name(TFHUB)) == f"../objects/{new.digest}"
    assert set(view.links_by_target()) == {new.digest}
    assert [p.name for p in (store.root / VIEW_DIR).iterdir() if p.name.startswith(".")] == []  # no temp links


@pytest.mark.parametrize("by", ["digest", "refs"])
def test_unlinking_a_digest_removes_its_links_and_descriptors_and_no_others(store: Store, by: str) -> None:
    one, two = published(store, {"saved_model.pb": b"1"}), published(store, {"saved_model.pb": b"2"})
    view = TfhubView(store)
    refs = [ref_to(one, "tfhub.dev/a/one/1"), ref_to(one, "www.kaggle.com/models/a/one/TensorFlow2/v/1")]
    for ref in [*refs, ref_to(two, "tfhub.dev/a/two/1")]:
        view.link(ref)
    if by == "digest":
        view.unlink_digest(one.digest)
    else:
        view.unlink_refs(one.digest, refs)
    assert set(view.links_by_target()) == {two.digest}
    descriptors = [p for p in view.root.iterdir() if p.name.endswith(".descriptor.txt")]
    assert len(descriptors) == len(view.links_by_target()[two.digest])


def test_unlinking_by_refs_keeps_a_link_that_now_points_at_another_object(store: Store) -> None:
    old, new = published(store, {"saved_model.pb": b"v1"}), published(store, {"saved_model.pb": b"v2"})
    view = TfhubView(store)
    view.link(ref_to(old, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB))
    view.link(ref_to(new, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB))
    view.unlink_refs(old.digest, [ref_to(old, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB)])
    assert os.readlink(store.root / VIEW_DIR / link_name(TFHUB)) == f"../objects/{new.digest}"
    assert (store.root / VIEW_DIR / f"{link_name(TFHUB)}.descriptor.txt").is_file()


def test_a_rewritten_ref_drops_only_the_links_its_old_spelling_had(store: Store) -> None:
    meta = published(store)
    view = TfhubView(store)
    spelled = TFHUB + "?tf-hub-format=compressed"
    before = ref_to(meta, "tfhub.dev/google/nnlm-en-dim128/2", spelled)
    now = ref_to(meta, "tfhub.dev/google/nnlm-en-dim128/2", TFHUB)
    view.link(before)
    view.link(now)
    view.unlink_dropped(before, now)
    linked = {p.name for p in view.root.iterdir() if p.is_symlink()}
    assert link_name(spelled) not in linked and link_name(spelled + "/") not in linked
    assert {link_name(s) for s in spellings(TFHUB)} <= linked  # the spellings both had were never unlinked
    assert set(view.links_by_target()) == {meta.digest}


def test_rebuild_drops_links_to_quarantined_objects_and_links_every_healthy_ref(store: Store) -> None:
    healthy, broken = published(store, {"saved_model.pb": b"ok"}), published(store, {"saved_model.pb": b"bad"})
    for meta, name in ((healthy, "tfhub.dev/a/healthy/1"), (broken, "tfhub.dev/a/broken/1")):
        key = hashlib.sha256(name.encode()).hexdigest()[:32]
        store.write_ref(key, ref_to(meta, name))
    view = TfhubView(store)
    view.link(ref_to(broken, "tfhub.dev/a/broken/1"))
    store.quarantine(broken.digest, "sha256 mismatch")
    view.rebuild()
    assert set(view.links_by_target()) == {healthy.digest}
    assert not (view.root / link_name("https://tfhub.dev/a/broken/1")).is_symlink()
