"""One-file checkpoints: round trip, atomic writes, and clear refusals of unusable files."""

from __future__ import annotations

import hashlib

import pytest
import torch

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)


def _save(path, **overrides):
    arguments = dict(
        kind="scan",
        config={"embed_dim": 8, "direction": "t2i", "nested": {"chunks": [1, 2]}},
        state_dict={"layer.weight": torch.randn(3, 4), "layer.bias": torch.zeros(3)},
        vocab=["<pad>", "<start>", "<end>", "<unk>", "vase"],
        record={"epoch": 2, "rsum": 123.5, "history": [0.5, 0.25]},
    )
    arguments.update(overrides)
    return save_checkpoint(path, **arguments), arguments


def test_round_trip_keeps_everything_and_returns_the_file_sha256(tmp_path):
    path = tmp_path / "model.pt"
    sha256, saved = _save(path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)

    checkpoint = load_checkpoint(path, kind="scan")
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.kind == "scan"
    assert checkpoint.config == saved["config"]
    assert checkpoint.vocab == saved["vocab"]
    assert checkpoint.record == saved["record"]
    assert checkpoint.sha256 == sha256
    assert checkpoint.path == path
    assert checkpoint.state_dict.keys() == saved["state_dict"].keys()
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(checkpoint.state_dict[name], tensor)


def test_kind_none_accepts_any_kind_and_vocab_record_are_optional(tmp_path):
    path = tmp_path / "detector.pt"
    save_checkpoint(path, kind="detector", config={"classes": 3}, state_dict={})
    checkpoint = load_checkpoint(path)
    assert (checkpoint.kind, checkpoint.vocab, checkpoint.record) == ("detector", None, None)


def test_overwrite_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "model.pt"
    first, _ = _save(path)
    second, _ = _save(path, record={"epoch": 3})
    assert first != second
    assert load_checkpoint(path).record == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_value_that_could_not_be_loaded_back_is_refused_at_save_time(tmp_path):
    import numpy as np

    path = tmp_path / "model.pt"
    with pytest.raises(CheckpointError, match=r"record\.best.*float32.*not a plain value"):
        _save(path, record={"best": np.float32(0.5)})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match="nowhere.pt: checkpoint file not found"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.pt: .*cannot be read \(truncated or corrupted"):
        load_checkpoint(path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="notes.pt: not a torch checkpoint file"):
        load_checkpoint(path)


def test_plain_state_dict_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="plain.pt: a plain state dict.*no format marker"):
        load_checkpoint(path)
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match="tensor.pt: a torch file holding a Tensor"):
        load_checkpoint(path)


def test_wrong_kind_says_what_the_file_is_and_what_was_needed(tmp_path):
    path = tmp_path / "detector.pt"
    save_checkpoint(path, kind="detector", config={}, state_dict={})
    with pytest.raises(CheckpointError, match="a 'detector' checkpoint, but a 'scan' checkpoint"):
        load_checkpoint(path, kind="scan")


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "artalign-checkpoint", "version": 2, "kind": "scan"}, path)
    with pytest.raises(CheckpointError, match="version 2, this artalign reads version 1"):
        load_checkpoint(path)
