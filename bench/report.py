"""What every benchmark does once it has run: print its table and its JSON report, write the
JSON atomically when asked; and the ``python -m bench.X`` entry point.

Standard library only: ``artalign bench`` imports the benchmark modules (for their
arguments) when it builds its parser, and ``artalign --help`` has to stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from index.atomic import write_json_atomic

log = logging.getLogger(__name__)


def write_json(path: Path, report: dict[str, Any]) -> None:
    write_json_atomic(path, report, indent=2)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``, the option every benchmark hands to :func:`publish`."""
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the JSON report here (atomically)")


def publish(report: dict[str, Any], table_text: str, json_path: Path | None) -> None:
    """Print the table (for people) and the JSON report (for scripts); write the JSON to
    ``json_path`` too unless it is None."""
    print(table_text)
    print(json.dumps(report, indent=2))
    if json_path is not None:
        write_json(json_path, report)
        log.info("wrote %s", json_path)


def require_positive(options: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first of the options ``names`` (attribute names) below 1."""
    for name in names:
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def run_as_main(
    prog: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], int],
) -> NoReturn:
    """``python -m bench.X``: the benchmark's own parser (described by the first paragraph of
    its docstring ``doc``), logging at INFO, then ``main``'s return value as the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(parser.parse_args()))
