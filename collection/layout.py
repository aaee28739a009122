"""A collection on disk: artworks, their images, captions, phrases and annotations.

```
<root>/collection.json   {"format": "artalign-collection", "version": 1, "name", "source", "counts"}
<root>/artworks.jsonl    one artwork per line (see :class:`Artwork`)
<root>/images/...        the images (absent for a precomputed-feature import)
<root>/vocab.json        {"words": [...], "phrases": [...]}
<root>/skipped.json      what an import skipped with --skip-bad, and why (only when it did)
```

:class:`CollectionWriter` builds a collection in a temporary folder beside the target and
renames it into place only when everything is written, so a reader never sees a
half-written collection and a failed import leaves the old one untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index.atomic import write_text_atomic
from models.vocab import Vocabulary, tokenize

log = logging.getLogger(__name__)

FORMAT = "artalign-collection"
VERSION = 1
SPLITS = ("train", "val", "test")
MAX_CAPTIONS = 5  # as in the thesis: at most five sentences per artwork
WORD_MIN_COUNT = 2  # thesis: words seen fewer than twice become <unk>
PHRASE_MIN_COUNT = 4  # thesis: phrases seen fewer than four times are not retrievable units


class CollectionError(ValueError):
    """A collection (or an import source) that cannot be used; names the file, line and field."""


@dataclass(frozen=True)
class Annotation:
    """Ground truth: a phrase and its box, ``[x1, y1, x2, y2]`` in original pixels."""

    phrase: str
    box: tuple[float, float, float, float]


@dataclass
class Artwork:
    """One catalogued object: one image (or none for a precomputed-feature import)."""

    id: str
    image: str | None
    sha256: str
    width: int | None
    height: int | None
    split: str
    title: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["annotations"] = [
            {"phrase": a.phrase, "box": [float(v) for v in a.box]} for a in self.annotations
        ]
        return record

    @classmethod
    def from_json(cls, record: Any, where: str) -> Artwork:
        """Parse and validate one artworks.jsonl record; errors name ``where`` and the field."""
        if not isinstance(record, dict):
            raise CollectionError(f"{where}: an artwork must be a JSON object")

        def need(name: str, kinds: type | tuple[type, ...], optional: bool = False) -> Any:
            if name not in record:
                raise CollectionError(f"{where}: field '{name}' is missing")
            value = record[name]
            if (value is None and optional) or isinstance(value, kinds):
                return value
            raise CollectionError(f"{where}: field '{name}' has the wrong type ({value!r})")

        def strings(name: str) -> list[str]:
            values = need(name, list)
            if not all(isinstance(v, str) for v in values):
                raise CollectionError(f"{where}: field '{name}' must be a list of strings")
            return values

        artwork_id = need("id", str)
        if not artwork_id.strip():
            raise CollectionError(f"{where}: field 'id' is empty")
        split = need("split", str)
        if split not in SPLITS:
            raise CollectionError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
        captions = strings("captions")
        if len(captions) > MAX_CAPTIONS:
            raise CollectionError(f"{where}: {len(captions)} captions, at most {MAX_CAPTIONS}")
        if any(not c.strip() for c in captions):
            raise CollectionError(f"{where}: field 'captions' holds an empty caption")
        metadata = need("metadata", dict)
        annotations = []
        for i, item in enumerate(need("annotations", list)):
            box = item.get("box") if isinstance(item, dict) else None
            phrase = item.get("phrase") if isinstance(item, dict) else None
            if not isinstance(phrase, str) or not phrase or not isinstance(box, list) or len(box) != 4:
                raise CollectionError(
                    f"{where}: annotations[{i}] must be {{'phrase': str, 'box': [x1, y1, x2, y2]}}"
                )
            x1, y1, x2, y2 = (float(v) for v in box)
            if not (0 <= x1 < x2 and 0 <= y1 < y2):
                raise CollectionError(f"{where}: annotations[{i}] box {box} is not x1<x2, y1<y2")
            annotations.append(Annotation(phrase, (x1, y1, x2, y2)))
        return cls(
            id=artwork_id,
            image=need("image", str, optional=True),
            sha256=need("sha256", str),
            width=need("width", int, optional=True),
            height=need("height", int, optional=True),
            split=split,
            title=need("title", str),
            metadata={str(k): str(v) for k, v in metadata.items()},
            captions=captions,
            phrases=strings("phrases"),
            annotations=annotations,
        )


def split_for(artwork_id: str) -> str:
    """Deterministic 80/10/10 split by a hash of the id, for sources that have none."""
    bucket = int.from_bytes(hashlib.sha256(artwork_id.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_vocabularies(
    artworks: Iterable[Artwork], *, word_min_count: int = WORD_MIN_COUNT,
    phrase_min_count: int = PHRASE_MIN_COUNT,
) -> tuple[Vocabulary, Vocabulary]:
    """Word vocabulary over caption tokens and phrase vocabulary over artwork phrases.

    A phrase counts once per artwork that it describes (from its captions or annotations).
    An artwork without captions (boxes named by curators, no sentences) lends its phrases
    to the word vocabulary instead, so that its phrases can be encoded at all.
    """
    artworks = list(artworks)
    words = Vocabulary.build(
        (tokenize(text) for a in artworks for text in (a.captions or a.phrases)), word_min_count
    )
    phrases = Vocabulary.build(
        (set(a.phrases) | {n.phrase for n in a.annotations} for a in artworks), phrase_min_count
    )
    return words, phrases


def replace_vocab(root: Path, words: Vocabulary, phrases: Vocabulary) -> None:
    """Give an existing collection new vocabularies, and update its counts to match."""
    info_path = root / "collection.json"
    info = _read_json(info_path)
    write_vocab(root, words, phrases)
    info.setdefault("counts", {}).update(word_vocab=len(words), phrase_vocab=len(phrases))
    write_text_atomic(info_path, json.dumps(info, indent=1))


def write_vocab(root: Path, words: Vocabulary, phrases: Vocabulary) -> None:
    """Write ``root``/vocab.json atomically (temporary file, then rename)."""
    write_text_atomic(root / "vocab.json", json.dumps(
        {"words": words.to_json(), "phrases": phrases.to_json()}, ensure_ascii=False, indent=0
    ))


class Collection:
    """A collection read from disk and validated line by line."""

    def __init__(self, root: Path, info: dict[str, Any], artworks: list[Artwork],
                 word_vocab: Vocabulary, phrase_vocab: Vocabulary):
        self.root = root
        self.info = info
        self.name: str = info.get("name", root.name)
        self.source: str = info.get("source", "")
        self.artworks = artworks
        self.word_vocab = word_vocab
        self.phrase_vocab = phrase_vocab
        self._by_id = {a.id: a for a in artworks}

    @classmethod
    def load(cls, root: str | Path) -> Collection:
        root = Path(root)
        info_path = root / "collection.json"
        if not info_path.is_file():
            raise CollectionError(f"{root}: not a collection (no collection.json)")
        info = _read_json(info_path)
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CollectionError(f"{info_path}: field 'format' must be {FORMAT!r}")
        if info.get("version") != VERSION:
            raise CollectionError(
                f"{info_path}: version {info.get('version')!r} is not supported (expected {VERSION})"
            )
        artworks_path = root / "artworks.jsonl"
        artworks: list[Artwork] = []
        seen: dict[str, int] = {}
        try:
            lines = artworks_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CollectionError(f"{artworks_path}: cannot be read ({exc})") from exc
        for number, line in enumerate(lines, start=1):
            where = f"{artworks_path}:{number}"
            if not line.strip():
                raise CollectionError(f"{where}: empty line")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CollectionError(f"{where}: not valid JSON ({exc.msg})") from exc
            artwork = Artwork.from_json(record, where)
            if artwork.id in seen:
                raise CollectionError(
                    f"{where}: id {artwork.id!r} repeats line {seen[artwork.id]}"
                )
            seen[artwork.id] = number
            if artwork.image is not None and not (root / artwork.image).is_file():
                raise CollectionError(f"{where}: image file {artwork.image} does not exist")
            artworks.append(artwork)
        vocab_path = root / "vocab.json"
        vocab = _read_json(vocab_path)
        try:
            word_vocab, phrase_vocab = Vocabulary(vocab["words"]), Vocabulary(vocab["phrases"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CollectionError(
                f"{vocab_path}: must be {{'words': [...], 'phrases': [...]}} ({exc})"
            ) from exc
        return cls(root, info, artworks, word_vocab, phrase_vocab)

    def __len__(self) -> int:
        return len(self.artworks)

    def __getitem__(self, artwork_id: str) -> Artwork:
        return self._by_id[artwork_id]

    def image_path(self, artwork: Artwork) -> Path:
        if artwork.image is None:
            raise CollectionError(f"{self.root}: artwork {artwork.id!r} has no image")
        return self.root / artwork.image

    def split(self, name: str) -> list[Artwork]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [a for a in self.artworks if a.split == name]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CollectionError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CollectionError(f"{path}: not valid JSON ({exc})") from exc


class CollectionWriter:
    """Writes a collection into a temporary folder beside ``target``; renames it in at the end.

    Use as a context manager. Inside, write extra files (images, annotations) under
    :attr:`root` and :meth:`add` artworks; :meth:`skip` records bad input that was left out.
    Leaving the block with an exception removes the temporary folder and keeps ``target``.
    An existing ``target`` is refused unless ``force``, and then replaced only at the end.
    """

    def __init__(self, target: str | Path, *, name: str, source: str, force: bool = False):
        self.target = Path(target).resolve()
        if self.target.exists() and not force:
            raise CollectionError(f"{self.target}: already exists (use --force to replace it)")
        self.name = name
        self.source = source
        self.root = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        self.artworks: list[Artwork] = []
        self.skipped: list[dict[str, str]] = []
        self._ids: set[str] = set()
        self._sha256: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> CollectionWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "images").mkdir(parents=True)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def claim(self, sha256: str, artwork_id: str) -> str | None:
        """Register ``artwork_id``'s content hash; returns the earlier owner if it is a duplicate."""
        owner = self._sha256.setdefault(sha256, artwork_id)
        return owner if owner != artwork_id else None

    def add(self, artwork: Artwork) -> None:
        if artwork.id in self._ids:
            raise CollectionError(f"artwork id {artwork.id!r} appears twice")
        self._ids.add(artwork.id)
        self.artworks.append(artwork)

    def skip(self, where: str, reason: str) -> None:
        """Record bad input that ``--skip-bad`` left out; listed at the end and in skipped.json."""
        log.warning("skipped %s: %s", where, reason)
        self.skipped.append({"where": where, "reason": reason})

    def _finish(self) -> None:
        if not self.artworks:
            raise CollectionError(f"{self.target}: nothing to write (no usable artworks)")
        words, phrases = build_vocabularies(self.artworks)
        write_text_atomic(
            self.root / "artworks.jsonl",
            "".join(json.dumps(a.to_json(), ensure_ascii=False) + "\n" for a in self.artworks),
        )
        write_vocab(self.root, words, phrases)
        if self.skipped:
            write_text_atomic(self.root / "skipped.json", json.dumps(self.skipped, indent=1))
        if not any((self.root / "images").iterdir()):
            (self.root / "images").rmdir()
        split_counts = Counter(a.split for a in self.artworks)
        counts = {
            "artworks": len(self.artworks),
            **{split: split_counts.get(split, 0) for split in SPLITS},
            "captions": sum(len(a.captions) for a in self.artworks),
            "annotations": sum(len(a.annotations) for a in self.artworks),
            "distinct_phrases": len({p for a in self.artworks for p in a.phrases}),
            "distinct_words": len({t for a in self.artworks for c in a.captions for t in tokenize(c)}),
            "word_vocab": len(words),
            "phrase_vocab": len(phrases),
            "skipped": len(self.skipped),
        }
        write_text_atomic(self.root / "collection.json", json.dumps(
            {"format": FORMAT, "version": VERSION, "name": self.name, "source": self.source,
             "counts": counts}, indent=1
        ))
        self._swap_in()
        log.info("wrote %s: %s", self.target, counts)
        if self.skipped:
            log.warning("skipped %d bad input(s), listed in %s:\n%s", len(self.skipped),
                        self.target / "skipped.json",
                        "\n".join(f"  {s['where']}: {s['reason']}" for s in self.skipped))
        self.counts = counts

    def _swap_in(self) -> None:
        """Replace the target by the finished folder; the old one is removed only afterwards."""
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.root, self.target)
        if old is not None:
            shutil.rmtree(old)


