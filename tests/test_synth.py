"""The synthetic collection: determinism, annotations that match pixels and captions."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from app.cli import main
from collection.layout import Collection
from collection.synth import COLOURS, MAX_MOTIF, MIN_MOTIF, render, synthesise


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "c"
    synthesise(root, n=20, seed=5, progress=False)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(synth_root: Path, tmp_path: Path) -> None:
    synthesise(tmp_path / "again", n=20, seed=5, progress=False)
    first, second = _tree(synth_root), _tree(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    assert len([n for n in first if n.startswith("images/")]) == 20


def test_another_seed_gives_other_images() -> None:
    assert render(5, 0).image.tobytes() != render(6, 0).image.tobytes()
    assert render(5, 0).image.tobytes() == render(5, 0).image.tobytes()


def test_output_is_a_valid_collection_with_voc_and_caption_data(synth_root: Path) -> None:
    collection = Collection.load(synth_root)
    assert len(collection) == 20
    captions = json.loads((synth_root / "caption_data.json").read_text())["images"]
    assert [c["filename"] for c in captions] == [Path(a.image).name for a in collection.artworks]
    for artwork, entry in zip(collection.artworks, captions, strict=True):
        assert entry["filepath"] == artwork.split
        assert [s["raw"] for s in entry["sentences"]] == artwork.captions
        assert all(s["tokens"] for s in entry["sentences"])
        assert 1 <= len(artwork.captions) <= 5
        assert 1 <= len(artwork.annotations) <= 4
        voc = ElementTree.parse(synth_root / "annotations" / f"{artwork.id}.xml").getroot()
        objects = voc.findall("object")
        assert [o.findtext("name") for o in objects] == [a.phrase for a in artwork.annotations]
        for node, annotation in zip(objects, artwork.annotations, strict=True):
            box = [float(node.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert box == list(annotation.box)
        for annotation in artwork.annotations:
            # the phrase is named in a caption and is one of the artwork's phrases
            assert annotation.phrase in artwork.phrases
            assert any(annotation.phrase in c.lower() for c in artwork.captions)


def test_motif_groups_are_sized_placed_and_coloured_as_annotated() -> None:
    for index in range(12):
        art = render(11, index)
        pixels = np.asarray(art.image, dtype=np.int32)  # (256, 256, 3)
        boxes = [g.box for g in art.groups]
        for group in art.groups:
            x1, y1, x2, y2 = group.box
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            # one motif is at least the minimum size and no larger than the maximum
            assert max(x2 - x1, y2 - y1) >= MIN_MOTIF * 256 * 0.5
            assert min(x2 - x1, y2 - y1) <= MAX_MOTIF * 256 + 2
            # a good share of the box is painted in the group's colour (lit and noisy)
            crop = pixels[y1:y2, x1:x2]
            distance = np.abs(crop - np.array(COLOURS[group.colour])).sum(axis=-1)
            assert (distance < 90).mean() > 0.1, (index, group.phrase)
        for i, a in enumerate(boxes):  # groups never overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_phrases_recur_and_combine_across_images() -> None:
    phrases = [g.phrase for index in range(60) for g in render(2, index).groups]
    assert len(set(phrases)) > 40  # colours x motifs x counts combine freely
    motifs = {p.split()[-1] for p in phrases}
    assert len(motifs) >= 10
    assert any(p.startswith(("two ", "three ")) for p in phrases)


def test_cli_synth_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "1"]) == 0
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "1"]) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--n", "4", "--seed", "1", "--force"]) == 0
    assert len(Collection.load(out)) == 4
