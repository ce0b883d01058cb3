"""Tests for infoquant_export.data.corpus and the shipped default corpus (no downloads)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from infoquant_export.data import corpus
from infoquant_export.data.corpus import (
    DEFAULT_CORPUS,
    calibration_windows,
    corpus_name,
    eval_windows,
    load_text,
    tokenize,
)
from infoquant_export.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Albedo is the fraction of sunlight that a surface reflects.",
    "Agriculture is the cultivation of plants and animals for food.",
    "Quantization stores each weight in four bits.",
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on a few sentences, with a BOS token that must not appear."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def shipped() -> dict[str, str]:
    return {split: load_text(DEFAULT_CORPUS, split) for split in corpus.SPLITS}


# ----------------------------------------------------------------------------------------- shipped corpus


def test_shipped_splits_load_and_are_substantial(shipped):
    for split, text in shipped.items():
        assert 400_000 <= len(text.encode()) <= 650_000, split
        paragraphs = [p for p in text.split("\n\n") if len(p) > 200]
        assert len(paragraphs) > 500, split
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) > 60_000, split
        common = sum(w in {"the", "of", "and", "in", "to", "a", "is"} for w in words)
        assert common / len(words) > 0.12, f"{split} does not look like English prose"


def test_shipped_splits_are_clean(shipped):
    for split, text in shipped.items():
        for marker in ("[[", "]]", "{{", "}}", "<ref", "</", "&nbsp;", "thumb|", "\r", "\t", "\n\n\n"):
            assert marker not in text, (split, marker)
        assert not re.search(r"[ ]{2,}", text), split
        assert text.endswith("\n") and not text.endswith("\n\n"), split


def test_shipped_splits_are_disjoint(shipped):
    eval_paragraphs = {p for p in shipped["evaluation"].split("\n\n") if len(p) > 200}
    calib_paragraphs = {p for p in shipped["calibration"].split("\n\n") if len(p) > 200}
    assert eval_paragraphs and calib_paragraphs
    assert not eval_paragraphs & calib_paragraphs


def test_sources_md_states_licence_and_hashes(shipped):
    sources = (corpus.TEXTS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in sources and "Wikipedia" in sources
    for split, text in shipped.items():
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        assert f"## {split}.txt" in sources
        assert digest in sources, f"SOURCES.md does not name the sha256 of {split}.txt"
    # Each article is listed under exactly one split.
    eval_part, calib_part = sources.split("## evaluation.txt")[1].split("## calibration.txt")
    eval_titles = set(re.findall(r"^- (.+?) \(page", eval_part, flags=re.M))
    calib_titles = set(re.findall(r"^- (.+?) \(page", calib_part, flags=re.M))
    assert len(eval_titles) >= 15 and len(calib_titles) >= 15
    assert not eval_titles & calib_titles


def test_corpus_name():
    assert corpus_name(DEFAULT_CORPUS) == "default"
    assert corpus_name(DEFAULT_CORPUS, "evaluation") == "default:evaluation"
    assert corpus_name("wikitext2", "evaluation") == "wikitext2:test"
    assert corpus_name("wikitext2", "calibration") == "wikitext2:train"
    assert corpus_name("/some/where/my_text.txt") == "my_text.txt"
    assert corpus_name("/some/where/texts/", "evaluation") == "texts"
    with pytest.raises(ValueError):
        corpus_name(DEFAULT_CORPUS, "train")


def test_bad_split_rejected():
    with pytest.raises(ValueError):
        load_text(DEFAULT_CORPUS, "test")


# ----------------------------------------------------------------------------------------- local sources


def test_local_file_source(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    for split in corpus.SPLITS:
        assert load_text(str(path), split) == "First paragraph.\n\nSecond paragraph."


def test_local_directory_source(tmp_path):
    (tmp_path / "b.txt").write_text("Bravo text.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Alpha text.\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    text = load_text(str(tmp_path), "calibration")
    assert text == "Alpha text.\n\nBravo text."
    assert load_text(str(tmp_path), "evaluation") == text


def test_missing_path_raises_user_error(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(UserError) as info:
        load_text(str(missing), "evaluation")
    assert str(missing) in str(info.value)
    assert info.value.fix and "--corpus default" in info.value.fix


def test_empty_directory_and_bad_encoding_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="no .txt files"):
        load_text(str(tmp_path), "evaluation")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_text(str(bad), "evaluation")


def test_wikitext2_without_datasets_raises_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match="cannot load wikitext2") as info:
        load_text("wikitext2", "evaluation")
    assert info.value.fix == "use --corpus default or a local text file"


def test_wikitext2_download_failure_raises_user_error(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("no route to host\nretry later")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(UserError, match="cannot load wikitext2: ConnectionError: no route to host retry later"):
        load_text("wikitext2", "calibration")


def test_wikitext2_joins_lines_like_quarot(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, split):
            calls.append((args, split))
            return {"text": [" = Title = \n", " Body line .\n"]}

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert load_text("wikitext2", "evaluation") == " = Title = \n\n\n Body line .\n"
    load_text("wikitext2", "calibration")
    assert [split for _, split in calls] == ["test", "train"]
    assert calls[0][0][1] == "wikitext-2-raw-v1"


# ----------------------------------------------------------------------------------------- tokenization


def test_tokenize_plain_ids_without_special_tokens(tiny_tokenizer):
    text = "\n\n".join(SENTENCES)
    ids = tokenize(tiny_tokenizer, text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.numel() > len(SENTENCES)
    assert tiny_tokenizer.bos_token_id not in ids.tolist()
    assert tiny_tokenizer.decode(ids.tolist()) == text
    assert torch.equal(ids, tokenize(tiny_tokenizer, text))


def test_tokenize_long_text_in_chunks_is_deterministic(tiny_tokenizer, monkeypatch):
    text = "\n\n".join(SENTENCES * 30)
    whole = tokenize(tiny_tokenizer, text)
    monkeypatch.setattr(corpus, "TOKENIZE_CHUNK_CHARS", 500)
    pieces = corpus._chunks(text, 500)
    assert len(pieces) > 5 and "".join(pieces) == text
    chunked = tokenize(tiny_tokenizer, text)
    assert torch.equal(chunked, tokenize(tiny_tokenizer, text))
    assert tiny_tokenizer.decode(chunked.tolist()) == text
    # Pieces are cut before a paragraph break, which is a pre-token boundary for byte-level BPE.
    assert torch.equal(chunked, whole)


def test_tokenize_shipped_evaluation_text(tiny_tokenizer, shipped):
    ids = tokenize(tiny_tokenizer, shipped["evaluation"][:100_000])
    assert ids.numel() > 20_000
    windows = eval_windows(ids, 512)
    assert windows.shape[1] == 512 and windows.shape[0] >= 39


# ----------------------------------------------------------------------------------------- windows


def test_eval_windows_shapes_and_no_overlap():
    tokens = torch.arange(1000)
    windows = eval_windows(tokens, 128)
    assert windows.shape == (7, 128) and windows.dtype == torch.int64
    assert torch.equal(windows.flatten(), tokens[: 7 * 128])  # consecutive, non-overlapping, tail dropped
    assert torch.equal(eval_windows(tokens, 128, max_windows=3), windows[:3])
    assert eval_windows(tokens, 128, max_windows=50).shape == (7, 128)
    assert eval_windows(tokens, 1000).shape == (1, 1000)


def test_eval_windows_too_short_raises_user_error():
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.arange(100), 128)
    with pytest.raises(UserError):
        eval_windows(torch.arange(100), 0)


def test_calibration_windows_seeded_and_contiguous():
    tokens = torch.arange(5000)
    first = calibration_windows(tokens, num=16, seq_len=64, seed=0)
    assert first.shape == (16, 64) and first.dtype == torch.int64
    # Every window is a contiguous slice of the token stream.
    starts = first[:, 0]
    assert torch.equal(first, starts[:, None] + torch.arange(64)[None, :])
    assert int(starts.min()) >= 0 and int(starts.max()) <= 5000 - 64
    assert torch.equal(first, calibration_windows(tokens, num=16, seq_len=64, seed=0))
    assert not torch.equal(first, calibration_windows(tokens, num=16, seq_len=64, seed=1))


def test_calibration_windows_edge_cases():
    tokens = torch.arange(64)
    assert torch.equal(calibration_windows(tokens, 3, 64, seed=5), tokens.repeat(3, 1))
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64, seed=0)
    with pytest.raises(UserError):
        calibration_windows(tokens, 0, 16, seed=0)


# ----------------------------------------------------------------------------------------- build tool


def _build_tool():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "tools" / "build_corpus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_build_tool_cleans_wiki_markup():
    tool = _build_tool()
    wikitext = (
        "{{Infobox thing\n| name = X\n}}\n"
        "[[File:X.png|thumb|A [[caption]] here]]\n"
        "'''Albedo''' ({{IPAc-en|æ|l}}) is the [[diffuse reflection|diffuse reflectivity]] of a surface, about "
        "{{convert|15|°C}} on [[Earth]].<ref>{{cite web|url=http://x}}</ref><!-- hidden -->\n\n"
        "== History ==\n"
        "{| class=\"wikitable\"\n| a || b\n|}\n"
        "The term was introduced by [[Johann Heinrich Lambert]] in [http://example.org his work] of 1760.\n"
        "* a list item\n\n"
        "== References ==\n"
        "Everything here is dropped.\n"
    )
    assert tool.wiki_to_paragraphs(wikitext) == [
        "Albedo is the diffuse reflectivity of a surface, about 15 °C on Earth.",
        "History",
        "The term was introduced by Johann Heinrich Lambert in his work of 1760.",
    ]
