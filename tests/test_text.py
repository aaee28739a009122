"""SCAN's text side (models/text.py): the packaged MiniLM read offline, the reader that every
path shares, checkpoints of both encoders, and a tiny MiniLM training run."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.scan import SCAN, ScanConfig, kept_word_ids, load_scan
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
                                              ("minilm", "words"), ("minilm", "gru")])
def test_a_checkpoint_of_each_encoder_round_trips(tmp_path, encoder, head):
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, word_dim=8,
                        text_encoder=encoder, minilm_head=head, word_dropout=0.25,
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
        assert {name.split(".")[1] for name in checkpoint.state_dict} == {
            "words": {"fc", "norm", "words"}, "linear": {"fc", "norm"},
            "gru": {"fc", "norm", "embed", "gru"}}[head]  # fc: the image side's
        assert path.stat().st_size < 1_000_000  # MiniLM alone is 90 MB


def test_the_gru_head_encodes_deterministically_and_offline(tmp_path):
    # A trained-looking gru-head checkpoint read in a fresh process with no network gives the
    # very vectors it gives here; dropout of words acts in training only.
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, word_dim=8,
                        text_encoder="minilm", minilm_head="gru", word_dropout=0.5,
                        minilm_sha256=minilm_weights_sha256())
    torch.manual_seed(1)
    SCAN(config).save(tmp_path / "gru-head.pt", VOCAB)
    script = ("import sys, torch\n"
              "from models.encoder import Encoder\n"
              "from models.scan import load_scan\n"
              "model, vocab, _ = load_scan(sys.argv[1])\n"
              "vectors, lens = Encoder(model, vocab).texts(['two gold birds', 'a gilded hawk'])\n"
              "print(vectors.flatten().tolist(), lens.tolist(), sep='\\n')\n")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead,
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "gru-head.pt")], env=env,
                           capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    from models.encoder import Encoder
    model, vocab, _ = load_scan(tmp_path / "gru-head.pt")
    here, lens = Encoder(model, vocab).texts(["two gold birds", "a gilded hawk"])
    there, there_lens = runs[0].stdout.split("\n")[:2]
    assert lens.tolist() == [3, 3] and there_lens == "[3, 3]"
    # the same up to float rounding (a fresh process reads MiniLM with more threads)
    torch.testing.assert_close(here.flatten(), torch.tensor(ast.literal_eval(there)))


def test_word_dropout_reads_known_words_as_unknown_in_training_only():
    ids = torch.tensor([[4, 5, 3, 0], [6, 7, 0, 0]])
    torch.manual_seed(0)
    dropped = kept_word_ids(ids, 0.5, training=True)
    assert torch.equal(kept_word_ids(ids, 0.5, training=False), ids)
    assert set(dropped[ids > 3].tolist()) <= {3, 4, 5, 6, 7} and (dropped[ids > 3] == 3).any()
    assert torch.equal(dropped[ids <= 3], ids[ids <= 3])  # padding and <unk> stay
    with pytest.raises(ValueError, match="word_dropout must lie in"):
        ScanConfig(vocab_size=8, word_dropout=1.0)


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


def test_a_minilm_checkpoint_written_before_word_dropout_was_a_setting_reads_as_before(tmp_path):
    config = ScanConfig(vocab_size=len(VOCAB), raw_dim=12, embed_dim=16, text_encoder="minilm",
                        minilm_head="words", minilm_sha256=minilm_weights_sha256())
    torch.manual_seed(2)
    model = SCAN(config).eval()
    old = {k: v for k, v in config.to_dict().items() if k != "word_dropout"}
    save_checkpoint(tmp_path / "old.pt", kind="scan", config=old, state_dict=model.state_dict(),
                    vocab=VOCAB.to_json())
    loaded, _, _ = load_scan(tmp_path / "old.pt")
    assert loaded.config.minilm_head == "words" and loaded.config.word_dropout == 0.5
    inputs, lens = TextReader("minilm", VOCAB).batch([["gold", "bird"], ["golden", "vase"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(inputs, lens), model.encode_texts(inputs, lens))


@pytest.mark.parametrize("head", ["words", "gru"])
def test_minilm_scan_trains_and_evaluates(tmp_path, head):
    root = tmp_path / "collection"
    make_collection(root)
    out = tmp_path / "scan.pt"
    result = train(options(root, out, text_encoder="minilm", minilm_head=head, epochs=4))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    figures = evaluation.evaluate(out, root, split="test", k=3)
    assert figures["config"]["text_encoder"] == "minilm"
    assert figures["config"]["minilm_sha256"] == minilm_weights_sha256()
    assert figures["config"]["minilm_head"] == head
    assert figures["crop_to_phrase"]["scan"]["r1"] > 50  # 6 phrases: chance is ~17
