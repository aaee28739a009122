"""SCAN: the batched cross-attention scores against a plain per-pair loop written straight
from the formulas, padding and chunking invariance, the loss, the encoders and checkpoints."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench.scoring import reference_loop
from models.checkpoint import CheckpointError, save_checkpoint
from models.scan import (
    SCAN,
    ScanConfig,
    contrastive_loss,
    default_lambda_softmax,
    load_scan,
    pooled,
    word_region_attention,
    xattn_similarity,
)
from models.vocab import Vocabulary

DIRECTIONS = ("t2i", "i2t")
AGGREGATIONS = ("mean", "lse", "max", "sum")



def reference_pair_score(image, text, *, direction, agg, lambda_softmax, lambda_lse=6.0):
    """One pair, no padding, float64, each formula as written in the paper and DESIGN.md."""
    image, text = image.double(), text.double()
    queries, context = (text, image) if direction == "t2i" else (image, text)
    s = queries @ context.T  # (Q, C) cosines
    h = F.leaky_relu(s, 0.1)
    h = h / (h.pow(2).sum(dim=0, keepdim=True).sqrt() + 1e-8)  # L2 over the query axis
    alpha = torch.softmax(lambda_softmax * h, dim=1)  # over the context axis
    attended = alpha @ context  # (Q, d)
    r = (queries * attended).sum(-1) / (queries.norm(dim=-1) * attended.norm(dim=-1)).clamp_min(1e-8)
    if agg == "mean":
        return r.mean()
    if agg == "sum":
        return r.sum()
    if agg == "max":
        return r.max()
    return torch.log(torch.exp(lambda_lse * r).sum()) / lambda_lse


def reference_scores(images, image_lens, texts, text_lens, **options):
    scores = torch.empty(len(images), len(texts), dtype=torch.float64)
    for i, j in itertools.product(range(len(images)), range(len(texts))):
        scores[i, j] = reference_pair_score(
            images[i, : image_lens[i]], texts[j, : text_lens[j]], **options
        )
    return scores


def ragged(n, max_len, d, lens, generator):
    """(n, max_len, d) unit rows, zero padded past lens."""
    x = F.normalize(torch.randn(n, max_len, d, generator=generator), dim=-1)
    return x * (torch.arange(max_len) < lens[:, None])[..., None]


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    image_lens = torch.tensor([7, 3, 5, 1, 7, 2])
    text_lens = torch.tensor([4, 6, 1, 2, 6])
    images = ragged(6, 7, 16, image_lens, generator)
    texts = ragged(5, 6, 16, text_lens, generator)
    return images, image_lens, texts, text_lens


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_batched_scores_equal_the_per_pair_loop(batch, direction, agg):
    options = dict(direction=direction, agg=agg, lambda_softmax=default_lambda_softmax(direction))
    fast = xattn_similarity(*batch, **options, chunk_size=4)
    assert fast.shape == (6, 5) and fast.dtype == torch.float32
    expected = reference_scores(*batch, **options)
    assert (fast.double() - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("agg", ["lse", "max"])
def test_gradients_equal_the_per_pair_loops_gradients(batch, direction, agg):
    """The fast path never builds α or a_q; its gradient must still be the true one."""
    images, image_lens, texts, text_lens = (t.double() if t.is_floating_point() else t for t in batch)
    options = dict(direction=direction, agg=agg, lambda_softmax=default_lambda_softmax(direction))
    weights = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gradients = []
    for score in (xattn_similarity, reference_scores):
        x, y = images.clone().requires_grad_(), texts.clone().requires_grad_()
        (weights * score(x, image_lens, y, text_lens, **options)).sum().backward()
        gradients.append((x.grad, y.grad))
    (fast_images, fast_texts), (ref_images, ref_texts) = gradients
    assert torch.allclose(fast_images, ref_images, atol=1e-8)
    assert torch.allclose(fast_texts, ref_texts, atol=1e-8)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_extra_padding_changes_nothing(batch, direction, agg):
    images, image_lens, texts, text_lens = batch
    options = dict(direction=direction, agg=agg, lambda_softmax=5.0)
    base = xattn_similarity(images, image_lens, texts, text_lens, **options)
    padded_images = F.pad(images, (0, 0, 0, 3))  # 3 more zero regions
    padded_texts = F.pad(texts, (0, 0, 0, 2))  # 2 more zero words
    padded = xattn_similarity(padded_images, image_lens, padded_texts, text_lens, **options)
    assert torch.allclose(padded, base, atol=1e-6, rtol=0)
    # Even junk in the padding must not leak into a score.
    junk_images = padded_images + 5.0 * ~(torch.arange(10) < image_lens[:, None])[..., None]
    junk_texts = padded_texts - 3.0 * ~(torch.arange(8) < text_lens[:, None])[..., None]
    junk = xattn_similarity(junk_images, image_lens, junk_texts, text_lens, **options)
    assert torch.allclose(junk, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_equals_unchunked(batch, direction):
    options = dict(direction=direction, agg="lse", lambda_softmax=9.0)
    whole = xattn_similarity(*batch, **options, chunk_size=1000)
    for chunk_size in (1, 2, 5):
        chunked = xattn_similarity(*batch, **options, chunk_size=chunk_size)
        assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_the_benchmarks_reference_loop_equals_the_per_pair_loop(batch, direction, agg):
    """bench/scoring.py measures speed-ups against this loop, so it must be right too."""
    options = dict(direction=direction, agg=agg, lambda_softmax=default_lambda_softmax(direction))
    loop = reference_loop(*batch, **options)
    assert (loop.double() - reference_scores(*batch, **options)).abs().max() <= 1e-5


def test_lse_is_stable_at_lambda_50(batch):
    images, image_lens, texts, text_lens = batch
    # Scale up the cosines' spread: unit vectors that nearly coincide give r close to 1.
    texts = F.normalize(texts + 4 * images[:5, :6].mean(1, keepdim=True), dim=-1)
    texts = texts * (torch.arange(6) < text_lens[:, None])[..., None]
    options = dict(direction="t2i", agg="lse", lambda_softmax=9.0, lambda_lse=50.0)
    fast = xattn_similarity(images, image_lens, texts, text_lens, **options)
    assert torch.isfinite(fast).all()
    expected = reference_scores(images, image_lens, texts, text_lens, **options)
    assert (fast.double() - expected).abs().max() <= 1e-5
    # LSE lies between the max and max + log(n)/λ: a soft maximum.
    maxima = xattn_similarity(images, image_lens, texts, text_lens, **{**options, "agg": "max"})
    assert (fast >= maxima - 1e-6).all()
    assert (fast <= maxima + math.log(6) / 50 + 1e-6).all()


def test_attention_weights_match_the_reference_and_sum_to_one(batch):
    images, image_lens, texts, text_lens = batch
    image, text = images[0, :7], texts[1, :6]
    weights = word_region_attention(image, text, 9.0)
    assert weights.shape == (6, 7)
    assert torch.allclose(weights.sum(dim=1), torch.ones(6), atol=1e-6)
    s = text.double() @ image.double().T
    h = F.leaky_relu(s, 0.1)
    h = h / (h.pow(2).sum(dim=0, keepdim=True).sqrt() + 1e-8)
    assert torch.allclose(weights.double(), torch.softmax(9.0 * h, dim=1), atol=1e-6)


def test_both_directions_is_the_mean_of_t2i_and_i2t_with_their_own_lambdas(batch):
    both = xattn_similarity(*batch, direction="both", agg="mean", lambda_softmax=None)
    t2i = xattn_similarity(*batch, direction="t2i", agg="mean", lambda_softmax=9.0)
    i2t = xattn_similarity(*batch, direction="i2t", agg="mean", lambda_softmax=4.0)
    torch.testing.assert_close(both, (t2i + i2t) / 2)
    config = ScanConfig(vocab_size=10, direction="both")
    assert config.lambda_softmax is None and config.word_attention_lambda == 9.0
    assert ScanConfig(vocab_size=10, direction="i2t").word_attention_lambda == 4.0


def test_bad_arguments_name_what_is_wrong(batch):
    images, image_lens, texts, text_lens = batch
    with pytest.raises(ValueError, match="direction must be one of"):
        xattn_similarity(*batch, direction="sideways", agg="lse", lambda_softmax=9.0)
    with pytest.raises(ValueError, match="agg must be one of"):
        xattn_similarity(*batch, direction="t2i", agg="median", lambda_softmax=9.0)
    with pytest.raises(ValueError, match=r"text_lens must lie in \[1, 6\], got \[0, 6\]"):
        xattn_similarity(images, image_lens, texts, text_lens * (text_lens > 1),
                         direction="t2i", agg="lse", lambda_softmax=9.0)
    with pytest.raises(ValueError, match="images have d=16 but texts have d=8"):
        xattn_similarity(images, image_lens, texts[..., :8], text_lens,
                         direction="t2i", agg="lse", lambda_softmax=9.0)


def test_pooled_is_the_normalised_mean_of_the_valid_rows():
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    assert torch.allclose(pooled(x, torch.tensor([2])), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(pooled(x, torch.tensor([1])), torch.tensor([[1.0, 0.0]]))


def test_loss_is_zero_when_positives_beat_negatives_by_the_margin():
    scores = torch.full((4, 4), 0.5)
    scores.fill_diagonal_(0.71)
    for max_violation in (True, False):
        assert contrastive_loss(scores, margin=0.2, max_violation=max_violation) == 0


def test_loss_counts_violations_in_both_directions():
    scores = torch.full((3, 3), 0.0)
    scores.fill_diagonal_(1.0)
    scores[0, 1] = 0.9  # image 0 is too close to text 1, and text 1 to image 0
    scores[0, 2] = 0.85
    hardest = contrastive_loss(scores, margin=0.2, max_violation=True)
    # image 0: hardest text 1 -> 0.1; text 1: hardest image 0 -> 0.1; text 2: image 0 -> 0.05
    assert hardest.item() == pytest.approx(0.1 + 0.1 + 0.05)
    every = contrastive_loss(scores, margin=0.2, max_violation=False)
    # image 0 now also pays for text 2 (0.05)
    assert every.item() == pytest.approx(0.1 + 0.05 + 0.1 + 0.05)


def test_masked_pairs_never_count_as_negatives():
    scores = torch.full((3, 3), 0.0)
    scores.fill_diagonal_(1.0)
    scores[0, 1] = scores[1, 0] = 5.0  # the same artwork: a huge score is right, not a violation
    ignore = torch.zeros(3, 3, dtype=torch.bool)
    ignore[0, 1] = ignore[1, 0] = True
    for max_violation in (True, False):
        assert contrastive_loss(scores, margin=0.2, max_violation=max_violation) > 0
        masked = contrastive_loss(scores, margin=0.2, max_violation=max_violation, ignore_mask=ignore)
        assert masked == 0


def tiny_config(**overrides) -> ScanConfig:
    values = dict(vocab_size=12, raw_dim=10, embed_dim=8, word_dim=6, chunk_size=3)
    values.update(overrides)
    return ScanConfig(**values)


def tiny_batch(config, n=4, generator=None):
    generator = generator or torch.Generator().manual_seed(1)
    raw_lens = torch.tensor([5, 2, 4, 3, 5, 1][:n])
    word_lens = torch.tensor([3, 1, 4, 2, 4, 3][:n])
    raw = torch.randn(n, 5, config.raw_dim, generator=generator)
    ids = torch.randint(4, config.vocab_size, (n, 4), generator=generator)
    ids = ids * (torch.arange(4) < word_lens[:, None])  # pad id 0 past each length
    return raw, raw_lens, ids, word_lens


def test_config_defaults_and_round_trip():
    assert ScanConfig(vocab_size=5).lambda_softmax == 9.0
    assert ScanConfig(vocab_size=5, direction="i2t").lambda_softmax == 4.0
    config = tiny_config(agg="mean", bidirectional=False)
    assert ScanConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown ScanConfig field\(s\) \['dropout'\]"):
        ScanConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="ScanConfig.agg must be one of"):
        tiny_config(agg="avg")


@pytest.mark.parametrize("bidirectional", [True, False])
def test_encoders_give_unit_rows_and_zero_padding(bidirectional):
    torch.manual_seed(0)
    config = tiny_config(bidirectional=bidirectional)
    model = SCAN(config).eval()
    raw, raw_lens, ids, word_lens = tiny_batch(config)
    images = model.encode_images(raw, raw_lens)
    texts = model.encode_texts(ids, word_lens)
    assert images.shape == (4, 5, 8) and texts.shape == (4, 4, 8)
    for x, lens in ((images, raw_lens), (texts, word_lens)):
        valid = torch.arange(x.shape[1]) < lens[:, None]
        norms = x.norm(dim=-1)
        assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5)
        assert (x[~valid] == 0).all()
    # Packed sequences: more trailing padding does not change a word's vector.
    more = model.encode_texts(F.pad(ids, (0, 3)), word_lens)
    assert torch.allclose(more[:, :4], texts, atol=1e-6)


def test_gradients_reach_both_encoders_and_training_separates_pairs():
    torch.manual_seed(0)
    config = tiny_config(pooled_weight=0.5)
    model = SCAN(config)
    raw, raw_lens, ids, word_lens = tiny_batch(config)
    losses = model(raw, raw_lens, ids, word_lens)
    assert losses.total.item() == pytest.approx(losses.xattn.item() + 0.5 * losses.pooled.item())
    vectors_only = SCAN(tiny_config(pooled_weight=1.0, xattn_weight=0.0))
    vectors_only.load_state_dict(model.state_dict())
    assert vectors_only(raw, raw_lens, ids, word_lens).total.item() == pytest.approx(losses.pooled.item())
    with pytest.raises(ValueError, match="not both 0"):
        tiny_config(pooled_weight=0.0, xattn_weight=0.0)
    losses.total.backward()
    for name in ("image_encoder.fc.weight", "text_encoder.embed.weight",
                 "text_encoder.gru.weight_ih_l0", "text_encoder.gru.weight_hh_l0_reverse"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.isfinite(grad).all(), name
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        optimizer.zero_grad()
        model(raw, raw_lens, ids, word_lens).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    with torch.no_grad():
        images = model.encode_images(raw, raw_lens)
        texts = model.encode_texts(ids, word_lens)
        scores = model.similarity(images, raw_lens, texts, word_lens)
    assert (scores.argmax(dim=1) == torch.arange(4)).all()


def test_checkpoint_round_trip_gives_identical_scores(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(direction="i2t", agg="mean")
    model = SCAN(config).eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"])
    sha256 = model.save(tmp_path / "scan.pt", vocab, record={"epoch": 1})
    loaded, loaded_vocab, checkpoint = load_scan(tmp_path / "scan.pt")
    assert checkpoint.sha256 == sha256 and checkpoint.record == {"epoch": 1}
    assert loaded.config == config and loaded_vocab.tokens == vocab.tokens
    assert not loaded.training
    raw, raw_lens, ids, word_lens = tiny_batch(config)
    with torch.no_grad():
        before = model.similarity(model.encode_images(raw, raw_lens), raw_lens,
                                  model.encode_texts(ids, word_lens), word_lens)
        after = loaded.similarity(loaded.encode_images(raw, raw_lens), raw_lens,
                                  loaded.encode_texts(ids, word_lens), word_lens)
    assert torch.equal(before, after)


def test_load_scan_refuses_other_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "detector.pt", kind="detector", config={}, state_dict={})
    with pytest.raises(CheckpointError, match="a 'detector' checkpoint, but a 'scan' checkpoint"):
        load_scan(tmp_path / "detector.pt")
    model = SCAN(tiny_config())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: a plain state dict"):
        load_scan(tmp_path / "plain.pt")
    # A config that does not match the weights (a file edited or assembled by hand).
    save_checkpoint(tmp_path / "mismatch.pt", kind="scan",
                    config=tiny_config(embed_dim=4).to_dict(), state_dict=model.state_dict(),
                    vocab=["<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"])
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit the saved config"):
        load_scan(tmp_path / "mismatch.pt")


def test_bench_scoring_command_reports_both_directions(tmp_path, capsys):
    from app.cli import main

    path = tmp_path / "scoring.json"
    status = main(["bench", "scoring", "--images", "5", "--regions", "4", "--min-regions", "2",
                   "--texts", "4", "--dim", "8", "--chunk-size", "2", "--repeats", "1",
                   "--threads", "1", "--json", str(path)])
    assert status == 0
    report = json.loads(path.read_text())
    assert set(report["directions"]) == {"t2i", "i2t"}
    for result in report["directions"].values():
        assert result["max_abs_diff_vs_loop"] <= 1e-5
        assert set(result["seconds"]) == {"xattn", "loop", "floor"}
    assert "t2i       xattn" in capsys.readouterr().out
