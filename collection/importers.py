"""Importers: turn an existing source into one collection layout (see collection/layout.py).

- :func:`import_thesis`: the thesis's caption_data.json + Pascal VOC XML + images;
- :func:`import_csv`: a museum's CSV export + an image folder, with a column mapping;
- :func:`import_voc`: images with Pascal VOC boxes and no captions (labels become phrases);
- :func:`import_scan_features`: SCAN's precomputed ``{split}_ims.npy`` + ``{split}_caps.txt``,
  as artworks without images and a feature store under ``features/``.

As the thesis did: at most five sentences per artwork, duplicate images dropped by content
hash (sha256), and a deterministic 80/10/10 split by a hash of the id when the source has
none. Bad input stops the import with a message naming the file and line, or, with
``skip_bad``, is left out and listed (at the end and in skipped.json). The collection is
written through :class:`CollectionWriter`, so it is never half-written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from collection.images import ImageError, load_image
from collection.layout import (
    MAX_CAPTIONS,
    SPLITS,
    Annotation,
    Artwork,
    CollectionError,
    CollectionWriter,
    sha256_of,
    split_for,
)
from collection.phrases import extract_phrases_batch, normalise_phrase

log = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")
# Precomputed features come from no extractor of ours; this names their origin instead.
SCAN_FEATURES_EXTRACTOR = hashlib.sha256(b"scan-precomputed-bottom-up-features").hexdigest()


class _Problems:
    """Bad input: raise at once, or (``skip_bad``) record it in the writer and go on."""

    def __init__(self, writer: CollectionWriter, skip_bad: bool):
        self.writer = writer
        self.skip_bad = skip_bad

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise CollectionError(f"{where}: {reason} (use --skip-bad to leave it out)")
        self.writer.skip(where, reason)


@dataclass
class _Pending:
    """An artwork read from the source whose phrases are still to be extracted."""

    artwork: Artwork
    annotation_phrases: list[str]


def _clean(text: str) -> str:
    """Catalogue fields hold newlines and runs of spaces: one line, single spaces."""
    return _WHITESPACE.sub(" ", text).strip()


@dataclass
class _SourceImage:
    data: bytes
    sha256: str
    width: int
    height: int


def _read_image(problems: _Problems, source: Path, where: str) -> _SourceImage | None:
    """Read and validate one image (decoded once); None when it is bad and skipped."""
    if not source.is_file():
        problems.bad(where, f"image {source}: no such file")
        return None
    try:
        data = source.read_bytes()
        image = load_image(data, name=str(source))
    except OSError as exc:
        problems.bad(where, f"image {source}: cannot be read ({exc.strerror or exc})")
        return None
    except ImageError as exc:
        problems.bad(where, str(exc))
        return None
    return _SourceImage(data, sha256_of(data), image.width, image.height)


def _keep_image(writer: CollectionWriter, image: _SourceImage, artwork_id: str, name: str,
                where: str) -> str | None:
    """Write the image into the collection; None (and a note) when its content is a duplicate."""
    owner = writer.claim(image.sha256, artwork_id)
    if owner is not None:
        writer.skip(where, f"same image content as artwork {owner!r}: duplicate dropped")
        return None
    relative = f"images/{name}"
    (writer.root / relative).write_bytes(image.data)
    return relative


def _add_with_phrases(writer: CollectionWriter, pending: list[_Pending]) -> None:
    """Extract every caption's phrases in one spaCy pass, then add the artworks in order."""
    captions = [c for p in pending for c in p.artwork.captions]
    phrase_lists = iter(extract_phrases_batch(captions))
    for item in pending:
        phrases: list[str] = []
        for _ in item.artwork.captions:
            phrases.extend(next(phrase_lists))
        item.artwork.phrases = list(dict.fromkeys([*phrases, *item.annotation_phrases]))
        writer.add(item.artwork)


# ---------------------------------------------------------------------------- thesis
def read_voc(path: Path, width: int, height: int, *, underscores: bool = False) -> list[Annotation]:
    """The <object>s of a Pascal VOC file as annotations; boxes clipped to the image.
    ``underscores``: read ``_`` in a label as a space (``mary_and_child``)."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        line, column = exc.position
        raise CollectionError(f"{path}:{line}: not valid XML (column {column}: {exc.msg})") \
            from exc
    except OSError as exc:
        raise CollectionError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if root.tag != "annotation":
        raise CollectionError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    annotations = []
    for number, node in enumerate(root.iter("object"), start=1):
        label = node.findtext("name") or ""
        phrase = normalise_phrase(label.replace("_", " ") if underscores else label)
        if not phrase:
            raise CollectionError(f"{path}: <object> {number} has an empty <name>")
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = node.findtext(f"bndbox/{tag}")
            try:
                values.append(float(text))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise CollectionError(
                    f"{path}: <object> {number} ({phrase!r}): <bndbox><{tag}> is "
                    f"{'missing' if text is None else repr(text)}, expected a number"
                ) from None
        x1, y1 = max(0.0, values[0]), max(0.0, values[1])
        x2, y2 = min(float(width), values[2]), min(float(height), values[3])
        if not (x1 < x2 and y1 < y2):
            raise CollectionError(
                f"{path}: <object> {number} ({phrase!r}): box {values} is empty inside the "
                f"{width}x{height} image"
            )
        annotations.append(Annotation(phrase, (x1, y1, x2, y2)))
    return annotations


def import_thesis(out: str | Path, *, captions: Path, images: Path, annotations: Path | None,
                  name: str | None = None, force: bool = False, skip_bad: bool = False) -> dict:
    """Import caption_data.json + a folder of VOC XML (``<image stem>.xml``) + images."""
    from tqdm import tqdm

    captions, images = Path(captions), Path(images)
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CollectionError(f"{captions}: not a readable JSON file ({exc})") from exc
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CollectionError(f"{captions}: expected {{'images': [...]}} at the top level")
    if not images.is_dir():
        raise CollectionError(f"{images}: image folder does not exist")

    with CollectionWriter(out, name=name or Path(out).name, source=f"thesis:{captions}",
                          force=force) as writer:
        problems = _Problems(writer, skip_bad)
        (writer.root / "annotations").mkdir()
        pending: list[_Pending] = []
        for number, entry in enumerate(tqdm(entries, desc="importing", unit="artwork")):
            where = f"{captions}: images[{number}]"
            filename = entry.get("filename") if isinstance(entry, dict) else None
            if not isinstance(filename, str) or not filename or "/" in filename:
                problems.bad(where, "field 'filename' is missing or not a plain file name")
                continue
            where = f"{where} ({filename})"
            sentences = entry.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                problems.bad(where, "field 'sentences' is missing or empty")
                continue
            texts = [_clean(s.get("raw") or " ".join(s.get("tokens") or []))
                     if isinstance(s, dict) else "" for s in sentences]
            empty = [i for i, text in enumerate(texts) if not text]
            if empty:
                problems.bad(where, f"sentence {empty[0]} is empty")
                continue
            split = entry.get("filepath") if entry.get("filepath") in SPLITS else \
                entry.get("split") if entry.get("split") in SPLITS else None
            artwork_id = Path(filename).stem
            image = _read_image(problems, images / filename, where)
            if image is None:
                continue
            xml_path = annotations / f"{artwork_id}.xml" if annotations else None
            boxes: list[Annotation] = []
            if xml_path is not None and xml_path.is_file():
                try:
                    boxes = read_voc(xml_path, image.width, image.height)
                except CollectionError as exc:
                    problems.bad(where, str(exc))
                    continue
            relative = _keep_image(writer, image, artwork_id, filename, where)
            if relative is None:
                continue
            if xml_path is not None and boxes:
                (writer.root / "annotations" / xml_path.name).write_bytes(xml_path.read_bytes())
            pending.append(_Pending(Artwork(
                id=artwork_id, image=relative, sha256=image.sha256, width=image.width,
                height=image.height,
                split=split or split_for(artwork_id), title=texts[0],
                metadata={"source": "thesis"}, captions=list(dict.fromkeys(texts))[:MAX_CAPTIONS],
                annotations=boxes,
            ), [a.phrase for a in boxes]))
        _add_with_phrases(writer, pending)
        captions_out = [{"filename": Path(p.artwork.image or "").name, "filepath": p.artwork.split,
                         "sentences": [{"raw": c} for c in p.artwork.captions]} for p in pending]
        (writer.root / "caption_data.json").write_text(
            json.dumps({"images": captions_out}, indent=0), encoding="utf-8")
    return writer.counts


# ---------------------------------------------------------------------------- voc
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Source folder names that give a split; "valid" is what Roboflow's VOC export calls val.
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "test": "test"}


def import_voc(out: str | Path, *, source: Path, name: str | None = None, force: bool = False,
               skip_bad: bool = False) -> dict:
    """Import images with a Pascal VOC file beside each (``<stem>.xml``) and no captions.

    Labels become phrases (``_`` read as a space). Splits come from subfolders train/,
    valid/ or val/, test/ when ``source`` has them, else every image in ``source`` is split
    by a hash of its id. The counts carry ``suspicious_labels`` (see :func:`suspicious_labels`).
    """
    from tqdm import tqdm

    source = Path(source)
    if not source.is_dir():
        raise CollectionError(f"{source}: folder does not exist")
    folders = {folder: split for folder, split in SPLIT_FOLDERS.items() if (source / folder).is_dir()}
    images = sorted(
        (path, folders.get(path.parent.name))
        for path in (p for folder in (folders or {".": None}) for p in (source / folder).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CollectionError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in it"
                              + (f" or in {', '.join(folders)}/" if folders else ""))
    with CollectionWriter(out, name=name or Path(out).name, source=f"voc:{source}",
                          force=force) as writer:
        problems = _Problems(writer, skip_bad)
        seen: dict[str, Path] = {}
        for path, split in tqdm(images, desc="importing", unit="image"):
            artwork = _voc_artwork(writer, problems, path, split, seen)
            if artwork is not None:
                seen[artwork.id] = path
                writer.add(artwork)
    return {**writer.counts, "suspicious_labels": suspicious_labels(writer.artworks)}


def _voc_artwork(writer: CollectionWriter, problems: _Problems, path: Path,
                 split: str | None, seen: dict[str, Path]) -> Artwork | None:
    """One image and its VOC boxes as an artwork; None when it is bad (and skipped)."""
    xml_path = path.with_suffix(".xml")
    if not xml_path.is_file():
        problems.bad(str(path), f"no Pascal VOC file {xml_path.name} beside the image")
        return None
    image = _read_image(problems, path, str(path))
    if image is None:
        return None
    try:
        boxes = read_voc(xml_path, image.width, image.height, underscores=True)
    except CollectionError as exc:  # its message starts with the file (and line) it names
        where, _, reason = str(exc).partition(": ")
        problems.bad(where, reason)
        return None
    if not boxes:
        problems.bad(str(xml_path), "no <object> boxes: nothing to import for this image")
        return None
    artwork_id = path.stem
    if artwork_id in seen:
        problems.bad(str(path), f"id {artwork_id!r} (the file name) is also {seen[artwork_id]}")
        return None
    relative = _keep_image(writer, image, artwork_id, path.name, str(path))
    if relative is None:
        return None
    phrases = list(dict.fromkeys(a.phrase for a in boxes))
    return Artwork(
        id=artwork_id, image=relative, sha256=image.sha256, width=image.width,
        height=image.height, split=split or split_for(artwork_id), title=", ".join(phrases),
        metadata={"source": "voc", "file": path.name}, captions=[], phrases=phrases,
        annotations=boxes,
    )


def suspicious_labels(artworks: Sequence[Artwork], *, long_words: int = 4,
                      similar: float = 0.85) -> dict[str, list[str]]:
    """Labels that look wrong: sentence-long (``long_words`` words or more), near-duplicate
    spellings (difflib ratio >= ``similar``, or equal once spaces are dropped) and labels
    on a single box."""
    from difflib import SequenceMatcher

    boxes = Counter(a.phrase for artwork in artworks for a in artwork.annotations)
    labels = sorted(boxes)
    near = [f"{a} / {b}" for i, a in enumerate(labels) for b in labels[i + 1:]
            if a.replace(" ", "") == b.replace(" ", "")
            or SequenceMatcher(None, a, b).ratio() >= similar]
    return {
        "sentence_long": [label for label in labels if len(label.split()) >= long_words],
        "near_duplicates": near,
        "single_box": [label for label in labels if boxes[label] == 1],
    }


# ---------------------------------------------------------------------------- csv
@dataclass(frozen=True)
class CsvMapping:
    """Which CSV columns mean what. Columns not named here become metadata."""

    id_column: str = "ID"
    caption_columns: tuple[str, ...] = ("Title", "ObjectName", "Medium", "Period")
    title_column: str | None = None  # default: the first caption column
    image_pattern: str = "{id}.jpg"
    split_column: str | None = None


def _decode_csv(path: Path) -> str:
    """The file as text. Bytes that are not UTF-8 survive as lone surrogates, so the row
    that holds them can be reported (or skipped) on its own."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CollectionError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return data.decode("utf-8-sig", errors="surrogateescape")


def _undecodable(values: Sequence[str]) -> str | None:
    for value in values:
        for char in value:
            if "\udc80" <= char <= "\udcff":
                return f"byte 0x{ord(char) - 0xDC00:02x} in {value.encode('utf-8', 'replace')!r}"
    return None


def import_csv(out: str | Path, *, csv_path: Path, images: Path, mapping: CsvMapping,
               name: str | None = None, force: bool = False, skip_bad: bool = False,
               limit: int | None = None) -> dict:
    """Import a museum CSV export: one row per artwork, one caption per caption column."""
    from tqdm import tqdm

    csv_path, images = Path(csv_path), Path(images)
    if not images.is_dir():
        raise CollectionError(f"{images}: image folder does not exist")
    if not mapping.caption_columns:
        raise CollectionError("no caption columns given (--caption-columns)")
    if len(mapping.caption_columns) > MAX_CAPTIONS:
        raise CollectionError(
            f"{len(mapping.caption_columns)} caption columns, at most {MAX_CAPTIONS}")
    reader = csv.reader(_decode_csv(csv_path).splitlines(keepends=True), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise CollectionError(f"{csv_path}: empty file, expected a header line") from None
    except csv.Error as exc:
        raise CollectionError(f"{csv_path}:1: not valid CSV ({exc})") from exc
    header = [column.strip() for column in header]
    title_column = mapping.title_column or mapping.caption_columns[0]
    needed = [mapping.id_column, *mapping.caption_columns, title_column]
    if mapping.split_column:
        needed.append(mapping.split_column)
    missing = [c for c in dict.fromkeys(needed) if c not in header]
    if missing:
        raise CollectionError(
            f"{csv_path}:1: column(s) {', '.join(missing)} not in the header "
            f"(columns: {', '.join(header)})"
        )
    mapped = {mapping.id_column, *mapping.caption_columns, mapping.split_column}
    metadata_columns = [c for c in header if c not in mapped]

    with CollectionWriter(out, name=name or Path(out).name, source=f"csv:{csv_path}",
                          force=force) as writer:
        problems = _Problems(writer, skip_bad)
        pending: list[_Pending] = []
        seen_ids: dict[str, int] = {}
        progress = tqdm(desc="importing", unit="row")
        next_line = reader.line_num + 1  # fields may span lines: rows start where the last ended
        while limit is None or len(pending) + len(writer.skipped) < limit:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise CollectionError(f"{csv_path}:{next_line}: not valid CSV ({exc})") from exc
            line, next_line = next_line, reader.line_num + 1
            where = f"{csv_path}:{line}"
            progress.update()
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                lacking = header[len(values):]
                problems.bad(where, f"row has {len(values)} fields, the header has {len(header)}"
                             + (f" (missing {', '.join(lacking)})" if lacking else ""))
                continue
            odd = _undecodable(values)
            if odd:
                problems.bad(where, f"not UTF-8 text ({odd}); save the file as UTF-8")
                continue
            row = dict(zip(header, values, strict=True))
            artwork_id = _clean(row[mapping.id_column])
            if not artwork_id:
                problems.bad(where, f"column {mapping.id_column} is empty")
                continue
            if artwork_id in seen_ids:
                problems.bad(where, f"id {artwork_id!r} repeats line {seen_ids[artwork_id]}")
                continue
            seen_ids[artwork_id] = line
            captions = list(dict.fromkeys(
                text for text in (_clean(row[c]) for c in mapping.caption_columns) if text))
            if not captions:
                problems.bad(where, f"no caption text: columns "
                             f"{', '.join(mapping.caption_columns)} are all empty")
                continue
            split = split_for(artwork_id)
            if mapping.split_column:
                split = _clean(row[mapping.split_column]).lower()
                if split not in SPLITS:
                    problems.bad(where, f"column {mapping.split_column} is {split!r}, "
                                 f"expected one of {', '.join(SPLITS)}")
                    continue
            try:
                file_name = mapping.image_pattern.format(id=artwork_id)
            except (KeyError, IndexError, ValueError) as exc:
                raise CollectionError(
                    f"--image-pattern {mapping.image_pattern!r}: only {{id}} may be used ({exc})"
                ) from exc
            if "/" in file_name or file_name.startswith("."):
                problems.bad(where, f"id {artwork_id!r} gives the image name {file_name!r}, "
                             "which is not a plain file name")
                continue
            image = _read_image(problems, images / file_name, where)
            if image is None:
                continue
            relative = _keep_image(writer, image, artwork_id, file_name, where)
            if relative is None:
                continue
            pending.append(_Pending(Artwork(
                id=artwork_id, image=relative, sha256=image.sha256, width=image.width,
                height=image.height,
                split=split, title=_clean(row[title_column]),
                metadata={c.lower(): _clean(row[c]) for c in metadata_columns},
                captions=captions,
            ), []))
        progress.close()
        log.info("extracting phrases from %d captions", sum(len(p.artwork.captions)
                                                           for p in pending))
        _add_with_phrases(writer, pending)
    return writer.counts


# ---------------------------------------------------------------------------- scan-features
SCAN_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test", "testall": "test"}


def import_scan_features(out: str | Path, *, data: Path,
                         splits: Sequence[str] = ("train", "dev", "test"),
                         name: str | None = None, force: bool = False,
                         skip_bad: bool = False, shard_images: int = 512) -> dict:
    """Import SCAN's precomputed features: artworks without images plus a feature store.

    Each image's record is the mean of its regions as the whole image (row 0, kind 0),
    then its regions (kind 1) with zero boxes: the source has no boxes.
    """
    from tqdm import tqdm

    from index.featurestore import FeatureStore, RegionRecord
    from index.fragments import EXTRACTED, WHOLE

    data = Path(data)
    for prefix in splits:
        if prefix not in SCAN_SPLITS:
            raise CollectionError(
                f"split {prefix!r} is not one of {', '.join(SCAN_SPLITS)}")
    with CollectionWriter(out, name=name or Path(out).name, source=f"scan-features:{data}",
                          force=force) as writer:
        problems = _Problems(writer, skip_bad)
        # Created on the first append; its dim is the first record's.
        store = FeatureStore(writer.root / "features", extractor=SCAN_FEATURES_EXTRACTOR)
        pending: dict[str, _Pending] = {}
        for prefix in splits:
            features, captions = _read_scan_split(data, prefix, problems)
            per_image = 5 if len(captions) == 5 * len(features) else 1
            batch: list[tuple[str, RegionRecord]] = []
            for index in tqdm(range(len(features)), desc=f"importing {prefix}", unit="image"):
                regions = np.asarray(features[index], dtype=np.float32)  # (36, D)
                digest = sha256_of(regions.tobytes())
                texts = [t for t in captions[index * per_image:(index + 1) * per_image] if t]
                artwork_id = f"{prefix}-{index:06d}"
                owner = writer.claim(digest, artwork_id)
                if owner is not None:  # an image repeated once per caption: merge captions
                    kept = pending[owner].artwork
                    kept.captions = list(dict.fromkeys([*kept.captions, *texts]))[:MAX_CAPTIONS]
                    continue
                if not texts:
                    problems.bad(f"{data / f'{prefix}_caps.txt'}", f"image {index} has no caption")
                    continue
                pending[artwork_id] = _Pending(Artwork(
                    id=artwork_id, image=None, sha256=digest, width=None, height=None,
                    split=SCAN_SPLITS[prefix], title=texts[0],
                    metadata={"source": "scan-features", "row": str(index)},
                    captions=texts[:MAX_CAPTIONS],
                ), [])
                n = len(regions)
                whole = regions.mean(axis=0, keepdims=True)  # (1, D)
                batch.append((artwork_id, RegionRecord(
                    boxes=np.zeros((n + 1, 4), np.float32),
                    scores=np.ones(n + 1, np.float32),
                    features=np.concatenate([whole, regions]),  # (n + 1, D)
                    kinds=np.array([WHOLE] + [EXTRACTED] * n, np.int8),
                )))
                if len(batch) == shard_images:
                    store.append_many(batch)
                    batch = []
            if batch:
                store.append_many(batch)
        _add_with_phrases(writer, list(pending.values()))
    return writer.counts


def _read_scan_split(data: Path, prefix: str, problems: _Problems
                     ) -> tuple[np.ndarray, list[str]]:
    """(N, R, D) features (memory-mapped) and the caption lines of one split."""
    ims_path, caps_path = data / f"{prefix}_ims.npy", data / f"{prefix}_caps.txt"
    try:
        features = np.load(ims_path, mmap_mode="r")
    except FileNotFoundError:
        raise CollectionError(f"{ims_path}: missing") from None
    except (OSError, ValueError) as exc:
        raise CollectionError(f"{ims_path}: not a readable .npy file ({exc})") from exc
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
        raise CollectionError(
            f"{ims_path}: expected a float array (N, regions, D), got {features.dtype} "
            f"{features.shape}")
    try:
        lines = caps_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CollectionError(f"{caps_path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CollectionError(f"{caps_path}: cannot be read as UTF-8 ({exc})") from exc
    if len(lines) not in (len(features), 5 * len(features)):
        raise CollectionError(
            f"{caps_path}: {len(lines)} captions for {len(features)} images in {ims_path.name}; "
            "expected 5 per image (or one per row when each image is repeated per caption)")
    captions = []
    for number, text in enumerate(lines, start=1):
        text = _clean(text)
        if not text:
            problems.bad(f"{caps_path}:{number}", "empty caption")
        captions.append(text)
    return features, captions
