"""hubd.verify: the three depths of checking a tree (structure, sizes on every hit, every byte on `verify`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hubd.verify import full_problems, quick_problems, structural_problems
from tests.unit.trees import SAVED_MODEL, write_tree


def test_a_minimal_saved_model_has_no_structural_problems(tmp_path: Path) -> None:
    write_tree(tmp_path, {**SAVED_MODEL, "variables/variables.data-00000-of-00001": b"w"})
    assert structural_problems(tmp_path) == []


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"assets/vocab.txt": b"x"}, "no saved_model.pb or saved_model.pbtxt at the top of the archive"),
        ({"saved_model.pb": b""}, "saved_model.pb is empty"),
        (
            {"saved_model.pb": b"g", "variables/variables.data-00000-of-00001": b"w"},
            "variables/variables.index is missing",
        ),
        (
            {"saved_model.pb": b"g", "variables/variables.index": b"i"},
            "variables/variables.index has no data shards",
        ),
        (
            {
                "saved_model.pb": b"g",
                "variables/variables.index": b"i",
                "variables/variables.data-00000-of-00003": b"w",
                "variables/variables.data-00002-of-00003": b"w",
            },
            "variables data shards missing: [1] of 3",
        ),
        (
            {
                "saved_model.pb": b"g",
                "variables/variables.index": b"i",
                "variables/variables.data-00000-of-00001": b"w",
                "variables/variables.data-00001-of-00002": b"w",
            },
            "variables data shards disagree on the shard count",
        ),
    ],
)
def test_incomplete_saved_models_are_named(tmp_path: Path, files: dict[str, bytes], problem: str) -> None:
    write_tree(tmp_path, files)
    assert structural_problems(tmp_path) == [problem]


def test_a_graph_reached_through_a_link_is_refused(tmp_path: Path) -> None:
    write_tree(tmp_path, {"real.pb": b"graph"}, {"saved_model.pb": "real.pb"})
    assert "saved_model.pb is not a regular file" in structural_problems(tmp_path)


def test_variables_must_be_a_real_directory_of_real_files(tmp_path: Path) -> None:
    write_tree(tmp_path, {"saved_model.pb": b"g", "elsewhere/variables.index": b"i"}, {"variables": "elsewhere"})
    assert "variables is not a directory" in structural_problems(tmp_path)
    other = tmp_path / "other"
    write_tree(other, {"saved_model.pb": b"g", "x": b"i"}, {"variables/variables.index": "../x"})
    assert "variables/variables.index is not a regular file" in structural_problems(other)


def test_quick_check_passes_an_untouched_tree(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path, links={"assets/alias": "../saved_model.pb"})
    assert quick_problems(tmp_path, manifest) == []
    assert full_problems(tmp_path, manifest) == []


def test_quick_check_sees_deleted_resized_and_replaced_files(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path, {"a": b"1", "b": b"22", "c": b"3"})
    (tmp_path / "a").unlink()
    (tmp_path / "b").write_bytes(b"333")
    (tmp_path / "c").unlink()
    (tmp_path / "c").mkdir()
    assert sorted(quick_problems(tmp_path, manifest)) == [
        "a: deleted",
        "b: size 3, expected 2",
        "c: no longer a regular file",
    ]


def test_quick_check_sees_a_link_re_pointed_or_removed(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path, {"a": b"1", "b": b"2"}, {"l1": "a", "l2": "b"})
    (tmp_path / "l1").unlink()
    os.symlink("b", tmp_path / "l1")
    (tmp_path / "l2").unlink()
    assert sorted(quick_problems(tmp_path, manifest)) == ["l1: link changed", "l2: link deleted"]


def test_quick_check_sees_a_link_that_now_resolves_outside(tmp_path: Path) -> None:
    """The recorded target is unchanged, but a directory on its way became a link out of the tree."""
    model = tmp_path / "model"
    manifest = write_tree(model, {"saved_model.pb": b"g", "assets/v.txt": b"v"}, {"alias": "assets/v.txt"})
    (model / "assets" / "v.txt").unlink()
    (model / "assets").rmdir()
    write_tree(tmp_path / "outside", {"v.txt": b"v"})
    os.symlink(tmp_path / "outside", model / "assets")
    assert "alias: link resolves outside the model" in quick_problems(model, manifest)


def test_a_missing_tree_is_one_problem(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path / "model")
    assert quick_problems(tmp_path / "gone", manifest) == [f"{tmp_path / 'gone'} is missing"]
    assert full_problems(tmp_path / "gone", manifest) == [f"{tmp_path / 'gone'} is missing"]


def test_full_check_sees_same_size_edits_that_the_quick_check_cannot(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path, {"saved_model.pb": b"graph"})
    (tmp_path / "saved_model.pb").write_bytes(b"GRAPH")
    assert quick_problems(tmp_path, manifest) == []
    assert full_problems(tmp_path, manifest) == ["saved_model.pb: content changed (sha256 mismatch)"]


def test_full_check_sees_members_added_after_publishing(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path)
    (tmp_path / "variables" / "extra.bin").write_bytes(b"planted")
    (tmp_path / "newdir").mkdir()
    assert sorted(full_problems(tmp_path, manifest)) == [
        "newdir: added after publishing",
        "variables/extra.bin: added after publishing",
    ]


def test_full_check_reports_a_deleted_file_once_not_also_as_a_hash_error(tmp_path: Path) -> None:
    manifest = write_tree(tmp_path)
    (tmp_path / "saved_model.pb").unlink()
    assert full_problems(tmp_path, manifest) == ["saved_model.pb: deleted"]
