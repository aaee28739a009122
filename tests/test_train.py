"""SCAN training and evaluation on a tiny hand-made collection and feature store.

The collection has no images (a precomputed-feature collection): each artwork shows two of
six things ("gold bird", "blue vase", ...), each thing has a fixed random feature vector,
and the feature store holds, per artwork, the whole image, extracted regions near each thing
plus background clutter, and the annotation boxes (kind 2). A model that learns anything
links the words of a phrase to its thing's vector.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from app.cli import main
from collection.layout import Annotation, Artwork, Collection, CollectionWriter
from index.featurestore import FeatureStore, RegionRecord
from models.text import TextReader
from training import data as training_data
from training import evaluate as evaluation
from training.train import TrainOptions, train

THINGS = ["gold bird", "blue vase", "red horse", "green tree", "white cat", "black dog"]
RAW_DIM = 24
SIZE = 100.0


def make_collection(root, n_artworks: int = 36, seed: int = 0) -> None:
    """Write a collection at ``root`` with a feature store at ``root / "features"``."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(len(THINGS), RAW_DIM))
    records = []
    with CollectionWriter(root, name="tiny", source="test") as writer:
        for number in range(n_artworks):
            artwork_id = f"tiny-{number:03d}"
            things = rng.choice(len(THINGS), size=2, replace=False)
            # two non-overlapping boxes: left and right half
            boxes = [np.array([5, 10, 45, 90.0]), np.array([55, 10, 95, 90.0])]
            annotations = [Annotation(THINGS[t], tuple(float(v) for v in box))
                           for t, box in zip(things, boxes, strict=True)]
            split = "train" if number < 24 else ("val" if number < 30 else "test")
            writer.add(Artwork(
                id=artwork_id, image=None, sha256=f"{number:064d}", width=100, height=100,
                split=split, title=f"artwork {number}",
                captions=[f"a {THINGS[things[0]]} beside a {THINGS[things[1]]}",
                          f"the {THINGS[things[1]]} and the {THINGS[things[0]]}"],
                phrases=[THINGS[t] for t in things], annotations=annotations,
            ))
            region_boxes, region_features, kinds = [[0, 0, SIZE, SIZE]], [], [0]
            region_features.append(prototypes[things].mean(axis=0))
            for t, box in zip(things, boxes, strict=True):  # two jittered regions per thing
                for _ in range(2):
                    region_boxes.append(box + rng.uniform(-3, 3, size=4))
                    region_features.append(prototypes[t] + 0.3 * rng.normal(size=RAW_DIM))
                    kinds.append(1)
            for _ in range(2):  # clutter straddling the middle: inside neither thing's box
                y = rng.uniform(0, 80)
                region_boxes.append([40, y, 60, y + 20])
                region_features.append(rng.normal(size=RAW_DIM))
                kinds.append(1)
            for t, box in zip(things, boxes, strict=True):  # annotation rows, kind 2
                region_boxes.append(box)
                region_features.append(prototypes[t] + 0.1 * rng.normal(size=RAW_DIM))
                kinds.append(2)
            region_boxes = np.clip(np.asarray(region_boxes), 0, SIZE)
            scores = np.where(np.asarray(kinds) == 1, rng.uniform(0.5, 1, len(kinds)), 1.0)
            records.append((artwork_id, RegionRecord(region_boxes, scores,
                                                     np.asarray(region_features), kinds)))
    FeatureStore(root / "features", extractor="test").append_many(records)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "collection"
    make_collection(root)
    return root


def gru_reader(collection: Collection) -> TextReader:
    """The text reader of a GRU model over the collection's words (what the data reads)."""
    return TextReader("gru", collection.word_vocab)


def options(tiny, out, **overrides) -> TrainOptions:
    values = dict(collection=str(tiny), out=str(out), grain="fine", embed_dim=32, word_dim=16,
                  epochs=6, lr=2e-3, lr_update=5, batch_size=12, seed=0)
    values.update(overrides)
    return TrainOptions(**values)


def test_fine_pairs_are_annotation_fragments_and_their_phrases(tiny):
    collection = Collection.load(tiny)
    store = training_data.open_store(tiny)
    data = training_data.alignment_data(collection, store, gru_reader(collection),
                                        grain="fine", split="train")
    assert len(data.pairs) == 48  # 24 artworks x 2 annotations
    assert set(data.fragment_sources) == {"annotation"}
    assert set(data.texts) <= set(THINGS)
    first = collection.split("train")[0]
    start, _ = store.rows_of(first.id)
    # the left box's region set: its annotation row (7: after the whole image, 4 thing regions
    # and 2 clutter regions), then the two regions jittered around it, not the right ones
    rows = data.fragment_rows[0] - start
    assert rows[0] == 7 and sorted(rows[1:].tolist()) == [1, 2]
    assert data.texts[data.pairs[0, 1]] == first.annotations[0].phrase


def test_weak_supervision_pairs_whole_image_with_its_phrase_sequence(tiny):
    collection = Collection.load(tiny)
    data = training_data.alignment_data(collection, training_data.open_store(tiny),
                                        gru_reader(collection), grain="fine", split="val",
                                        supervision="weak")
    assert set(data.fragment_sources) == {"whole"}
    first = collection.split("val")[0]
    assert data.texts[0] == " ".join(first.phrases)
    assert len(data.fragment_rows[0]) == 1 + 6  # whole image + every extracted region


def test_ignore_mask_marks_same_artwork_and_same_text(tiny):
    collection = Collection.load(tiny)
    data = training_data.alignment_data(collection, training_data.open_store(tiny),
                                        gru_reader(collection), grain="fine", split="train")
    batch = training_data.batch_of(data, np.arange(len(data.pairs)))
    artworks = data.fragment_artworks[data.pairs[:, 0]]
    texts = data.pairs[:, 1]
    for i in range(len(texts)):
        for j in range(len(texts)):
            want = i != j and (artworks[i] == artworks[j] or texts[i] == texts[j])
            assert bool(batch.ignore[i, j]) == want
    assert batch.regions.shape == (48, 3, RAW_DIM)
    assert batch.word_ids.shape == (48, 2)
    assert (batch.region_lens == 3).all()


def test_negative_fragments_are_the_artworks_other_fragments_but_never_a_hit(tiny):
    collection = Collection.load(tiny)
    store = training_data.open_store(tiny)
    data = training_data.alignment_data(collection, store, gru_reader(collection),
                                        grain="fine", split="train")
    negatives = training_data.negative_fragments(collection, store, gru_reader(collection),
                                                 split="train", per_artwork=7)
    batch = training_data.batch_of(data, np.array([0, 1]), negatives,  # one artwork's 2 boxes
                                   np.random.default_rng(0))
    # whole image + its 6 extracted regions (all of them: 7 per artwork asked)
    assert batch.negative_lens.tolist()[0] == 1 + 6 and len(batch.negative_lens) == 7
    answers = batch.negative_ignore.numpy()  # (7, 2)
    assert not answers[0].any()  # the whole image is never a hit for a thing's phrase
    # each thing's two jittered regions answer its phrase: masked, not negatives
    assert answers.sum(axis=0).tolist() == [2, 2]
    assert not (answers[:, 0] & answers[:, 1]).any()


def test_missing_annotation_rows_are_named(tmp_path, tiny):
    collection = Collection.load(tiny)
    store = FeatureStore(tmp_path / "features")
    artwork = collection.split("train")[0]
    record = training_data.open_store(tiny).get(artwork.id)
    keep = np.asarray(record.kinds) != 2
    store.append(artwork.id, RegionRecord(record.boxes[keep], record.scores[keep],
                                          np.asarray(record.features[keep]), record.kinds[keep]))
    with pytest.raises(ValueError, match=f"{artwork.id}.*annotation 0.*kind 2"):
        training_data.alignment_data(collection, store, gru_reader(collection), grain="fine",
                                     split="train")
    with pytest.raises(ValueError, match="no record in the feature store"):
        training_data.alignment_data(collection, store, gru_reader(collection), grain="coarse",
                                     split="val")


def test_two_stage_with_every_candidate_equals_exhaustive():
    scores = evaluation.Scores(scan=torch.randn(7, 5), pooled=torch.randn(7, 5))
    assert torch.equal(evaluation.two_stage(scores, 5, queries_are_rows=True), scores.scan)
    masked = evaluation.two_stage(scores, 2, queries_are_rows=False)  # top 2 images per text
    assert (torch.isfinite(masked).sum(dim=0) == 2).all()
    top = scores.pooled.topk(2, dim=0).indices
    for column in range(5):
        assert set(torch.nonzero(torch.isfinite(masked[:, column])).flatten().tolist()) == \
            set(top[:, column].tolist())


def test_fine_training_lowers_the_loss_and_evaluate_reads_the_checkpoint(tiny, tmp_path):
    out = tmp_path / "scan.pt"
    result = train(options(tiny, out))
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    with open(out.with_suffix(".csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert max(float(r["val_rsum"]) for r in rows) == pytest.approx(result.best_rsum)

    figures = evaluation.evaluate(out, tiny, split="test", k=3)
    assert figures["grain"] == "fine" and figures["model_version"] == result.model_version
    crop, phrase = figures["crop_to_phrase"], figures["phrase_to_fragment"]
    assert crop["scan"]["n"] == 12 and phrase["scan"]["n"] == 12  # 6 artworks x 2 boxes
    # 6 phrases: a random scorer's R@1 is ~17; a trained one links words to their thing
    assert crop["scan"]["r1"] > 50
    assert phrase["oracle"] == 100.0  # every thing has extracted regions around its box
    assert figures["grounding"]["scan"]["r1"] > 50
    # K=3 of 6 phrases: nothing outside the top 3 pooled candidates can reach R@5
    assert crop["two_stage"]["r5"] == crop["two_stage"]["r10"]
    assert crop["two_stage"]["medr"] <= 3 or crop["two_stage"]["r1"] < 50


def test_a_vectors_only_baseline_is_selected_by_its_pooled_rsum(tiny, tmp_path):
    out = tmp_path / "vectors.pt"
    result = train(options(tiny, out, epochs=3, xattn_weight=0.0))
    assert result.best_rsum == max(row["val_pooled_rsum"] for row in result.history)
    for row in result.history:  # the loss is the pooled stage's alone
        assert row["loss"] == pytest.approx(row["pooled_loss"])
    figures = evaluation.evaluate(out, tiny, split="test", k=3)
    assert figures["config"]["xattn_weight"] == 0.0 and figures["crop_to_phrase"]["pooled"]["r1"] > 50


def test_resume_continues_after_the_last_epoch(tiny, tmp_path):
    out = tmp_path / "scan.pt"
    train(options(tiny, out, epochs=1))
    resumed = train(options(tiny, out, epochs=2, resume=True))
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    with pytest.raises(ValueError, match="different model config.*embed_dim"):
        train(options(tiny, out, epochs=3, embed_dim=16, resume=True))


def test_cli_trains_coarse_and_evaluates_to_json(tiny, tmp_path, capsys):
    out = tmp_path / "coarse.pt"
    assert main(["train", "--collection", str(tiny), "--grain", "coarse", "--out", str(out),
                 "--epochs", "3", "--batch-size", "16", "--embed-dim", "32", "--word-dim", "16",
                 "--direction", "i2t", "--agg", "mean", "--uni-gru", "--lr", "2e-3"]) == 0
    report = tmp_path / "figures.json"
    assert main(["evaluate", "--checkpoint", str(out), "--collection", str(tiny),
                 "--split", "val", "--json", str(report)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Image annotation R@1" in printed and "two-stage keeps" in printed
    # stderr is no terminal here: no progress bars in what would be a log file
    assert "epoch 1/3" not in captured.err and "scoring fragments" not in captured.err
    figures = json.loads(report.read_text())
    assert figures["grain"] == "coarse"
    assert figures["config"]["direction"] == "i2t" and figures["config"]["bidirectional"] is False
    assert figures["image_annotation"]["scan"]["n"] == 6  # 6 val images
    # identical captions of two artworks are one query with two relevant images
    captions = {c for a in Collection.load(tiny).split("val") for c in a.captions}
    assert figures["image_retrieval"]["scan"]["n"] == len(captions)
    assert math.isfinite(figures["rsum"]["scan"])


def test_cli_names_a_missing_feature_store(tiny, tmp_path, capsys):
    assert main(["train", "--collection", str(tiny), "--features", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "no feature store here" in capsys.readouterr().err


def test_grid_trains_the_five_table_rows_from_a_checkpoints_options(tiny, tmp_path, capsys):
    out = tmp_path / "base.pt"
    train(options(tiny, out, grain="coarse", epochs=1, batch_size=48))
    report = tmp_path / "grid.json"
    assert main(["evaluate", "--checkpoint", str(out), "--collection", str(tiny), "--grid",
                 "--grid-epochs", "1", "--json", str(report)]) == 0
    grid = json.loads(report.read_text())
    rows = {row["label"]: row["config"] for row in grid["rows"]}
    assert list(rows) == ["t-i LSE", "t-i AVG", "i-t LSE", "i-t AVG", "uni-GRU i-t AVG"]
    assert rows["i-t LSE"]["direction"] == "i2t" and rows["i-t LSE"]["agg"] == "lse"
    assert rows["i-t LSE"]["lambda_softmax"] == 4.0  # the thesis's default for i2t
    assert rows["uni-GRU i-t AVG"]["bidirectional"] is False
    assert all(config["embed_dim"] == 32 for config in rows.values())  # the base's options
    assert (tmp_path / "base-grid" / "uni-GRU-i-t-AVG.pt").is_file()
    printed = capsys.readouterr().out
    assert "uni-GRU i-t AVG" in printed and "s/epoch" in printed
