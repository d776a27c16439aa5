"""Manifest lines -> work items (pipeline/manifest.py): parsing, source resolution, line reading, de-duplication."""

import gzip
import os

import pytest

from pipeline import manifest
from pipeline.manifest import DeadLetter, Item, Line, dedup, expand_manifests, parse_line, read_lines, resolve_source


def _line(data: bytes, path="/data/m.tsv", number=7) -> Line:
    return Line(path, number, data)


def test_a_good_line_becomes_an_item_resolved_against_the_manifest_folder():
    item = parse_line(_line(b"gifs/a.gif\t  a cat jumps .  \textra\tcolumns"))
    assert isinstance(item, Item)
    assert item.source == "/data/gifs/a.gif"
    assert item.name == "gifs/a.gif"
    assert item.caption == "a cat jumps ."
    assert (item.manifest, item.line) == ("/data/m.tsv", 7)


@pytest.mark.parametrize(
    ("name", "manifest_path", "resolved"),
    [
        ("https://x.example/a.gif", "/data/m.tsv", "https://x.example/a.gif"),
        ("gs://bucket/a.gif", "/data/m.tsv", "gs://bucket/a.gif"),
        ("/abs/./a.gif", "/data/m.tsv", "/abs/a.gif"),
        ("./gifs/../gifs/a.gif", "/data/m.tsv", "/data/gifs/a.gif"),
        ("gifs/a.gif", "gs://bucket/sets/m.tsv", "gs://bucket/sets/gifs/a.gif"),
    ],
)
def test_sources_resolve(name, manifest_path, resolved):
    assert resolve_source(name, manifest_path) == resolved


@pytest.mark.parametrize(
    ("data", "reason", "source", "caption"),
    [
        (b"", "blank line", "", ""),
        (b"   ", "blank line", "", ""),
        (b"gifs/a.gif a cat", "malformed line (no tab)", "gifs/a.gif a cat", ""),
        (b"gifs/a.gif\t   ", "blank caption", "gifs/a.gif", ""),
        (b"\ta cat", "blank source", "", "a cat"),
        (b"gifs/a.gif\ta caf\xe9", "non-UTF-8 text", "gifs/a.gif", "a caf\ufffd"),
    ],
)
def test_bad_lines_become_dead_letters_with_a_reason(data, reason, source, caption):
    dead = parse_line(_line(data))
    assert isinstance(dead, DeadLetter)
    assert (dead.stage, dead.reason, dead.source, dead.caption) == ("manifest", reason, source, caption)
    assert (dead.manifest, dead.line) == ("/data/m.tsv", 7)


def test_key_depends_on_the_source_as_written_and_the_caption_only():
    a = parse_line(_line(b"gifs/a.gif\ta cat", path="/one/m.tsv", number=1))
    moved = parse_line(_line(b"gifs/a.gif\ta cat", path="/elsewhere/m.tsv", number=9))
    other_caption = parse_line(_line(b"gifs/a.gif\ta dog", path="/one/m.tsv", number=1))
    assert a.source != moved.source and a.key == moved.key
    assert a.key != other_caption.key
    assert len(a.key) == 32


def test_read_lines_numbers_lines_and_handles_crlf_and_a_missing_final_newline(tmp_path, monkeypatch):
    path = tmp_path / "m.tsv"
    path.write_bytes(b"a.gif\tone\r\nb.gif\ttwo \xff\r\n\nc.gif\tthree")
    monkeypatch.setattr(manifest, "_READ_CHUNK", 5)  # lines straddle chunk boundaries
    lines = list(read_lines(str(path)))
    assert [(x.number, x.data) for x in lines] == [
        (1, b"a.gif\tone"),
        (2, b"b.gif\ttwo \xff"),
        (3, b""),
        (4, b"c.gif\tthree"),
    ]
    assert all(x.manifest == str(path) for x in lines)


def test_a_carriage_return_inside_a_caption_does_not_split_the_line(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_bytes(b"a.gif\tone\rtwo\n")
    assert [x.data for x in read_lines(str(path))] == [b"a.gif\tone\rtwo"]


def test_gzipped_manifests_are_read(tmp_path):
    path = tmp_path / "m.tsv.gz"
    path.write_bytes(gzip.compress(b"a.gif\tone\nb.gif\ttwo\n"))
    assert [x.data for x in read_lines(str(path))] == [b"a.gif\tone", b"b.gif\ttwo"]


def test_expand_manifests_globs_sorts_and_makes_paths_absolute(tmp_path, monkeypatch):
    for name in ("b.tsv", "a.tsv", "notes.txt"):
        (tmp_path / name).write_text("x\ty\n")
    monkeypatch.chdir(tmp_path)
    assert expand_manifests(["*.tsv", "a.tsv"]) == [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]
    assert all(os.path.isabs(p) for p in expand_manifests(["*.tsv"]))


def test_expand_manifests_names_a_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        expand_manifests([str(tmp_path / "*.tsv")])


def test_dedup_keeps_the_first_occurrence_of_each_caption_whatever_the_order():
    def item(manifest_path, line, caption):
        return Item("/d/a.gif", "a.gif", caption, manifest_path, line)

    items = [item("/m2.tsv", 1, "a cat"), item("/m1.tsv", 9, "a cat"), item("/m1.tsv", 3, "a dog")]
    for ordering in (items, items[::-1]):
        unique, duplicates = dedup(ordering)
        assert [(i.manifest, i.line) for i in unique] == [("/m1.tsv", 3), ("/m1.tsv", 9)]
        assert [(i.manifest, i.line) for i in duplicates] == [("/m2.tsv", 1)]
