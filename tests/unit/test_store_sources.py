"""Listing sources, listings and verification sets on an object store: the pure layout rules (the
same read from a real S3 server and from a local disk: tests/integration/test_store_sources_s3.py)."""

from __future__ import annotations

from distill.embed.listing import resolve_list_path
from distill.folders import tree_of


def test_a_tree_known_by_its_keys_follows_the_local_folder_rules():
    tree = tree_of(["bob/b.jpg", "bob/a.jpg", "bob/.hidden.jpg", "bob/notes.txt", "bob/sess2/c.jpg",
                    "bob/.cache/x.jpg", "alice/10.png", "alice/9.png", "docs/README", ".trash/z.jpg",
                    "loose.jpg", "README", "bob/"])  # (a `dir/` marker key, as some tools write)
    assert tree.names == ("alice", "bob", "docs")  # docs holds no image: an identity with none, as locally
    assert tree.files == (("alice/10.png", "alice/9.png"), ("bob/a.jpg", "bob/b.jpg", "bob/sess2/c.jpg"), ())
    assert tree.loose == ("loose.jpg",) and tree.skipped == 3
    flat = tree_of(["b.jpg", "a.PNG", ".h.jpg", "Thumbs.db"])
    assert (flat.names, flat.loose, flat.skipped) == ((), ("a.PNG", "b.jpg"), 1)


def test_list_entries_resolve_against_a_list_on_the_store_and_uris_are_kept():
    base = "s3://bkt/lists"
    assert resolve_list_path(base, "imgs/a.jpg") == "s3://bkt/lists/imgs/a.jpg"
    assert resolve_list_path(base, "../faces/./b.jpg") == "s3://bkt/faces/b.jpg"
    assert resolve_list_path(base, "/data/c.jpg") == "/data/c.jpg"  # a local path on every node
    assert resolve_list_path("/lists", "s3://other/d.jpg") == "s3://other/d.jpg"  # a local list of URIs
    assert resolve_list_path("/lists", "file:///data/e.jpg") == "/data/e.jpg"
