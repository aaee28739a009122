"""Choose the real demo collection: a few hundred CC0 Egyptian objects, balanced across kinds.

    python demo/real/select_subset.py --source ../shared/data/egyptian-cc0 --out demo/real

Each object goes to the first kind below whose pattern matches its Title or ObjectName; a
kind keeps at most its quota, the objects with the smallest sha1 of their ID (so the choice
is reproducible and not biased to one museum's numbering). Images whose bytes repeat an
earlier pick are left out, as `artalign import csv` would drop them. Writes OUT/images/
(the 224 px copies) and OUT/metadata.csv (the source's own rows, columns and quoting).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path

# (kind, pattern over "Title ObjectName" in lower case, quota): what a first-time visitor
# is likely to type, then enough of everything else that the collection looks like a museum.
KINDS: list[tuple[str, str, int]] = [
    ("canopic jar", r"\bcanopic", 20),
    ("seated statue", r"\bseated\b", 22),
    ("standing statue", r"\bstanding\b", 12),
    ("cat", r"\bcats?\b", 15),
    ("shabti", r"\bu?shabtis?\b|\bushebtis?\b", 12),
    ("shawabty", r"\bshawabtys?\b", 12),
    ("scarab", r"\bscarabs?\b", 20),
    ("stela", r"\bstela\b|\bstelae\b|\bstele\b", 22),
    ("relief", r"\breliefs?\b", 20),
    ("amulet", r"\bamulets?\b", 22),
    ("statue", r"\bstatues?\b|\bstatuettes?\b|\bfigurines?\b", 22),
    ("head", r"\bheads?\b", 12),
    ("coffin or mask", r"\bcoffins?\b|\bmasks?\b|\bmumm", 12),
    ("jar", r"\bjars?\b", 20),
    ("vessel", r"\bvessels?\b|\bvases?\b|\bbottles?\b|\bflasks?\b", 16),
    ("bowl or cup", r"\bbowls?\b|\bcups?\b|\bdish(es)?\b", 12),
    ("jewellery", r"\bnecklace|\bpendants?\b|\bearrings?\b|\brings?\b|\bbeads?\b|\bbracelets?\b|\bcollar", 20),
    ("cosmetics", r"\bmirrors?\b|\bkohl\b|\bcosmetic|\bpalettes?\b", 10),
    ("model or tool", r"\bmodel\b|\bwand\b|\badze\b|\bax\b|\bchisel", 10),
    ("papyrus or drawing", r"\bpapyrus|\bdrawing|\bfacsimile", 10),
    ("coin", r"\bcoins?\b", 8),
    ("sealing", r"\bseal(ing)?s?\b", 8),
]


def kind_of(row: dict[str, str]) -> str | None:
    text = f"{row['Title']} {row['ObjectName']}".lower()
    return next((kind for kind, pattern, _ in KINDS if re.search(pattern, text)), None)


def select(source: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The source's header and the chosen rows, in the source's order."""
    with open(source / "metadata.csv", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = list(reader.fieldnames or []), list(reader)
    quota = {kind: n for kind, _, n in KINDS}
    chosen: set[str] = set()
    seen_images: set[str] = set()
    for row in sorted(rows, key=lambda r: hashlib.sha1(r["ID"].encode()).hexdigest()):
        kind = kind_of(row)
        image = source / "images" / f"{row['ID']}.jpg"
        if kind is None or quota[kind] == 0 or not image.is_file():
            continue
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        if digest in seen_images:
            continue
        seen_images.add(digest)
        quota[kind] -= 1
        chosen.add(row["ID"])
    return header, [row for row in rows if row["ID"] in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True,
                        help="the Egyptian CC0 folder (metadata.csv, images/)")
    parser.add_argument("--out", type=Path, required=True, help="where to write images/ and metadata.csv")
    args = parser.parse_args()
    header, rows = select(args.source)
    images = args.out / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    for row in rows:
        shutil.copyfile(args.source / "images" / f"{row['ID']}.jpg", images / f"{row['ID']}.jpg")
    with open(args.out / "metadata.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)  # QUOTE_MINIMAL, \r\n: as the source
        writer.writeheader()
        writer.writerows(rows)
    counts = Counter(kind_of(row) for row in rows)
    print(f"{len(rows)} objects into {args.out}: "
          + ", ".join(f"{kind} {counts.get(kind, 0)}" for kind, _, _ in KINDS))


if __name__ == "__main__":
    main()
