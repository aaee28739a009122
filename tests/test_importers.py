"""Importers: thesis format, museum CSV (real Egyptian rows), SCAN precomputed features."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from collection.importers import (
    CsvMapping,
    import_csv,
    import_scan_features,
    import_thesis,
    import_voc,
)
from collection.layout import Collection, CollectionError, split_for

EGYPTIAN = Path(__file__).resolve().parents[2] / "shared/data/egyptian-cc0"


# ---------------------------------------------------------------------------- thesis
def _voc(boxes: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in boxes)
    return f"<annotation><filename>x</filename>{objects}</annotation>"


@pytest.fixture()
def thesis_source(tmp_path: Path) -> Path:
    """Three artworks (the third a byte copy of the first) in the thesis's layout."""
    source = tmp_path / "thesis"
    (source / "images").mkdir(parents=True)
    (source / "xml").mkdir()
    for name, colour in (("vase1", (200, 20, 20)), ("bowl2", (20, 20, 200))):
        Image.new("RGB", (40, 30), colour).save(source / "images" / f"{name}.jpg")
    shutil.copy(source / "images" / "vase1.jpg", source / "images" / "copy3.jpg")
    (source / "xml" / "vase1.xml").write_text(_voc([("The Two gold birds", (2, 3, 20, 25)),
                                                    ("red lotus", (25, 5, 60, 29))]))
    sentences = [{"raw": f"A red vase with two gold birds, view {i}."} for i in range(7)]
    (source / "caption_data.json").write_text(json.dumps({"images": [
        {"filename": "vase1.jpg", "filepath": "val", "sentences": sentences},
        {"filename": "bowl2.jpg", "filepath": "train",
         "sentences": [{"raw": "", "tokens": ["a", "blue", "bowl"]}]},
        {"filename": "copy3.jpg", "filepath": "test", "sentences": [{"raw": "A copy."}]},
    ]}))
    return source


def _thesis(source: Path, out: Path, **options) -> dict:
    return import_thesis(out, captions=source / "caption_data.json", images=source / "images",
                         annotations=source / "xml", **options)


def test_thesis_import(thesis_source: Path, tmp_path: Path) -> None:
    counts = _thesis(thesis_source, tmp_path / "c")
    collection = Collection.load(tmp_path / "c")
    assert [a.id for a in collection.artworks] == ["vase1", "bowl2"]  # copy3: same bytes
    assert counts["skipped"] == 1
    skipped = json.loads((tmp_path / "c" / "skipped.json").read_text())
    assert "copy3.jpg" in skipped[0]["where"] and "'vase1'" in skipped[0]["reason"]
    vase = collection["vase1"]
    assert vase.split == "val" and (vase.width, vase.height) == (40, 30)
    assert len(vase.captions) == 5  # at most five sentences, as in the thesis
    assert [(a.phrase, a.box) for a in vase.annotations] == [
        ("two gold birds", (2.0, 3.0, 20.0, 25.0)),
        ("red lotus", (25.0, 5.0, 40.0, 29.0)),  # clipped to the 40 px wide image
    ]
    assert "two gold birds" in vase.phrases and "red vase" in vase.phrases
    assert collection["bowl2"].captions == ["a blue bowl"]  # tokens when raw is empty
    assert (tmp_path / "c" / "annotations" / "vase1.xml").is_file()
    assert collection.image_path(vase).read_bytes() == \
        (thesis_source / "images" / "vase1.jpg").read_bytes()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda s: (s / "images" / "bowl2.jpg").write_bytes(b"\xff\xd8\xff garbage"),
     r"bowl2.jpg: corrupt or truncated image|bowl2.jpg: not an image"),
    (lambda s: (s / "images" / "bowl2.jpg").unlink(), r"bowl2.jpg: no such file"),
    (lambda s: (s / "xml" / "bowl2.xml").write_text("<annotation><object>\n<name>x</name"),
     r"bowl2.xml:2: not valid XML"),
    (lambda s: (s / "xml" / "bowl2.xml").write_text(
        "<annotation><object><name>x</name><bndbox><xmin>1</xmin></bndbox></object>"
        "</annotation>"), r"bowl2.xml: <object> 1 \('x'\): <bndbox><ymin> is missing"),
])
def test_thesis_bad_input_stops_or_is_skipped(thesis_source: Path, tmp_path: Path, damage,
                                              message: str) -> None:
    damage(thesis_source)
    with pytest.raises(CollectionError, match=message):
        _thesis(thesis_source, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # never half-written
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no temporary folder left

    _thesis(thesis_source, tmp_path / "c", skip_bad=True)
    assert [a.id for a in Collection.load(tmp_path / "c").artworks] == ["vase1"]
    skipped = json.loads((tmp_path / "c" / "skipped.json").read_text())
    assert any("bowl2" in s["where"] or "bowl2" in s["reason"] for s in skipped)


def test_thesis_empty_sentence_names_the_entry(thesis_source: Path, tmp_path: Path) -> None:
    data = json.loads((thesis_source / "caption_data.json").read_text())
    data["images"][0]["sentences"][2] = {"raw": "  ", "tokens": []}
    (thesis_source / "caption_data.json").write_text(json.dumps(data))
    with pytest.raises(CollectionError, match=r"images\[0\] \(vase1.jpg\): sentence 2 is empty"):
        _thesis(thesis_source, tmp_path / "c")


# ---------------------------------------------------------------------------- csv
def _egyptian_subset(tmp_path: Path, n: int) -> tuple[Path, list[dict[str, str]]]:
    if not (EGYPTIAN / "metadata.csv").is_file():
        pytest.skip(f"real data not found at {EGYPTIAN} (clone shared/ beside the repo)")
    with open(EGYPTIAN / "metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [row for _, row in zip(range(n), reader, strict=False)]
        header = reader.fieldnames
    path = tmp_path / "export.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


MAPPING = CsvMapping(id_column="ID", caption_columns=("Title", "ObjectName", "Medium", "Period"),
                     image_pattern="{id}.jpg")


def test_csv_import_of_real_egyptian_rows(tmp_path: Path) -> None:
    path, rows = _egyptian_subset(tmp_path, 12)
    import_csv(tmp_path / "c", csv_path=path, images=EGYPTIAN / "images", mapping=MAPPING)
    collection = Collection.load(tmp_path / "c")
    by_id = {a.id: a for a in collection.artworks}
    for row in rows:
        if row["ID"] not in by_id:  # a duplicate image of an earlier row
            continue
        artwork = by_id[row["ID"]]
        assert artwork.title == " ".join(row["Title"].split())
        assert artwork.metadata == {"source": row["Source"],
                                    "classification": row["Classification"],
                                    "imageurl": row["ImageURL"]}
        assert artwork.captions[0] == " ".join(row["Title"].split())
        assert (artwork.width, artwork.height) == (224, 224)
    box = by_id["CLE_94136"]
    assert box.captions == ["Paint Box of Vizier Amenemope", "Implements",
                            "boxwood with inscription inlaid in Egyptian blue", "c. 1427–1401 BCE"]
    assert {"paint box", "egyptian blue"} <= set(box.phrases)
    assert not any(ch.isdigit() for a in collection.artworks for p in a.phrases for ch in p)


def test_csv_import_through_the_cli(tmp_path: Path) -> None:
    path, _ = _egyptian_subset(tmp_path, 4)
    assert main(["import", "csv", "--csv", str(path), "--images", str(EGYPTIAN / "images"),
                 "--out", str(tmp_path / "c"), "--caption-columns", "Title,Medium"]) == 0
    artwork = Collection.load(tmp_path / "c").artworks[0]
    assert artwork.captions == ["Bull's-Head Amulet", "amethyst"]
    assert "period" in artwork.metadata and "objectname" in artwork.metadata


def _with_bad_row(tmp_path: Path, bad: bytes) -> Path:
    """Three good real rows (header on line 1), then the bad row on line 5."""
    path, _ = _egyptian_subset(tmp_path, 3)
    path.write_bytes(path.read_bytes() + bad + b"\r\n")
    return path


@pytest.mark.parametrize(("bad", "message"), [
    (b"CLE_1,Cleveland Museum of Art,Short row", r"export.csv:5: row has 3 fields, the header "
                                                  r"has 8 \(missing ObjectName"),
    (b"CLE_3,x,Caf\xe9 jar,Jar,clay,,Pottery,u",
     r"export.csv:5: not UTF-8 text \(byte 0xe9"),
    (b"CLE_2,x,,,,,Pottery,u", r"export.csv:5: no caption text: columns Title, ObjectName"),
    (b"NOPE_1,x,A jar,Jar,clay,,Pottery,u", r"export.csv:5: image .*NOPE_1.jpg: no such file"),
    (b"CLE_160425,x,A jar,Jar,clay,,Pottery,u", r"export.csv:5: id 'CLE_160425' repeats line 2"),
])
def test_csv_bad_rows_name_file_and_line(tmp_path: Path, bad: bytes, message: str) -> None:
    path = _with_bad_row(tmp_path, bad)
    with pytest.raises(CollectionError, match=message):
        import_csv(tmp_path / "c", csv_path=path, images=EGYPTIAN / "images", mapping=MAPPING)
    assert not (tmp_path / "c").exists()

    counts = import_csv(tmp_path / "c", csv_path=path, images=EGYPTIAN / "images",
                        mapping=MAPPING, skip_bad=True)
    assert counts["artworks"] == 3 and counts["skipped"] == 1
    skipped = json.loads((tmp_path / "c" / "skipped.json").read_text())
    assert skipped[0]["where"].endswith("export.csv:5")


def test_csv_line_numbers_count_multi_line_fields(tmp_path: Path) -> None:
    path, _ = _egyptian_subset(tmp_path, 2)
    header, first, second = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # the second row's title now spans lines 3-4, so the bad row starts on line 5
    second = second.replace("Paint Box of Vizier Amenemope", '"Paint Box\nof Vizier Amenemope"')
    path.write_text(header + first + second + "CLE_9,x,,,,,P,u\n", encoding="utf-8")
    with pytest.raises(CollectionError, match=r"export.csv:5: no caption text"):
        import_csv(tmp_path / "c", csv_path=path, images=EGYPTIAN / "images", mapping=MAPPING)


def test_csv_missing_column_is_named(tmp_path: Path) -> None:
    path, _ = _egyptian_subset(tmp_path, 2)
    mapping = CsvMapping(id_column="ID", caption_columns=("Title", "Description"))
    with pytest.raises(CollectionError, match=r"export.csv:1: column\(s\) Description not in"):
        import_csv(tmp_path / "c", csv_path=path, images=EGYPTIAN / "images", mapping=mapping)


# ---------------------------------------------------------------------------- scan-features
def test_scan_features_import_writes_a_feature_store(tmp_path: Path) -> None:
    from index.featurestore import FeatureStore

    rng = np.random.default_rng(0)
    train = rng.normal(size=(3, 36, 16)).astype(np.float32)  # (N, regions, D)
    np.save(tmp_path / "train_ims.npy", train)
    (tmp_path / "train_caps.txt").write_text(
        "\n".join(f"a man rides horse number {i} on a beach" for i in range(15)) + "\n")
    # dev: each image repeated once per caption, as SCAN's COCO files do
    dev = np.repeat(rng.normal(size=(1, 36, 16)).astype(np.float32), 5, axis=0)
    np.save(tmp_path / "dev_ims.npy", dev)
    (tmp_path / "dev_caps.txt").write_text(
        "\n".join(f"two dogs play with ball {i}" for i in range(5)) + "\n")

    counts = import_scan_features(tmp_path / "c", data=tmp_path, splits=("train", "dev"))
    assert counts["artworks"] == 4 and counts["train"] == 3 and counts["val"] == 1
    collection = Collection.load(tmp_path / "c")
    assert all(a.image is None for a in collection.artworks)
    assert collection["train-000001"].captions[0] == "a man rides horse number 5 on a beach"
    assert len(collection["dev-000000"].captions) == 5  # merged from the 5 repeated rows
    store = FeatureStore(tmp_path / "c" / "features")
    assert sorted(store.keys()) == sorted(a.id for a in collection.artworks)
    record = store.get("train-000002")
    assert record.features.shape == (37, 16) and list(record.kinds[:2]) == [0, 1]
    np.testing.assert_allclose(record.features[1:], train[2], atol=1e-2)  # float16 store
    np.testing.assert_allclose(record.features[0], train[2].mean(0), atol=1e-2)


def test_scan_features_caption_count_mismatch_is_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 36, 8), np.float32))
    (tmp_path / "test_caps.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(CollectionError, match=r"test_caps.txt: 3 captions for 2 images"):
        import_scan_features(tmp_path / "c", data=tmp_path, splits=("test",))
    assert not (tmp_path / "c").exists()


def test_thesis_import_of_a_synthetic_collection_keeps_its_annotations(tmp_path: Path) -> None:
    from collection.synth import synthesise

    synthesise(tmp_path / "synth", n=6, seed=3, progress=False)
    source = tmp_path / "synth"
    import_thesis(tmp_path / "c", captions=source / "caption_data.json",
                  images=source / "images", annotations=source / "annotations")
    original, imported = Collection.load(source), Collection.load(tmp_path / "c")
    for before, after in zip(original.artworks, imported.artworks, strict=True):
        assert (after.id, after.split, after.sha256) == (before.id, before.split, before.sha256)
        assert after.captions == before.captions
        assert after.annotations == before.annotations
        assert after.phrases == before.phrases


def test_scan_features_empty_caption_names_the_line(tmp_path: Path) -> None:
    np.save(tmp_path / "test_ims.npy", np.ones((1, 36, 8), np.float32))
    (tmp_path / "test_caps.txt").write_text("a cat\na dog\n \na bird\na fish\n")
    with pytest.raises(CollectionError, match=r"test_caps.txt:3: empty caption"):
        import_scan_features(tmp_path / "c", data=tmp_path, splits=("test",))
    import_scan_features(tmp_path / "c", data=tmp_path, splits=("test",), skip_bad=True)
    assert Collection.load(tmp_path / "c")["test-000000"].captions == [
        "a cat", "a dog", "a bird", "a fish"]


# ---------------------------------------------------------------------------- voc
BYZART = Path(__file__).resolve().parents[2] / "shared/data/byzart-dev"


def _icons(split: str, n: int) -> list[Path]:
    """``n`` real icons of byzart-dev's ``split`` folder, those with an underscore label first."""
    if not (BYZART / split).is_dir():
        pytest.skip(f"real data not found at {BYZART} (clone shared/ beside the repo)")
    xml = sorted((BYZART / split).glob("*.xml"), key=lambda p: ("_</name>" not in p.read_text(), p.name))
    return [p.with_suffix(".jpg") for p in xml[:n]]


@pytest.fixture()
def voc_source(tmp_path: Path) -> Path:
    """Three real train icons and two valid ones, in the source's train/ and valid/ folders."""
    source = tmp_path / "voc"
    for split, n in (("train", 3), ("valid", 2)):
        (source / split).mkdir(parents=True)
        for image in _icons(split, n):
            for path in (image, image.with_suffix(".xml")):
                shutil.copy(path, source / split / path.name)
    return source


def test_voc_import_of_real_icons(voc_source: Path, tmp_path: Path) -> None:
    counts = import_voc(tmp_path / "c", source=voc_source)
    collection = Collection.load(tmp_path / "c")
    assert (counts["train"], counts["val"], counts["test"]) == (3, 2, 0)
    for artwork in collection.artworks:
        folder = "train" if artwork.split == "train" else "valid"
        xml = (voc_source / folder / artwork.image.split("/")[-1]).with_suffix(".xml").read_text()
        assert len(artwork.annotations) == xml.count("<object>")
        assert artwork.captions == []
        assert set(artwork.phrases) == {a.phrase for a in artwork.annotations}
    phrases = {p for a in collection.artworks for p in a.phrases}
    assert not any("_" in p for p in phrases) and any(" " in p for p in phrases)
    # No captions: the labels' words make the word vocabulary, so phrases can be encoded.
    assert "aura" in collection.word_vocab


def test_voc_flat_folder_splits_by_hash(tmp_path: Path) -> None:
    source = tmp_path / "flat"
    source.mkdir()
    for number in range(6):
        Image.new("RGB", (40, 30), (40 * number, 20, 20)).save(source / f"icon{number}.png")
        (source / f"icon{number}.xml").write_text(_voc([("christ_child", (2, 3, 20, 25))]))
    import_voc(tmp_path / "c", source=source)
    artworks = Collection.load(tmp_path / "c").artworks
    assert [a.split for a in artworks] == [split_for(f"icon{n}") for n in range(6)]
    assert artworks[0].phrases == ["christ child"]


@pytest.mark.parametrize(("xml", "message"), [
    ("<annotation><object><name>aura</name>", r"bad\.xml:1: not valid XML"),
    ("", r"bad\.xml:1: not valid XML"),
    ("<annotation></annotation>", r"bad\.xml: no <object> boxes"),
    (_voc([("aura", (5, 5, 5, 9))]), r"bad\.xml: <object> 1 \('aura'\): box .* is empty"),
    (_voc([("", (1, 1, 9, 9))]), r"bad\.xml: <object> 1 has an empty <name>"),
])
def test_voc_bad_xml_names_the_file(voc_source: Path, tmp_path: Path, xml: str,
                                    message: str) -> None:
    Image.new("RGB", (40, 30), (9, 9, 9)).save(voc_source / "train" / "bad.jpg")
    (voc_source / "train" / "bad.xml").write_text(xml)
    with pytest.raises(CollectionError, match=message) as error:
        import_voc(tmp_path / "c", source=voc_source)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "c").exists()

    counts = import_voc(tmp_path / "c", source=voc_source, skip_bad=True)
    assert (counts["artworks"], counts["skipped"]) == (5, 1)


def test_voc_summary_lists_suspicious_labels(tmp_path: Path, capsys) -> None:
    source = tmp_path / "flat"
    source.mkdir()
    labels = [["saint_george", "aura"], ["st_george", "aura"],
              ["roboflow is a computer vision platform", "aura"]]
    for number, names in enumerate(labels):
        Image.new("RGB", (40, 30), (60 * number, 20, 20)).save(source / f"icon{number}.jpg")
        (source / f"icon{number}.xml").write_text(_voc([(n, (2, 3, 20, 25)) for n in names]))
    assert main(["import", "voc", "--source", str(source), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "sentence long (1): roboflow is a computer vision platform" in out
    assert "near duplicates (1): saint george / st george" in out
    assert "single box (3)" in out and "aura" not in out.split("single box")[1]
