"""One-file checkpoints: everything needed to rebuild a model, and its version.

A checkpoint is a ``torch.save``d dict::

    {"format": "artalign-checkpoint", "version": 1, "kind": "scan" | "detector" | ...,
     "config": {...}, "state_dict": {name: Tensor}, "vocab": [str] | None, "record": {...} | None}

It holds only tensors and plain Python values, so it loads with ``weights_only=True`` (no
code runs while loading a file from elsewhere). It is written to a temporary file in the
target's folder, fsynced, then ``os.replace``d: a crash never leaves half a checkpoint
under the real name. The sha256 of the file is the model version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from index.atomic import write_atomic

FORMAT = "artalign-checkpoint"
VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint asked for; the message says why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


@dataclass
class Checkpoint:
    kind: str
    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    vocab: list[str] | None
    record: dict[str, Any] | None
    sha256: str
    path: Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``weights_only=True`` loading would reject, at save time, so a
    checkpoint that was written can always be read back."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where}: keys must be strings, got {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise CheckpointError(
        f"{where}: {type(value).__name__} is not a plain value (use None, bool, int, float, "
        "str, list or dict; convert numpy values with .item() or .tolist())"
    )


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    state_dict: dict[str, Tensor],
    vocab: list[str] | None = None,
    record: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically and return the sha256 of the written file."""
    path = Path(path)
    if not kind or not isinstance(kind, str):
        raise CheckpointError(f"{path}: kind must be a non-empty string, got {kind!r}")
    _check_plain(config, "config")
    _check_plain(record, "record")
    if vocab is not None and not all(isinstance(t, str) for t in vocab):
        raise CheckpointError(f"{path}: vocab must be a list of strings")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a Tensor")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": dict(config),
        # CPU copies: a checkpoint written on a GPU must load on a machine without one.
        "state_dict": {name: t.detach().cpu() for name, t in state_dict.items()},
        "vocab": list(vocab) if vocab is not None else None,
        "record": record,
    }
    write_atomic(path, lambda handle: torch.save(payload, handle))
    return file_sha256(path)


def load_checkpoint(
    path: str | Path, *, kind: str | None = None, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; ``kind`` checks what it holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        if head == _ZIP_MAGIC:
            raise CheckpointError(
                f"{path}: a torch file that cannot be read (truncated or corrupted?): {exc}"
            ) from exc
        raise CheckpointError(
            f"{path}: not a torch checkpoint file (expected an {FORMAT} written by artalign)"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = (
            "a plain state dict or another program's torch file"
            if isinstance(payload, dict)
            else f"a torch file holding a {type(payload).__name__}"
        )
        raise CheckpointError(f"{path}: {what}, not an {FORMAT} (no format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: {FORMAT} version {payload.get('version')!r}, this artalign reads version "
            f"{VERSION}"
        )
    missing = [k for k in ("kind", "config", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: {FORMAT} without {', '.join(missing)}")
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(
            f"{path}: a {payload['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here"
        )
    return Checkpoint(
        kind=payload["kind"],
        config=payload["config"],
        state_dict=payload["state_dict"],
        vocab=payload.get("vocab"),
        record=payload.get("record"),
        sha256=file_sha256(path),
        path=path,
    )


def resolve_device(device: str) -> str:
    """Where a loaded model runs: "auto" -> "cuda" when torch sees a GPU, else "cpu";
    anything else as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
