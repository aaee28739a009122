"""The retrieval engine: two-stage search equals a plain exhaustive cross-attention ranking
when K covers everything; explanations; index reload / rebuild; updates without rebuild."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select

from app.db.models import Artwork, Fragment, IndexBuild, Phrase
from app.db.session import create_db_engine, session_factory
from app.services.filters import ArtworkFilter
from app.services.indexes import Indexes
from app.services.ingest import delete_artwork, ingest_artwork
from app.services.retrieval import Engine
from collection.images import load_image
from collection.phrases import normalise_phrase
from index.featurestore import FeatureStore
from models.encoder import Encoder
from models.regions import crop_region_set
from models.scan import load_scan, xattn_similarity
from models.vocab import tokenize
from tests.conftest import image_bytes
from tests.test_folding import reference_fold

ARTWORKS = [
    ("vase-1", "A blue vase with two gold birds among clouds.", {"source": "synth", "classification": "vase"}),
    ("dragon-2", "A red dragon among green clouds.", {"source": "synth", "classification": "textile"}),
    ("cat-3", "A painted cat head with standing ears.", {"source": "museum", "classification": "statue"}),
    ("box-4", "A painted box of the vizier with a lotus.", {"source": "museum", "classification": "box"}),
]
QUERIES = ["gold birds", "the red dragon among clouds", "cat head", "unknownword lotus"]


def make_engine(checkpoints, extractor, data_dir, scan=None, index_dir=None):
    model, vocab, checkpoint = load_scan(scan or checkpoints.scan)
    indexes = Indexes(encoder=Encoder(model, vocab), model_version=checkpoint.sha256,
                      store=FeatureStore(data_dir / "features", extractor=extractor.version),
                      index_dir=index_dir or data_dir / "index")
    return Engine(indexes=indexes, extractor=extractor, image_dir=data_dir / "images")


def ingest_all(session, extractor, store, data_dir, artworks=ARTWORKS):
    for seed, (external_id, caption, metadata) in enumerate(artworks):
        ingest_artwork(session, extractor=extractor, store=store,
                       external_id=external_id, image_bytes=image_bytes(100 + seed),
                       title=external_id, metadata=metadata, captions=[caption],
                       annotations=[{"phrase": "gold birds", "box": [2, 2, 40, 30]}] if seed == 0 else [],
                       image_dir=data_dir / "images")


@pytest.fixture
def loaded(db_session, tiny_checkpoints, tiny_extractor, tmp_path):
    engine = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
    ingest_all(db_session, tiny_extractor, engine.store, tmp_path)
    assert engine.indexes.start(db_session) == {"fragments": "rebuilt", "phrases": "rebuilt"}
    return engine, db_session


# -- the plain references ------------------------------------------------------------------


def padded_region_sets(store, region_rows):
    """(n, r_max, D_raw) raw features, zero padded, and (n,) lens: one fragment at a time."""
    lens = [len(rows) for rows in region_rows]
    raw = torch.zeros(len(region_rows), max(lens), store.dim)
    for i, rows in enumerate(region_rows):
        raw[i, : len(rows)] = torch.from_numpy(store.features(np.array(rows)))
    return raw, torch.tensor(lens)


def word_ids(vocab, text):
    ids = vocab.encode(tokenize(text)) or [3]
    return torch.tensor([ids]), torch.tensor([len(ids)])


def similarity(model, images, image_lens, texts, text_lens):
    c = model.config
    return xattn_similarity(images, image_lens, texts, text_lens, direction=c.direction, agg=c.agg,
                            lambda_softmax=c.lambda_softmax, lambda_lse=c.lambda_lse)


@torch.inference_mode()
def exhaustive_search(engine, session, query, filters=None):
    """Every fragment scored with cross attention, folded by tests.test_folding's plain
    reference: (fragment id, score), best first."""
    fragments = session.scalars(select(Fragment).order_by(Fragment.id)).all()
    if filters:
        fragments = [f for f in fragments
                     if all(f.artwork.meta.get(k) in v for k, v in filters.items())]
    raw, lens = padded_region_sets(engine.store, [f.region_rows for f in fragments])
    images = engine.encoder.model.encode_images(raw, lens)
    per_phrase = []  # one phrase at a time; then (best + mean) / 2 over the phrases
    for phrase in engine.parse_query(query).phrases:
        ids, n_words = word_ids(engine.encoder.vocab, phrase)
        text = engine.encoder.model.encode_texts(ids, n_words)
        per_phrase.append(similarity(engine.encoder.model, images, lens, text, n_words)[:, 0])
    stacked = torch.stack(per_phrase)  # (p, n)
    scores = (stacked.amax(dim=0) + stacked.mean(dim=0)) / 2
    ranked = sorted(zip(fragments, scores.tolist(), strict=True), key=lambda p: (-p[1], p[0].id))
    kept = reference_fold([(f.id, f.artwork_id, f.box) for f, _ in ranked])
    session.rollback()
    return [(f.id, s) for f, s in ranked if f.id in kept]


@torch.inference_mode()
def exhaustive_phrases(engine, session, raw_features):
    phrases = session.scalars(select(Phrase).order_by(Phrase.id)).all()
    raw = torch.from_numpy(np.asarray(raw_features, dtype=np.float32))[None]
    lens = torch.tensor([raw.shape[1]])
    image = engine.encoder.model.encode_images(raw, lens)
    scores = []
    for phrase in phrases:  # one phrase at a time: no padding at all in the reference
        ids, n_words = word_ids(engine.encoder.vocab, phrase.text)
        scores.append(float(similarity(engine.encoder.model, image, lens,
                                       engine.encoder.model.encode_texts(ids, n_words), n_words)[0, 0]))
    session.rollback()
    return sorted(zip([p.id for p in phrases], scores, strict=True), key=lambda p: (-p[1], p[0]))


# -- tests ---------------------------------------------------------------------------------


def test_two_stage_equals_exhaustive_when_k_covers_everything(loaded):
    engine, session = loaded
    n = engine.indexes.fragment_count()
    assert n == len(session.scalars(select(Fragment.id)).all()) > 4
    for query in QUERIES:
        reference = exhaustive_search(engine, session, query)
        hits = engine.search_text(session, query, k=n, limit=n)
        assert [h.fragment_id for h in hits] == [i for i, _ in reference]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in reference], atol=1e-5)
        page = engine.search_text(session, query, k=n, limit=3, offset=2)
        assert [h.fragment_id for h in page] == [i for i, _ in reference[2:5]]
        # A small K reranks only the first stage's candidates (K per phrase of the query): a
        # subset, still best first.
        few = engine.search_text(session, query, k=3, limit=10)
        n_phrases = len(engine.parse_query(query).phrases)
        assert 3 <= len(few) <= 3 * n_phrases and {h.fragment_id for h in few} <= {i for i, _ in reference}
        assert [h.score for h in few] == sorted((h.score for h in few), reverse=True)
    filters = {"source": ("museum",)}
    reference = exhaustive_search(engine, session, "painted box", filters)
    hits = engine.search_text(session, "painted box", k=n, limit=n, filters=ArtworkFilter(filters))
    assert [h.fragment_id for h in hits] == [i for i, _ in reference]
    assert {h.external_id for h in hits} == {"cat-3", "box-4"}
    assert engine.search_text(session, "box", filters=ArtworkFilter({"source": ("nowhere",)})) == []
    # Any field, alternatives within a field, and the title.
    either = ArtworkFilter({"classification": ("statue", "vase")}, title="CAT")
    assert {h.external_id for h in engine.search_text(session, "box", k=n, limit=n, filters=either)} == {"cat-3"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # engine logic, not SQL
def test_hits_carry_metadata_and_word_attention(loaded):
    engine, session = loaded
    timings = {}
    hit = engine.search_text(session, "The red dragon", k=100, limit=1, timings=timings)[0]
    assert set(timings) == {"encode", "stage1", "rerank"}
    fragment = session.get(Fragment, hit.fragment_id)
    artwork = fragment.artwork
    assert (hit.artwork_id, hit.external_id, hit.title) == (artwork.id, artwork.external_id, artwork.title)
    assert (hit.width, hit.height, hit.box, hit.source) == (64, 48, fragment.box, fragment.source)
    assert [a.word for a in hit.attention] == ["red", "dragon"]
    region_boxes = {r.store_row: r.box for r in artwork.regions}
    for word in hit.attention:
        assert len(word.regions) == len(fragment.region_rows)
        assert {r.box for r in word.regions} == {region_boxes[row] for row in fragment.region_rows}
        assert sum(r.weight for r in word.regions) == pytest.approx(1.0, abs=1e-5)
        assert [r.weight for r in word.regions] == sorted((r.weight for r in word.regions), reverse=True)
    with pytest.raises(ValueError, match="no words"):
        engine.search_text(session, "  ...  ")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # engine logic, not SQL
def test_search_folds_a_block_before_paging_and_fetches_more(loaded):
    engine, session = loaded
    near = [{"phrase": "gold birds", "box": [4, 4, 30, 30]}, {"phrase": "two birds", "box": [5, 5, 30, 31]},
            {"phrase": "birds", "box": [4, 5, 31, 30]}]
    ingest_artwork(session, extractor=engine.extractor, store=engine.store, indexes=engine.indexes,
                   image_dir=engine.image_dir, external_id="near-5", image_bytes=image_bytes(700),
                   title="near", captions=["Two gold birds."], annotations=near)
    n = engine.indexes.fragment_count()
    hits = engine.search_text(session, "gold birds", k=n, limit=n)
    assert sum(1 + len(h.also) for h in hits) == n > len(hits)  # every fragment, once
    assert [h.fragment_id for h in hits] == [i for i, _ in exhaustive_search(engine, session, "gold birds")]
    # Pages of one block come from one folded ranking: they add up to it, nothing twice.
    pages = [engine.search_text(session, "gold birds", k=n, limit=2, offset=o) for o in range(0, len(hits), 2)]
    assert [h.fragment_id for page in pages for h in page] == [h.fragment_id for h in hits]
    # fold_iou 1 folds only equal boxes: every fragment comes back.
    assert len(engine.search_text(session, "gold birds", k=n, limit=n, fold_iou=1.0)) == n
    # A block of K that folds to fewer hits than the page needs grows by K.
    kept = len(hits)
    small = engine.search_text(session, "gold birds", k=kept, limit=kept)
    assert len(small) == kept and [h.fragment_id for h in small] == [h.fragment_id for h in hits]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # engine logic, not SQL
def test_annotate_equals_exhaustive_and_lists_artworks(loaded, tiny_extractor):
    engine, session = loaded
    n = engine.indexes.phrase_count()
    artwork = session.scalar(select(Artwork).where(Artwork.external_id == "vase-1"))
    whole = artwork.fragments[0]
    features = engine.store.features(np.array(whole.region_rows))
    reference = exhaustive_phrases(engine, session, features)
    hits = engine.annotate_regions(session, features, k=n, limit=n)
    assert [h.phrase_id for h in hits] == [i for i, _ in reference]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in reference], atol=1e-5)
    birds = next(h for h in hits if h.phrase == "gold birds")
    assert [a.external_id for a in birds.artworks] == ["vase-1"]

    # A box on a stored artwork: its pooled feature plus the regions inside it.
    box = [0, 0, 40, 30]
    by_box = engine.annotate_box(session, artwork.id, box, k=n, limit=n)
    image = load_image(artwork.image_location)
    own = tiny_extractor.pool(image, np.array([box], dtype=np.float32), kind=3).features
    inside = [r for r in artwork.regions if r.kind == 1 and r.x2 <= 40 and r.y2 <= 30]
    assert len(by_box) == n
    with pytest.raises(LookupError, match="artwork 999999"):
        engine.annotate_box(session, 999_999, box)
    with pytest.raises(ValueError, match="<= 64"):
        engine.annotate_box(session, artwork.id, [0, 0, 65, 10])
    if not inside:  # the region set is the box alone: compare with the reference exactly
        reference = exhaustive_phrases(engine, session, own)
        assert [h.phrase_id for h in by_box] == [i for i, _ in reference]
    # An uploaded crop: its fragment's region set (its own box pooled at its own scale on a
    # detector-sized canvas, then the regions inside it), not the crop read as a whole image.
    crop_image = image.crop((0, 0, 40, 30))
    crop = engine.annotate_image(session, crop_image, k=n, limit=2)
    assert len(crop) == 2 and crop[0].score >= crop[1].score
    region_set = crop_region_set(engine.extractor, crop_image)
    assert region_set.ndim == 2 and len(region_set) >= 1
    assert [h.phrase_id for h in crop] == [i for i, _ in exhaustive_phrases(engine, session, region_set)[:2]]
    as_whole_image = tiny_extractor.extract([crop_image])[0].features[0]
    assert not np.allclose(region_set[0], as_whole_image, atol=1e-4)


def test_saved_indexes_load_and_stale_ones_rebuild(db_url, tiny_checkpoints, tiny_extractor, tmp_path):
    database = create_db_engine(db_url)
    sessions = session_factory(database)
    with sessions() as session:
        first = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
        ingest_all(session, tiny_extractor, first.store, tmp_path, ARTWORKS[:2])
        assert first.indexes.start(session) == {"fragments": "rebuilt", "phrases": "rebuilt"}
        builds = session.scalars(select(IndexBuild)).all()
        assert [(b.state, b.fragment_count) for b in builds] == [("ready", first.indexes.fragment_count())]
        query_hits = [h.fragment_id for h in first.search_text(session, "gold birds", limit=5)]

        second = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
        assert second.indexes.start(session) == {"fragments": "loaded", "phrases": "loaded"}
        assert second.indexes.fragment_count() == first.indexes.fragment_count()
        assert [h.fragment_id for h in second.search_text(session, "gold birds", limit=5)] == query_hits

        # The database changed behind the snapshot's back (no engine told): the snapshot
        # loads and the change log past it is replayed, to what a rebuild holds.
        ingest_all(session, tiny_extractor, first.store, tmp_path, ARTWORKS[2:3])
        third = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
        assert third.indexes.start(session) == {"fragments": "loaded", "phrases": "loaded"}
        assert third.indexes.fragment_count() > first.indexes.fragment_count()
        rebuilt = make_engine(tiny_checkpoints, tiny_extractor, tmp_path, index_dir=tmp_path / "other")
        assert rebuilt.indexes.start(session) == {"fragments": "rebuilt", "phrases": "rebuilt"}
        assert_same_indexes(third.indexes, rebuilt.indexes)
        assert third.indexes.save_snapshot() and not third.indexes.save_snapshot()

        # A snapshot whose log position names another commit (another database): rebuilt.
        manifest_path = tmp_path / "index" / "fragments" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["state"]["log_stamp"] = "2001-01-01T00:00:00+00:00"
        manifest_path.write_text(json.dumps(manifest))
        assert make_engine(tiny_checkpoints, tiny_extractor, tmp_path).indexes.start(session) == {
            "fragments": "rebuilt", "phrases": "loaded"}

        # Another model version: rebuilt. A corrupt manifest: rebuilt, not a crash.
        other = make_engine(tiny_checkpoints, tiny_extractor, tmp_path, tiny_checkpoints.other_scan)
        assert other.indexes.start(session) == {"fragments": "rebuilt", "phrases": "rebuilt"}
        (tmp_path / "index" / "phrases" / "manifest.json").write_text("{")
        fourth = make_engine(tiny_checkpoints, tiny_extractor, tmp_path, tiny_checkpoints.other_scan)
        assert fourth.indexes.start(session) == {"fragments": "loaded", "phrases": "rebuilt"}
        manifest = json.loads((tmp_path / "index" / "phrases" / "manifest.json").read_text())
        assert manifest["model_version"] == fourth.model_version
    database.dispose()


def assert_same_indexes(one: Indexes, other: Indexes) -> None:
    """Both hold the same ids with the same vectors: every id scores the same against
    random queries."""
    queries = np.random.default_rng(0).standard_normal((5, one.encoder.dim)).astype(np.float32)

    def scores_by_id(index):
        scores, ids = index.search(queries, len(index))
        return np.take_along_axis(scores, np.argsort(ids, axis=1), axis=1)  # ties in any order

    for name in ("fragments", "phrases"):
        assert np.array_equal(one[name].ids(), other[name].ids()), name
        np.testing.assert_allclose(scores_by_id(one[name]), scores_by_id(other[name]), atol=1e-5)


def test_ingest_and_delete_update_the_indexes_without_rebuild(loaded, tiny_checkpoints,
                                                              tiny_extractor, tmp_path, monkeypatch):
    engine, session = loaded
    fragments, phrases = engine.indexes.fragment_count(), engine.indexes.phrase_count()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("an update must not rebuild the index")

    monkeypatch.setattr(engine.indexes, "rebuild", no_rebuild)
    result = ingest_artwork(session, extractor=engine.extractor, store=engine.store,
                            indexes=engine.indexes, image_dir=engine.image_dir,
                            external_id="statue-5", image_bytes=image_bytes(500),
                            title="Statue", captions=["A stone statue of a standing figure."])
    assert engine.indexes.fragment_count() == fragments + result.fragments
    assert engine.indexes.phrase_count() > phrases
    n = engine.indexes.fragment_count()
    for query in ("stone statue", "gold birds"):
        hits = engine.search_text(session, query, k=n, limit=n)
        assert [h.fragment_id for h in hits] == [i for i, _ in exhaustive_search(engine, session, query)]
    assert "statue-5" in {h.external_id for h in engine.search_text(session, "statue", k=n, limit=n)}

    # The snapshot predates the change; a restart loads it and replays the log.
    restarted = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
    assert restarted.indexes.start(session) == {"fragments": "loaded", "phrases": "loaded"}
    assert_same_indexes(restarted.indexes, engine.indexes)

    assert delete_artwork(session, external_id="statue-5", indexes=engine.indexes)
    assert (engine.indexes.fragment_count(), engine.indexes.phrase_count()) == (fragments, phrases)
    assert "statue-5" not in {h.external_id for h in engine.search_text(session, "statue", k=n, limit=n)}
    replaced = ingest_artwork(session, extractor=engine.extractor, store=engine.store,
                            indexes=engine.indexes, image_dir=engine.image_dir,
                              external_id="dragon-2", image_bytes=image_bytes(600),
                              title="Dragon", captions=["A green dragon."])
    assert replaced.status == "replaced"
    assert engine.indexes.fragment_count() == len(session.scalars(select(Fragment.id)).all())
    assert engine.indexes.phrase_count() == len(session.scalars(select(Phrase.id)).all())
    restarted = make_engine(tiny_checkpoints, tiny_extractor, tmp_path)
    assert restarted.indexes.start(session) == {"fragments": "loaded", "phrases": "loaded"}


def test_ingest_and_index_build_commands(tiny_checkpoints, tmp_path, capsys):
    """`artalign db upgrade`, `artalign ingest --collection`, `artalign index build`, then the
    service's Engine.load finds the indexes up to date."""
    from app.cli import main
    from collection.layout import Artwork as CollectionArtwork
    from collection.layout import CollectionWriter, sha256_of

    with CollectionWriter(tmp_path / "coll", name="tiny", source="test") as writer:
        for i, (external_id, caption, metadata) in enumerate(ARTWORKS[:2]):
            data = image_bytes(700 + i)
            (writer.root / "images" / f"{external_id}.png").write_bytes(data)
            writer.add(CollectionArtwork(
                id=external_id, image=f"images/{external_id}.png", sha256=sha256_of(data),
                width=64, height=48, split="train", title=external_id, metadata=metadata,
                captions=[caption], phrases=[normalise_phrase(caption.split(" with ")[0])],
            ))
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    data_dir = tmp_path / "var"
    common = ["--database-url", url, "--data-dir", str(data_dir)]
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert main(["ingest", "--collection", str(tmp_path / "coll"), *common, "--no-index",
                 "--detector-checkpoint", str(tiny_checkpoints.detector), "--device", "cpu"]) == 0
    assert "2 created" in capsys.readouterr().out
    assert main(["index", "build", *common, "--scan-checkpoint", str(tiny_checkpoints.scan),
                 "--device", "cpu"]) == 0
    assert "(rebuilt)" in capsys.readouterr().out
    assert main(["index", "build", *common, "--scan-checkpoint", str(tiny_checkpoints.scan)]) == 0
    assert "(loaded)" in capsys.readouterr().out  # up to date: nothing rebuilt
    database = create_db_engine(url)
    engine = Engine.load(database=database, scan_checkpoint=tiny_checkpoints.scan,
                         detector_checkpoint=tiny_checkpoints.detector, data_dir=data_dir,
                         device="cpu")
    with session_factory(database)() as session:
        assert engine.indexes.start(session) == {"fragments": "loaded", "phrases": "loaded"}
        assert engine.search_text(session, "blue vase", limit=1)[0].external_id in {"vase-1", "dragon-2"}
    database.dispose()
