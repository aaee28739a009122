"""The `artalign` command line.

Every module in this package that defines ``register(subparsers)`` adds its own
sub-commands; heavy imports (torch, spaCy, FAISS) happen inside the command handlers so
that ``artalign --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="artalign",
        description=(
            "Align fragments of artwork images with noun phrases of their descriptions.\n"
            "Typical flow: synth or import a collection -> train-detector -> extract -> "
            "train -> evaluate -> serve.  `artalign demo` does all of it on embedded defaults."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as exc:
        # Domain errors (bad input, a missing file) subclass ValueError/FileNotFoundError and
        # carry a message that names what is wrong: one line, no traceback, unless -v.
        if args.verbose:
            raise
        print(f"artalign {args.command}: error: {exc}", file=sys.stderr)
        return 2


class UserError(Exception):
    """An error the user can fix from the command line: printed as one line, exit status 2."""


if __name__ == "__main__":
    sys.exit(main())
