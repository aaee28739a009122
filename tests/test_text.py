"""SCAN's text side (models/text.py): the packaged MiniLM read offline, the reader that every
path shares, checkpoints of both encoders, and a tiny MiniLM training run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.scan import SCAN, ScanConfig, load_scan
from models.text import MINILM_DIM, TextReader, minilm, minilm_weights_sha256
from models.vocab import Vocabulary
from tests.test_train import make_collection, options
from training import evaluate as evaluation
from training.train import train

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "gold", "bird", "blue", "vase"])



def test_minilm_loads_and_encodes_with_no_network(tmp_path):
    # A fresh process with every proxy pointing at a closed port: a download would fail.
    script = ("from models.text import minilm\n"
              "f = minilm().word_features([['golden', 'birds'], ['polychrome', 'enamels']])\n"
              "print([tuple(x.shape) for x in f])\n")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead,
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[(2, 384), (2, 384)]"  # one row per word, word pieces averaged
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_minilm_word_features_know_words_the_collection_never_used():
    gold, golden, blue = (minilm().word_features([[word, "bird"]])[0][0]
                          for word in ("gold", "golden", "blue"))
    assert F.cosine_similarity(gold, golden, dim=0) > F.cosine_similarity(gold, blue, dim=0) + 0.2
    # a word of four pieces is still one row; a text with no words is one row ([CLS])
    pieces = minilm().word_features([["polychrome", "enamels"], [""]])
    assert [tuple(x.shape) for x in pieces] == [(2, MINILM_DIM), (1, MINILM_DIM)]


def test_reader_reads_each_distinct_text_once_and_names_unknown_words():
    gru, lm = TextReader("gru", VOCAB), TextReader("minilm", VOCAB)
    assert gru.unknown_words(["golden", "bird", "golden", "hawk"]) == ["golden", "hawk"]
    assert lm.unknown_words(["golden", "hawk"]) == []
    ids, lens = gru.batch([["gold", "bird"], ["hawk"], []])
    assert ids.tolist() == [[4, 5], [3, 0], [3, 0]] and lens.tolist() == [2, 1, 1]
    first, again = lm.inputs([["gold", "bird"]])[0], lm.inputs([["gold", "bird"]])[0]
    assert first is again  # cached: frozen MiniLM's outputs depend on the text alone
    inputs, lens = lm.batch([["gold", "bird"], ["golden", "vase"], ["vase"]])
    assert inputs.shape == (3, 2, 1 + MINILM_DIM) and lens.tolist() == [2, 2, 1]
    # each word's vocabulary id (for the "words" head), then its MiniLM features
    assert inputs[:, :, 0].tolist() == [[4, 5], [3, 7], [7, 0]]
    assert inputs[2, 1].abs().sum() == 0  # zero padded
    with pytest.raises(ValueError, match="text encoder must be one of"):
        TextReader("bert", VOCAB)


@pytest.mark.parametrize(("encoder", "head"), [("gru", "linear"), ("minilm", "linear"),
                                              ("minilm", "words")])
def test_a_checkpoint_of_each_encoder_round_trips(tmp_path, encoder, head):
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, word_dim=8,
                        text_encoder=encoder, minilm_head=head,
                        minilm_sha256=minilm_weights_sha256() if encoder == "minilm" else None)
    torch.manual_seed(0)
    model = SCAN(config).eval()
    path = tmp_path / f"{encoder}-{head}.pt"
    model.save(path, VOCAB)
    loaded, vocab, checkpoint = load_scan(path)
    assert loaded.config == config and vocab.tokens == VOCAB.tokens
    assert checkpoint.config["text_encoder"] == encoder
    reader = TextReader(loaded.config.text_encoder, vocab)
    inputs, lens = reader.batch([["gold", "bird"], ["golden", "vase"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(inputs, lens), model.encode_texts(inputs, lens))
    if encoder == "minilm":  # MiniLM's own weights stay in its package: only the head is saved
        assert {name.split(".")[1] for name in checkpoint.state_dict} == (
            {"fc", "norm", "words"} if head == "words" else {"fc", "norm"})
        assert path.stat().st_size < 100_000


def test_minilm_checkpoint_refuses_other_minilm_weights(tmp_path):
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, text_encoder="minilm",
                        minilm_sha256="0" * 64)
    SCAN(config).save(tmp_path / "other.pt", VOCAB)
    with pytest.raises(CheckpointError, match="trained on MiniLM weights 000000000000"):
        load_scan(tmp_path / "other.pt")


def test_a_gru_checkpoint_written_before_text_encoders_existed_still_loads(tmp_path):
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, word_dim=8)
    old = {k: v for k, v in config.to_dict().items() if k not in ("text_encoder", "minilm_sha256")}
    save_checkpoint(tmp_path / "old.pt", kind="scan", config=old,
                    state_dict=SCAN(config).state_dict(), vocab=VOCAB.to_json())
    assert "text_encoder" not in load_checkpoint(tmp_path / "old.pt").config
    model, _, _ = load_scan(tmp_path / "old.pt")
    assert model.config.text_encoder == "gru"


def test_minilm_scan_trains_and_evaluates(tmp_path):
    root = tmp_path / "collection"
    make_collection(root)
    out = tmp_path / "scan.pt"
    result = train(options(root, out, text_encoder="minilm", epochs=4))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    figures = evaluation.evaluate(out, root, split="test", k=3)
    assert figures["config"]["text_encoder"] == "minilm"
    assert figures["config"]["minilm_sha256"] == minilm_weights_sha256()
    assert figures["crop_to_phrase"]["scan"]["r1"] > 50  # 6 phrases: chance is ~17
