"""Commands that make collections: `synth`, `import thesis|csv|voc|scan-features`, `vocab`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth",
        help="render a synthetic, fully annotated collection",
        description=(
            "Render artwork-like images (vases, bowls, stelae... decorated with coloured "
            "motifs) with Pascal VOC boxes for every motif group and 1-5 captions each, "
            "as a collection: images/, annotations/, caption_data.json, artworks.jsonl, "
            "vocab.json. The same --seed always gives byte-identical files."
        ),
    )
    synth.add_argument("--out", required=True, type=Path, help="collection folder to write")
    synth.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    synth.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--force", action="store_true", help="replace --out if it exists")
    synth.set_defaults(handler=_synth)

    importer = subparsers.add_parser(
        "import",
        help="import an existing collection (thesis format, museum CSV, precomputed features)",
        description="Turn an existing source into a collection folder (see `import FORMAT -h`).",
    )
    formats = importer.add_subparsers(dest="format", metavar="FORMAT", required=True)

    thesis = formats.add_parser(
        "thesis",
        help="caption_data.json + Pascal VOC annotations + images (the thesis's format)",
        description=(
            "Import the thesis's layout: a caption_data.json ({'images': [{'filename', "
            "'filepath': train|val|test, 'sentences': [{'raw'}]}]}), a folder of Pascal VOC "
            "XML files named after the images, and the image folder."
        ),
    )
    thesis.add_argument("--captions", required=True, type=Path, help="caption_data.json")
    thesis.add_argument("--images", required=True, type=Path, help="folder of images")
    thesis.add_argument("--annotations", type=Path,
                        help="folder of VOC XML files <image stem>.xml (optional)")
    _common_import_options(thesis)
    thesis.set_defaults(handler=_import_thesis)

    csv_parser = formats.add_parser(
        "csv",
        help="a museum CSV export + an image folder",
        description=(
            "Import a museum's CSV export: one row per artwork. The id column names the\n"
            "artwork and its image file (--image-pattern); each caption column gives one\n"
            "caption; every other column is kept as metadata. Example:\n"
            "  artalign import csv --csv metadata.csv --images images --out var/egyptian \\\n"
            "    --id-column ID --caption-columns Title,ObjectName,Medium,Period "
            "--image-pattern '{id}.jpg'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv_parser.add_argument("--csv", required=True, type=Path, help="the CSV file (UTF-8)")
    csv_parser.add_argument("--images", required=True, type=Path, help="folder of images")
    csv_parser.add_argument("--id-column", default="ID", help="column with the artwork id")
    csv_parser.add_argument("--caption-columns", default="Title,ObjectName,Medium,Period",
                            help="comma-separated columns, one caption each (at most 5)")
    csv_parser.add_argument("--title-column", default=None,
                            help="column with the title (default: the first caption column)")
    csv_parser.add_argument("--image-pattern", default="{id}.jpg",
                            help="image file name inside --images, from the id (default {id}.jpg)")
    csv_parser.add_argument("--split-column", default=None,
                            help="column holding train/val/test (default: split by id hash)")
    csv_parser.add_argument("--limit", type=int, default=None, help="import only the first N rows")
    _common_import_options(csv_parser)
    csv_parser.set_defaults(handler=_import_csv)

    voc = formats.add_parser(
        "voc",
        help="images with Pascal VOC boxes and no captions (labels become phrases)",
        description=(
            "Import a museum whose curators drew and named boxes but wrote no captions: images\n"
            "(.jpg, .jpeg, .png) each with a Pascal VOC file <image stem>.xml beside it. Box\n"
            "labels become the artwork's phrases, '_' read as a space (mary_and_child -> 'mary\n"
            "and child'). Splits come from subfolders train/, valid/ (or val/) and test/ when\n"
            "--source has them, else by a hash of the file name (80/10/10). The summary lists\n"
            "labels that look wrong: sentence-long, near-duplicate spellings, a single box.\n"
            "Example:\n"
            "  artalign import voc --source ../shared/data/byzart-dev --out var/byzart"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    voc.add_argument("--source", required=True, type=Path,
                     help="folder of images + VOC files, or of train/ valid/ test/ folders of them")
    _common_import_options(voc)
    voc.set_defaults(handler=_import_voc)

    scan = formats.add_parser(
        "scan-features",
        help="SCAN's precomputed bottom-up features: {split}_ims.npy + {split}_caps.txt",
        description=(
            "Import SCAN's precomputed data: for each split, {split}_ims.npy (N, 36, 2048) "
            "region features and {split}_caps.txt (5 captions per image, one per line). "
            "Writes artworks without images and a feature store under features/."
        ),
    )
    scan.add_argument("--data", required=True, type=Path, help="folder with the .npy/.txt files")
    scan.add_argument("--splits", default="train,dev,test",
                      help="comma-separated split file prefixes (default train,dev,test; dev "
                           "becomes val)")
    _common_import_options(scan)
    scan.set_defaults(handler=_import_scan)

    vocab = subparsers.add_parser(
        "vocab",
        help="rebuild or show a collection's word and phrase vocabularies",
        description=(
            "Rebuild vocab.json of a collection from its artworks (words over caption tokens, "
            "phrases over artwork phrases) and show the most frequent entries."
        ),
    )
    vocab.add_argument("collection", type=Path, help="collection folder")
    vocab.add_argument("--word-min-count", type=int, default=None,
                       help="keep words seen at least this often (default 2, as in the thesis)")
    vocab.add_argument("--phrase-min-count", type=int, default=None,
                       help="keep phrases seen in at least this many artworks (default 4)")
    vocab.add_argument("--show", type=int, default=20, help="print this many top phrases")
    vocab.set_defaults(handler=_vocab)


def _common_import_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="collection folder to write")
    parser.add_argument("--name", default=None, help="collection name (default: folder name)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out bad rows/images instead of stopping; they are listed "
                             "at the end and in skipped.json")


def _synth(args: argparse.Namespace) -> int:
    from collection.synth import synthesise

    counts = synthesise(args.out, n=args.n, seed=args.seed, size=args.size, force=args.force)
    print(json.dumps(counts, indent=1))
    return 0


def _import_thesis(args: argparse.Namespace) -> int:
    from collection.importers import import_thesis

    counts = import_thesis(args.out, captions=args.captions, images=args.images,
                           annotations=args.annotations, name=args.name, force=args.force,
                           skip_bad=args.skip_bad)
    print(json.dumps(counts, indent=1))
    return 0


def _import_csv(args: argparse.Namespace) -> int:
    from collection.importers import CsvMapping, import_csv

    mapping = CsvMapping(
        id_column=args.id_column,
        caption_columns=tuple(c.strip() for c in args.caption_columns.split(",") if c.strip()),
        title_column=args.title_column,
        image_pattern=args.image_pattern,
        split_column=args.split_column,
    )
    counts = import_csv(args.out, csv_path=args.csv, images=args.images, mapping=mapping,
                        name=args.name, force=args.force, skip_bad=args.skip_bad,
                        limit=args.limit)
    print(json.dumps(counts, indent=1))
    return 0


def _import_voc(args: argparse.Namespace) -> int:
    from collection.importers import import_voc

    counts = import_voc(args.out, source=args.source, name=args.name, force=args.force,
                        skip_bad=args.skip_bad)
    suspicious = counts.pop("suspicious_labels")
    print(json.dumps(counts, indent=1))
    for kind, labels in suspicious.items():
        if labels:
            print(f"labels to check, {kind.replace('_', ' ')} ({len(labels)}): {'; '.join(labels)}")
    return 0


def _import_scan(args: argparse.Namespace) -> int:
    from collection.importers import import_scan_features

    counts = import_scan_features(
        args.out, data=args.data, splits=tuple(s.strip() for s in args.splits.split(",")),
        name=args.name, force=args.force, skip_bad=args.skip_bad,
    )
    print(json.dumps(counts, indent=1))
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from collection.layout import (
        PHRASE_MIN_COUNT,
        WORD_MIN_COUNT,
        Collection,
        build_vocabularies,
        replace_vocab,
    )

    collection = Collection.load(args.collection)
    words, phrases = build_vocabularies(
        collection.artworks,
        word_min_count=args.word_min_count or WORD_MIN_COUNT,
        phrase_min_count=args.phrase_min_count or PHRASE_MIN_COUNT,
    )
    replace_vocab(collection.root, words, phrases)
    print(f"{collection.root}: {len(words)} words, {len(phrases)} phrases "
          f"(both counting the 4 special tokens)")
    for phrase in phrases.tokens[4:4 + args.show]:
        print(f"  {phrase}")
    return 0
