"""hubd.tree: the tree digest names objects, and the link and name rules decide which trees may be published."""

from __future__ import annotations

import pytest

from hubd.tree import FileRecord, TreeListing

SHA_A = "a" * 64
SHA_B = "b" * 64


def tree(files: dict[str, tuple[int, str]] | None = None, links: dict[str, str] | None = None) -> TreeListing:
    return TreeListing(
        files={name: FileRecord(size, sha) for name, (size, sha) in (files or {}).items()},
        symlinks=dict(links or {}),
    )


def test_the_digest_depends_on_content_not_on_the_order_members_came_in() -> None:
    one = tree({"saved_model.pb": (1, SHA_A), "variables/variables.index": (2, SHA_B)})
    other = tree({"variables/variables.index": (2, SHA_B), "saved_model.pb": (1, SHA_A)})
    assert one.digest() == other.digest()


@pytest.mark.parametrize(
    "changed",
    [
        tree({"saved_model.pb": (1, SHA_B)}),  # content
        tree({"saved_model.pb": (2, SHA_A)}),  # size
        tree({"saved_model.pbtxt": (1, SHA_A)}),  # name
        tree({"saved_model.pb": (1, SHA_A)}, {"assets/x": "../saved_model.pb"}),  # a link more
    ],
)
def test_any_change_to_a_member_changes_the_digest(changed: TreeListing) -> None:
    assert changed.digest() != tree({"saved_model.pb": (1, SHA_A)}).digest()


def test_a_newline_in_a_path_cannot_forge_another_trees_digest() -> None:
    """Version 1 joined `f <path> <size> <sha>` lines, so one file's name could spell two files."""
    two_files = tree({"a": (1, SHA_A), "b": (1, SHA_B)})
    forged = tree({f"a 1 {SHA_A}\nf b": (1, SHA_B)})
    assert forged.legacy_digest() == two_files.legacy_digest()  # the hole version 2 closes
    assert forged.digest() != two_files.digest()
    assert forged.name_problems()  # and such a name is refused anyway


def test_the_manifest_survives_its_json_form() -> None:
    original = tree({"saved_model.pb": (1, SHA_A)}, {"assets/link": "../saved_model.pb"})
    original.dirs.add("assets/empty")
    again = TreeListing.from_json(original.to_json())
    assert again == original and again.digest() == original.digest()


def test_all_dirs_includes_the_ones_only_implied_by_deeper_members() -> None:
    listing = tree({"a/b/c.txt": (1, SHA_A)}, {"d/e": "../a/b/c.txt"})
    listing.dirs.add("f/g")
    assert listing.all_dirs() == {"", "a", "a/b", "d", "f", "f/g"}


@pytest.mark.parametrize(
    ("links", "why"),
    [
        ({"assets/x": "../../etc/passwd"}, "leaves the model directory"),
        ({"assets/x": "/etc/passwd"}, "absolute link target"),
        ({"assets/x": "nothing-here"}, "points at nothing in the model"),
        ({"a": "b", "b": "a"}, "too many levels of links"),
        ({"assets/x": "../saved_model.pb/inside"}, "goes through a file as if it were a directory"),
        # two links that each stay inside but together climb out: judged through the tree, not lexically
        ({"assets/up": "..", "assets/out": "up/../etc"}, "leaves the model directory"),
    ],
)
def test_links_that_leave_loop_or_dangle_are_problems(links: dict[str, str], why: str) -> None:
    problems = tree({"saved_model.pb": (1, SHA_A)}, links).link_problems()
    assert any(why in problem for problem in problems), problems


@pytest.mark.parametrize("name", ["saved_model.pb", "fingerprint.pb", "variables", "variables/variables.index"])
def test_the_files_tensorflow_loads_may_not_be_links(name: str) -> None:
    listing = tree({"real.pb": (1, SHA_A)}, {name: "real.pb"})
    assert listing.link_problems() == [f"{name!r}: must be a regular file or directory, not a link"]


def test_links_that_stay_inside_the_tree_are_fine() -> None:
    listing = tree(
        {"saved_model.pb": (1, SHA_A), "assets/vocab.txt": (1, SHA_B)},
        {"assets/alias.txt": "vocab.txt", "assets/dir": ".", "top.txt": "assets/dir/alias.txt"},
    )
    assert listing.link_problems() == []


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "nul\x00", "del\x7f"])
def test_control_characters_in_names_are_problems(name: str) -> None:
    assert tree({name: (1, SHA_A)}).name_problems() == [f"{name!r}: control character in a name"]
    assert tree({"ok": (1, SHA_A)}, {"link": name}).link_problems() != []
