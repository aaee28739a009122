"""The collection layout: writing atomically, loading with line-precise errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from collection.layout import (
    Annotation,
    Artwork,
    Collection,
    CollectionError,
    CollectionWriter,
    split_for,
)


def _artwork(index: int, *, phrases: list[str], captions: list[str] | None = None) -> Artwork:
    return Artwork(
        id=f"a{index}", image=f"images/a{index}.png", sha256=f"{index:064d}", width=8, height=6,
        split="train", title=f"artwork {index}", metadata={"source": "test"},
        captions=captions or [f"A vase number {index}."], phrases=phrases,
        annotations=[Annotation(phrases[0], (1.0, 1.0, 5.0, 4.0))] if phrases else [],
    )


def _write(target: Path, artworks: list[Artwork], force: bool = False) -> dict:
    with CollectionWriter(target, name="test", source="unit test", force=force) as writer:
        for artwork in artworks:
            Image.new("RGB", (8, 6), (200, 30, 30)).save(writer.root / artwork.image)
            writer.add(artwork)
    return writer.counts


def test_round_trip_and_vocabulary_min_counts(tmp_path: Path) -> None:
    # "blue vase" describes 4 artworks (kept, min count 4); "gold bird" only 3 (dropped).
    artworks = [_artwork(i, phrases=["blue vase", "gold bird"] if i < 3 else ["blue vase"],
                         captions=[f"A blue vase {'once' if i == 0 else 'twice'}."])
                for i in range(4)]
    counts = _write(tmp_path / "c", artworks)
    assert counts["artworks"] == 4 and counts["annotations"] == 4

    collection = Collection.load(tmp_path / "c")
    assert [a.id for a in collection.artworks] == ["a0", "a1", "a2", "a3"]
    assert collection.artworks[0] == artworks[0]
    assert collection.image_path(collection["a1"]).is_file()
    assert len(collection.split("train")) == 4 and collection.split("test") == []
    assert "blue vase" in collection.phrase_vocab and "gold bird" not in collection.phrase_vocab
    # words: min count 2 over caption tokens; "once" appears once
    assert "twice" in collection.word_vocab and "once" not in collection.word_vocab
    info = json.loads((tmp_path / "c" / "collection.json").read_text())
    assert info["format"] == "artalign-collection" and info["version"] == 1


def test_existing_target_needs_force_and_is_replaced_only_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "c"
    _write(target, [_artwork(1, phrases=["red bowl"])])
    with pytest.raises(CollectionError, match="already exists"):
        _write(target, [_artwork(2, phrases=["red bowl"])])

    with pytest.raises(RuntimeError):
        with CollectionWriter(target, name="t", source="s", force=True) as writer:
            writer.add(_artwork(3, phrases=["red bowl"]))
            raise RuntimeError("import failed half way")
    assert [a.id for a in Collection.load(target).artworks] == ["a1"]  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left

    _write(target, [_artwork(4, phrases=["red bowl"])], force=True)
    assert [a.id for a in Collection.load(target).artworks] == ["a4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_writer_refuses_an_empty_collection(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="nothing to write"):
        with CollectionWriter(tmp_path / "empty", name="t", source="s"):
            pass
    assert not (tmp_path / "empty").exists()


def _corrupt(tmp_path: Path, edit) -> Path:
    target = tmp_path / "c"
    _write(target, [_artwork(1, phrases=["red bowl"]), _artwork(2, phrases=["red bowl"])])
    path = target / "artworks.jsonl"
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    path.write_text("\n".join(edit(records, lines)) + "\n")
    return target


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r, lines: [lines[0], "{not json"], r"artworks.jsonl:2: not valid JSON"),
    (lambda r, lines: [lines[0], json.dumps({k: v for k, v in r[1].items() if k != "split"})],
     r"artworks.jsonl:2: field 'split' is missing"),
    (lambda r, lines: [json.dumps({**r[0], "split": "dev"}), lines[1]],
     r"artworks.jsonl:1: field 'split' must be one of"),
    (lambda r, lines: [lines[0], json.dumps({**r[1], "id": "a1"})],
     r"artworks.jsonl:2: id 'a1' repeats line 1"),
    (lambda r, lines: [lines[0], json.dumps({**r[1], "image": "images/gone.png"})],
     r"artworks.jsonl:2: image file images/gone.png does not exist"),
    (lambda r, lines: [lines[0], json.dumps({**r[1], "captions": ["ok", " "]})],
     r"artworks.jsonl:2: field 'captions' holds an empty caption"),
    (lambda r, lines: [lines[0], json.dumps({**r[1], "annotations": [{"phrase": "x",
                                                                       "box": [5, 1, 2, 4]}]})],
     r"artworks.jsonl:2: annotations\[0\] box"),
    (lambda r, lines: [lines[0], json.dumps({**r[1], "width": "wide"})],
     r"artworks.jsonl:2: field 'width' has the wrong type"),
    (lambda r, lines: [lines[0], ""], r"artworks.jsonl:2: empty line"),
])
def test_load_names_file_line_and_field(tmp_path: Path, edit, message: str) -> None:
    target = _corrupt(tmp_path, edit)
    with pytest.raises(CollectionError, match=message):
        Collection.load(target)


def test_load_checks_collection_json_and_vocab(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="not a collection"):
        Collection.load(tmp_path)
    target = tmp_path / "c"
    _write(target, [_artwork(1, phrases=["red bowl"])])
    info = json.loads((target / "collection.json").read_text())
    (target / "collection.json").write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(CollectionError, match="version 99 is not supported"):
        Collection.load(target)
    (target / "collection.json").write_text(json.dumps(info))
    (target / "vocab.json").write_text(json.dumps({"words": ["a"]}))
    with pytest.raises(CollectionError, match="vocab.json"):
        Collection.load(target)


def test_split_by_id_hash_is_deterministic_and_80_10_10() -> None:
    ids = [f"MET_{i}" for i in range(3000)]
    assert [split_for(i) for i in ids] == [split_for(i) for i in ids]
    counts = Counter(split_for(i) for i in ids)
    assert 0.76 < counts["train"] / 3000 < 0.84
    assert 0.07 < counts["val"] / 3000 < 0.13 and 0.07 < counts["test"] / 3000 < 0.13


def test_cli_vocab_rebuilds_with_other_min_counts(tmp_path: Path, capsys) -> None:
    from app.cli import main

    target = tmp_path / "c"
    _write(target, [_artwork(i, phrases=["blue vase"] if i < 2 else ["blue vase", "gold bird"])
                    for i in range(3)])
    assert "blue vase" not in Collection.load(target).phrase_vocab  # 3 artworks < 4
    assert main(["vocab", str(target), "--phrase-min-count", "2"]) == 0
    assert "5 phrases" in capsys.readouterr().out  # 4 specials + "blue vase"
    collection = Collection.load(target)
    assert collection.phrase_vocab.tokens[4:] == ["blue vase"]
    assert collection.info["counts"]["phrase_vocab"] == 5
