"""Ingestion: create, idempotency, replace, delete, annotations, and no partial artwork
after a failure — on SQLite and on PostgreSQL, with a real (tiny) region extractor."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from app.db.models import Annotation, Artwork, ArtworkPhrase, Caption, Fragment, Phrase, Region
from app.services import artwork_rows
from app.services.collection_ingest import ingest_collection
from app.services.ingest import delete_artwork, ingest_artwork
from collection.images import ImageError
from index.featurestore import FeatureStore
from index.fragments import fragments_of
from tests.conftest import deletes_sent, image_bytes

TABLES = (Artwork, Caption, Phrase, ArtworkPhrase, Region, Fragment, Annotation)


def counts(session) -> dict[str, int]:
    result = {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}
    session.rollback()
    return result


@pytest.fixture
def store(tmp_path, tiny_extractor):
    return FeatureStore(tmp_path / "features", extractor=tiny_extractor.version)


@pytest.fixture
def ingest(db_session, tiny_extractor, store, tmp_path):
    def run(external_id="vase-1", seed=1, **fields):
        fields.setdefault("captions", ["A blue vase with two gold birds among clouds."])
        return ingest_artwork(
            db_session, extractor=tiny_extractor, store=store,
            external_id=external_id, image_bytes=fields.pop("image", image_bytes(seed)),
            title=fields.pop("title", "Vase"), image_dir=tmp_path / "images", **fields,
        )
    return run


def test_create_writes_every_row_and_the_features(ingest, db_session, store, tmp_path):
    result = ingest(metadata={"source": "synth"}, split="train",
                    annotations=[{"phrase": "The gold birds", "box": [4, 4, 40, 30]}])
    assert result.status == "created"
    artwork = db_session.get(Artwork, result.artwork_id)
    assert (artwork.width, artwork.height, artwork.split) == (64, 48, "train")
    assert artwork.meta == {"source": "synth"}
    assert [c.text for c in artwork.captions] == ["A blue vase with two gold birds among clouds."]
    phrases = {link.phrase.text for link in artwork.phrase_links}
    assert {"blue vase", "gold birds"} <= phrases  # from the caption, and the annotation's
    assert artwork.annotations[0].phrase.text == "gold birds"
    assert artwork.annotations[0].box == (4, 4, 40, 30)
    # The stored image is the uploaded file, named by its content.
    assert tmp_path in __import__("pathlib").Path(artwork.image_location).parents
    # Regions: the extractor's record under the image sha256, plus the pooled annotation box.
    kinds = [r.kind for r in artwork.regions]
    assert kinds[0] == 0 and kinds.count(2) == 1 and set(kinds) == {0, 1, 2}
    assert len(store) == len(artwork.regions) == result.regions
    np.testing.assert_allclose(store.get(artwork.image_sha256).boxes[0], [0, 0, 64, 48])
    # Fragments: exactly fragments_of over the artwork's regions, with global store rows.
    boxes = np.array([r.box for r in artwork.regions], dtype=np.float32)
    specs = fragments_of(boxes, np.array([r.score for r in artwork.regions]), np.array(kinds))
    rows = np.array([r.store_row for r in artwork.regions])
    assert [f.region_rows for f in artwork.fragments] == [rows[s.rows].tolist() for s in specs]
    assert [f.source for f in artwork.fragments] == [s.source for s in specs]
    assert artwork.fragments[-1].source == "annotation" and result.fragments == len(specs)


def test_same_input_twice_is_unchanged(ingest, db_session, store):
    first = ingest(annotations=[{"phrase": "gold birds", "box": [4, 4, 40, 30]}])
    before, rows = counts(db_session), len(store)
    updated = db_session.get(Artwork, first.artwork_id).updated_at
    db_session.rollback()
    again = ingest(annotations=[{"phrase": "gold birds", "box": [4, 4, 40, 30]}])
    assert again.status == "unchanged" and again.artwork_id == first.artwork_id
    assert (again.fragments, again.phrases) == (first.fragments, first.phrases)
    assert counts(db_session) == before and len(store) == rows
    assert db_session.get(Artwork, first.artwork_id).updated_at == updated


def test_replace_rewrites_what_the_artwork_owns(ingest, db_session, store):
    first = ingest(captions=["A red dragon among clouds."])
    ingest("other", seed=2, captions=["A red dragon."])
    old_fragments = {f.id for f in db_session.get(Artwork, first.artwork_id).fragments}
    db_session.rollback()
    replaced = ingest(seed=3, captions=["A green lotus."], title="Lotus")
    assert replaced.status == "replaced" and replaced.artwork_id == first.artwork_id
    artwork = db_session.get(Artwork, first.artwork_id)
    assert artwork.title == "Lotus" and [c.text for c in artwork.captions] == ["A green lotus."]
    assert {link.phrase.text for link in artwork.phrase_links} == {"green lotus"}
    assert not old_fragments & {f.id for f in artwork.fragments}
    assert {r.store_row for r in artwork.regions} == set(
        range(*np.add.accumulate([0, *store.rows_of(artwork.image_sha256)])[1:]))
    texts = set(db_session.scalars(select(Phrase.text)))
    # "clouds" described only the old version: gone; "red dragon" still describes "other".
    assert "clouds" not in texts and "red dragon" in texts
    assert counts(db_session)["artworks"] == 2


def test_delete_removes_the_artwork_and_orphan_phrases(ingest, db_session):
    ingest(captions=["A red dragon among clouds."])
    ingest("other", seed=2, captions=["A red dragon."])
    assert delete_artwork(db_session, external_id="vase-1") is True
    assert delete_artwork(db_session, external_id="vase-1") is False
    assert set(db_session.scalars(select(Phrase.text))) == {"red dragon"}
    left = counts(db_session)
    assert left["artworks"] == 1 and left["captions"] == 1
    assert left["fragments"] == len(db_session.scalar(select(Artwork)).fragments)


def test_delete_costs_one_statement_per_table_not_per_row(ingest, db_session):
    # A museum deleting thousands of artworks must not pay a statement per region and fragment.
    ingest(captions=["A red dragon among clouds.", "Two gold birds over a lotus pond."])
    artwork = db_session.scalar(select(Artwork))
    rows = len(artwork.regions) + len(artwork.fragments) + len(artwork.captions)
    db_session.rollback()
    with deletes_sent(db_session) as deletes:  # parameter sets of each DELETE sent
        assert delete_artwork(db_session, external_id="vase-1") is True
    # the five owned tables, the artwork, its orphan phrases
    assert rows > len(artwork_rows.OWNED) + 2 and sum(deletes) <= len(artwork_rows.OWNED) + 2
    assert all(n == 0 for n in counts(db_session).values())


def test_a_failure_after_the_store_append_leaves_no_partial_artwork(ingest, db_session, store,
                                                                    monkeypatch):
    ingest("keep", seed=5, captions=["A stone statue."])
    before = counts(db_session)

    def crash(*args, **kwargs):
        raise RuntimeError("injected failure mid-transaction")

    # fragments_of runs after the feature-store append and after rows were flushed.
    monkeypatch.setattr(artwork_rows, "fragments_of", crash)
    with pytest.raises(RuntimeError, match="injected"):
        ingest(captions=["A painted box."])
    with pytest.raises(RuntimeError, match="injected"):
        ingest("keep", seed=6, captions=["A new caption."])  # a failed replace
    assert counts(db_session) == before
    assert [c.text for c in db_session.scalar(
        select(Artwork).where(Artwork.external_id == "keep")).captions] == ["A stone statue."]
    rows = len(store)
    monkeypatch.undo()
    result = ingest(captions=["A painted box."])
    assert result.status == "created"
    assert len(store) == rows  # the record the failed try appended is reused, not duplicated


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # validation, not SQL
def test_bad_input_is_refused_with_the_field_named(ingest, db_session):
    with pytest.raises(ImageError, match="artwork 'vase-1': image"):
        ingest(image=b"not an image")
    with pytest.raises(ValueError, match=r"annotations\[0\]\.box .* <= 64"):
        ingest(annotations=[{"phrase": "bird", "box": [10, 10, 80, 20]}])
    with pytest.raises(ValueError, match=r"annotations\[0\]\.phrase"):
        ingest(annotations=[{"phrase": "", "box": [1, 1, 5, 5]}])
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        ingest(captions=["A vase.", "  "])
    with pytest.raises(ValueError, match="external_id"):
        ingest(external_id=" ")
    assert counts(db_session)["artworks"] == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # validation, not SQL
def test_real_jpeg_from_the_egyptian_collection(ingest, db_session, egyptian_dir):
    path = sorted((egyptian_dir / "images").glob("*.jpg"))[0]
    result = ingest(path.stem, image=path.read_bytes(), captions=["Painted box of a vizier."])
    artwork = db_session.get(Artwork, result.artwork_id)
    assert artwork.image_location.endswith(".jpg") and artwork.width > 0
    assert result.fragments >= 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # store reuse, not SQL
def test_collection_ingest_reuses_the_collections_features(db_session, tiny_extractor, store,
                                                           tmp_path):
    from collection.layout import Annotation as BoxNote
    from collection.layout import Artwork as CollectionArtwork
    from collection.layout import Collection, CollectionWriter, sha256_of

    with CollectionWriter(tmp_path / "coll", name="tiny", source="test") as writer:
        for i in range(3):
            data = image_bytes(10 + i)
            (writer.root / "images" / f"a{i}.png").write_bytes(data)
            writer.add(CollectionArtwork(
                id=f"a{i}", image=f"images/a{i}.png", sha256=sha256_of(data), width=64,
                height=48, split="train", title=f"A{i}", metadata={"source": "test"},
                captions=["A blue vase."], phrases=["blue vase"],
                annotations=[BoxNote("blue vase", (2.0, 2.0, 30.0, 30.0))] if i == 0 else [],
            ))
    collection = Collection.load(tmp_path / "coll")
    # The collection's own feature store already holds a0 (annotation row included).
    own = FeatureStore(collection.root / "features")
    image = __import__("PIL.Image").Image.open(collection.image_path(collection.artworks[0]))
    record = tiny_extractor.extract([image.convert("RGB")], extra_boxes=[np.array([[2, 2, 30, 30]])])[0]
    own.append("a0", record)

    class NoExtraction:  # a0 must come from the collection's store, not the extractor
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def extract(self, images):
            self.calls += 1
            return self.inner.extract(images)

        def pool(self, image, boxes, kind):
            raise AssertionError("a0's annotation box is in the collection's store")

    extractor = NoExtraction(tiny_extractor)
    first = ingest_collection(db_session, extractor=extractor, store=store,
                              collection=collection, progress=False)
    assert first == {"created": 3} and extractor.calls == 2
    a0 = db_session.scalar(select(Artwork).where(Artwork.external_id == "a0"))
    assert [r.kind for r in a0.regions].count(2) == 1 and len(a0.regions) == len(record)
    again = ingest_collection(db_session, extractor=extractor, store=store,
                              collection=collection, progress=False)
    assert again == {"unchanged": 3}


def test_a_curator_box_becomes_a_fragment_once_and_never_without_an_image(
        ingest, db_session, store, tiny_extractor):
    from pathlib import Path

    from app.services.artwork_regions import add_box_fragment
    from app.services.changes import IndexChange

    artwork = db_session.get(Artwork, ingest().artwork_id)
    engine = {"store": store, "extractor": tiny_extractor}
    change = IndexChange()
    fragment = add_box_fragment(db_session, **engine, artwork=artwork, box=[2, 3, 30, 40], change=change)
    assert fragment.source == "annotation" and change.added_fragments == [fragment.id]
    assert np.allclose(fragment.box, [2, 3, 30, 40], atol=0.01)
    own = store.get(store.keys()[-1])  # the pooled box, stored under its own key
    np.testing.assert_array_equal(store.features(fragment.region_rows[:1]), own.features.astype(np.float32))
    extracted = {r.store_row for r in artwork.regions if r.kind == 1}
    assert set(fragment.region_rows[1:]) <= extracted
    again = add_box_fragment(db_session, **engine, artwork=artwork, box=[2, 3, 30, 40], change=change)
    assert again is fragment and change.added_fragments == [fragment.id]
    db_session.commit()

    Path(artwork.image_location).unlink()
    assert add_box_fragment(db_session, **engine, artwork=artwork, box=[5, 5, 20, 20],
                            change=change) is None
    assert change.added_fragments == [fragment.id]
    db_session.rollback()
