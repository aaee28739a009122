"""Typed queries: the noun phrases a query names (app/services/query.py) and the queries file
of `artalign evaluate --queries` (training/queries.py)."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from app.services.query import parse_query
from models.text import TextReader
from models.vocab import Vocabulary
from tests.test_train import make_collection
from training.queries import read_queries
from training.train import TrainOptions, train

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "gold", "birds", "blue", "fish", "red",
                    "cup", "the", "of", "and", "on", "a"])
GRU = TextReader("gru", VOCAB)


def test_one_phrase_is_scored_as_it_is():
    parsed = parse_query("Golden birds", GRU)
    assert parsed.phrases == ["golden birds"] and not parsed.whole
    assert parsed.tokens == [["golden", "birds"]]
    assert parsed.unknown_words == ["golden"]  # outside the GRU's vocabulary


def test_several_phrases_are_scored_one_by_one():
    parsed = parse_query("blue fish on a red cup", GRU)
    assert parsed.phrases == ["blue fish", "red cup"] and not parsed.whole
    assert parsed.unknown_words == []
    # spaCy tags "Porcelain" a noun but the chunker misses the compound; the POS pattern finds it
    assert parse_query("Porcelain stem cup with polychrome overglaze enamels", GRU).phrases == [
        "porcelain stem cup", "polychrome overglaze enamels"]


def test_stop_words_only_fall_back_to_the_whole_query():
    parsed = parse_query("the of and", GRU)
    assert parsed.whole and parsed.phrases == ["of and"]  # normalised: the leading "the" goes
    assert parsed.tokens == [["of", "and"]] and parsed.unknown_words == []
    assert parse_query("the", GRU).tokens == [["the"]]  # nothing left after normalising


def test_minilm_understands_every_word():
    assert parse_query("a gilded hawk", TextReader("minilm", VOCAB)).unknown_words == []


@pytest.mark.parametrize("query", ["", "   ", "... !!"])
def test_an_empty_query_is_refused(query):
    with pytest.raises(ValueError, match="has no words to search for"):
        parse_query(query, GRU)


def test_scores_combine_best_phrase_first_then_the_others():
    import torch

    from app.services.query import combine

    per_phrase = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.9, 0.5], [0.7, 0.7]])
    # the best phrase counts most; with it equal, a fragment that also shows the other wins
    assert combine(per_phrase).tolist() == pytest.approx([0.7, 0.5, 0.8, 0.7])
    assert combine(torch.tensor([[0.3]])).tolist() == pytest.approx([0.3])  # one phrase: itself


# -- the queries file ---------------------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    ("", "no queries"),
    ('{"query": "gold bird", "phrase": "gold bird"}\nnot json\n', "line 2: not JSON"),
    ('\n["gold bird", "gold bird"]\n', "line 2: a JSON list, not an object"),
    ('{"query": "gold bird"}\n', "line 1: missing phrase"),
    ('{"query": "x", "phrase": "gold bird", "score": 1}\n', r"line 1: unknown field\(s\) score"),
    ('{"query": 3, "phrase": "gold bird"}\n', "line 1: query must be a string"),
    ('{"query": "?!", "phrase": "gold bird"}\n', "line 1: query '\\?!' has no words"),
])
def test_a_bad_queries_file_is_refused_naming_the_line(tmp_path, content, message):
    path = tmp_path / "queries.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_queries(path)


def test_the_committed_paraphrase_file_reads():
    queries = read_queries("tests/data/synth-queries.jsonl")
    assert {q.kind for q in queries} == {"synonym", "plural", "word order", "count word",
                                         "misspelling"}
    assert any(q.query == "golden bird" or q.query.startswith("golden") for q in queries)


def test_evaluate_queries_scores_the_query_text_against_the_phrases_boxes(tmp_path, capsys):
    root = tmp_path / "collection"
    make_collection(root)
    out = tmp_path / "scan.pt"
    train(TrainOptions(collection=str(root), out=str(out), embed_dim=32, word_dim=16, epochs=6,
                       lr=2e-3, lr_update=5, batch_size=12))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps(line) for line in [
        {"query": "gold bird", "phrase": "gold bird", "kind": "same"},
        {"query": "hawk", "phrase": "gold bird", "kind": "unknown"},
        {"query": "blue vase", "phrase": "blue vase", "kind": "same"},
    ]))
    report = tmp_path / "queries.json"
    assert main(["evaluate", "--checkpoint", str(out), "--collection", str(root),
                 "--queries", str(queries), "--json", str(report)]) == 0
    assert "exhaustive SCAN by kind" in capsys.readouterr().out
    figures = json.loads(report.read_text())
    assert figures["counts"]["queries"] == 3
    by_kind = figures["queries"]["by_kind"]
    assert by_kind["same"] == figures["phrases"]["by_kind"]["same"]  # the same words
    assert by_kind["same"]["n"] == 2 and by_kind["unknown"]["n"] == 1
    # a phrase that is not annotated in the split is named with its line
    queries.write_text('{"query": "gold bird", "phrase": "gold bird"}\n'
                       '{"query": "a horse", "phrase": "grey horse"}\n')
    assert main(["evaluate", "--checkpoint", str(out), "--collection", str(root),
                 "--queries", str(queries)]) == 2
    assert "line 2 ('grey horse')" in capsys.readouterr().err
