"""Text corpora for calibration and perplexity evaluation, and their tokenization into windows.

Sources (the ``source`` argument):

- ``"default"``: the English Wikipedia text shipped in ``infoquant_export/data/texts`` (CC BY-SA 3.0, see
  ``texts/SOURCES.md``); the ``calibration`` and ``evaluation`` splits come from disjoint articles;
- ``"wikitext2"``: WikiText-2 (raw) through the ``datasets`` library: the train split for calibration,
  the test split for evaluation, lines joined with ``"\\n\\n"`` as QuaRot/GPTQ do;
- a path to a local UTF-8 ``.txt`` file, or to a directory whose ``*.txt`` files are read in name order;
  the same text serves both splits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from infoquant_export.errors import UserError

DEFAULT_CORPUS = "default"
WIKITEXT2 = "wikitext2"
SPLITS = ("calibration", "evaluation")
TEXTS_DIR = Path(__file__).resolve().parent / "texts"

WIKITEXT2_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
_WIKITEXT2_SPLIT = {"calibration": "train", "evaluation": "test"}
_WIKITEXT2_FIX = "use --corpus default or a local text file"

# Texts up to this many characters are tokenized in one call (exactly as QuaRot does); longer ones in chunks of
# about this size, cut at paragraph boundaries.
TOKENIZE_CHUNK_CHARS = 4_000_000


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def load_text(source: str, split: str) -> str:
    """Return the text of ``split`` (``"calibration"`` or ``"evaluation"``) of the corpus ``source``."""
    _check_split(split)
    if source == DEFAULT_CORPUS:
        return _load_default(split)
    if source == WIKITEXT2:
        return _load_wikitext2(split)
    return _load_local(source)


def corpus_name(source: str, split: str | None = None) -> str:
    """Short stable name of a corpus for reports: ``default:evaluation``, ``wikitext2:test``, or a file name."""
    if split is not None:
        _check_split(split)
    if source == DEFAULT_CORPUS:
        return f"{DEFAULT_CORPUS}:{split}" if split else DEFAULT_CORPUS
    if source == WIKITEXT2:
        return f"{WIKITEXT2}:{_WIKITEXT2_SPLIT[split]}" if split else WIKITEXT2
    path = Path(source).expanduser()
    return path.resolve().name or str(path)


def _load_default(split: str) -> str:
    path = TEXTS_DIR / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"the shipped default corpus file {path} is missing",
                        "reinstall infoquant_export (its package data is incomplete) or rebuild it with "
                        "tools/build_corpus.py")
    return path.read_text(encoding="utf-8")


def _load_wikitext2(split: str) -> str:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise UserError(f"cannot load wikitext2: the datasets package is not importable ({_one_line(err)})",
                        _WIKITEXT2_FIX) from err
    try:
        data = datasets.load_dataset(*WIKITEXT2_DATASET, split=_WIKITEXT2_SPLIT[split])
        lines = data["text"]
    except Exception as err:  # network, hub or cache failures all mean the same thing to the user
        raise UserError(f"cannot load wikitext2: {type(err).__name__}: {_one_line(err)}", _WIKITEXT2_FIX) from err
    return "\n\n".join(lines)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_local(source: str) -> str:
    path = Path(source).expanduser()
    fix = "give an existing UTF-8 .txt file or a directory of .txt files, or use --corpus default"
    if not path.exists():
        raise UserError(f"corpus path {source} does not exist", fix)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"corpus directory {source} holds no .txt files", fix)
    else:
        files = [path]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8-sig").strip())
        except UnicodeDecodeError as err:
            raise UserError(f"corpus file {file} is not valid UTF-8 ({err.reason} at byte {err.start})", fix) from err
        except OSError as err:
            raise UserError(f"cannot read corpus file {file}: {err.strerror or err}", fix) from err
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise UserError(f"corpus {source} is empty", fix)
    return text


def _chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at paragraph boundaries (``"\\n\\n"``).

    The separator starts the next piece, so that a piece never ends in whitespace. Joining the pieces gives
    back ``text`` exactly.
    """
    if len(text) <= size:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = text.find("\n\n", start + size)
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D int64) of the whole ``text``, without special tokens.

    ``tokenizer`` is a Hugging Face tokenizer. Texts up to ``TOKENIZE_CHUNK_CHARS`` characters are encoded in
    one call; longer ones paragraph-chunk by chunk (deterministically) and the ids are concatenated.
    """
    ids: list[int] = []
    for piece in _chunks(text, TOKENIZE_CHUNK_CHARS):
        try:
            encoded = tokenizer(piece, add_special_tokens=False, verbose=False)
        except TypeError:  # tokenizers whose __call__ lacks ``verbose``
            encoded = tokenizer(piece, add_special_tokens=False)
        ids.extend(encoded["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


def _check_tokens(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if seq_len < 1:
        raise UserError(f"sequence length must be at least 1, got {seq_len}", "pass a positive --seq-len")
    return tokens.to(torch.int64)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` covering ``tokens`` from the start; the tail is dropped.

    ``max_windows`` keeps only the first windows. Raises ``UserError`` if not even one window fits.
    """
    tokens = _check_tokens(tokens, seq_len)
    n = tokens.numel() // seq_len
    if n == 0:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}",
                        "use a longer text or a smaller --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"the number of evaluation windows must be at least 1, got {max_windows}",
                            "pass a positive number of windows")
        n = min(n, max_windows)
    return tokens[: n * seq_len].reshape(n, seq_len).clone()


def calibration_windows(tokens: torch.Tensor, num: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num`` random windows ``[num, seq_len]`` of ``tokens`` (they may overlap one another).

    Start positions are drawn uniformly from ``[0, len(tokens) - seq_len]`` with
    ``torch.Generator().manual_seed(seed)``, so the same seed always gives the same windows.
    """
    tokens = _check_tokens(tokens, seq_len)
    if num < 1:
        raise UserError(f"the number of calibration windows must be at least 1, got {num}",
                        "pass a positive number of calibration samples")
    if tokens.numel() < seq_len:
        raise UserError(f"the calibration text has {tokens.numel()} tokens, fewer than one window of {seq_len}",
                        "use a longer text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (num,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[index]
