#!/usr/bin/env python3
"""Rebuild the shipped default corpus (``infoquant_export/data/texts``) from its public source.

Source: the English Wikipedia XML dump excerpt (pages 10-30302, May 2016, 106 articles) that the
``gensim`` wheel on PyPI ships as test data. Wikipedia text is licensed CC BY-SA 3.0 (and GFDL);
see ``infoquant_export/data/texts/SOURCES.md``, which this script also writes.

Steps, all deterministic:

1. ``pip download --no-deps --only-binary=:all: gensim==4.4.0`` (a fixed platform tag, so every machine
   gets the same wheel) into a temporary directory, or use ``--wheel`` / ``--dump`` for a local copy;
2. extract the ``.bz2`` dump from the wheel and check its sha256;
3. parse the XML (stdlib ``xml.etree``), keep main-namespace articles that are not redirects, lists or
   disambiguation pages, and strip the wiki markup (references, templates, tables, files, categories,
   lists, bold/italic, HTML tags, trailing "See also"/"References"/... sections);
4. order the articles by ``sha256(SALT + title)`` and deal them alternately to the evaluation and the
   calibration split (each article in exactly one split, at most ``--max-article-chars`` of its leading
   paragraphs; an article repeating a 10-word run of one already taken is skipped), until each split
   holds about ``--target-bytes`` bytes;
5. write ``evaluation.txt``, ``calibration.txt`` (paragraphs separated by one blank line) and
   ``SOURCES.md``, then print a JSON summary (files, bytes, sha256).

Run: ``python tools/build_corpus.py`` (``--check`` compares against the shipped files instead of writing).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "infoquant_export" / "data" / "texts"

GENSIM_VERSION = "4.4.0"
PIP_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                "--abi", "cp311"]
DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
MW_NS = "{http://www.mediawiki.org/xml/export-0.10/}"

SALT = "infoquant-default-corpus-v1:"
TARGET_BYTES = 500_000
MAX_SPLIT_BYTES = 600_000
MAX_ARTICLE_CHARS = 25_000
MIN_ARTICLE_CHARS = 4_000
SHINGLE_WORDS = 10
SPLITS = ("evaluation", "calibration")

# Sections after which an article has only apparatus (lists of links, citations); everything from the first
# such heading on is dropped.
STOP_SECTIONS = {
    "see also", "references", "notes", "footnotes", "further reading", "external links", "bibliography",
    "sources", "citations", "works cited", "notes and references", "references and notes", "gallery",
    "primary sources", "secondary sources", "cited sources", "general references", "literature",
}
# Block elements whose content is not running prose.
DROP_BLOCK_TAGS = ("ref", "gallery", "timeline", "imagemap", "syntaxhighlight", "source", "pre", "score",
                   "graph", "mapframe", "references", "table")
LINK_DROP_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:", "help:",
                      "portal:", "wikt:", "wiktionary:", "s:", "commons:", ":category:")
INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]{2,10})?:")


@dataclass
class Article:
    """One cleaned article."""

    title: str
    page_id: str
    revision_id: str
    timestamp: str
    paragraphs: list[str]


# --------------------------------------------------------------------------------------------------- markup


def _template_text(body: str) -> str:
    """Replacement text for one innermost ``{{...}}`` template (most templates vanish)."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ").strip()
    args = [p for p in parts[1:] if "=" not in p]
    if name in {"convert", "cvt"} and args:
        if len(args) >= 4 and args[1] in {"-", "to", "and", "or", "–", "x"}:
            sep = "–" if args[1] in {"-", "–"} else f" {args[1]} "
            return f"{args[0]}{sep}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}" if len(args) >= 2 else args[0]
    if name in {"nowrap", "nobr", "small", "smaller", "big", "nobold", "noitalic", "not a typo", "sic", "lang",
                "transl", "transliteration", "abbr", "em", "strong", "vr", "bigger", "resize", "math", "mvar",
                "var", "ill", "linktext", "keypress", "small caps", "smallcaps", "sc", "nihongo", "nihongo2",
                "visible anchor", "vanchor"}:
        if name in {"lang", "transl", "transliteration"} and len(args) >= 2:
            return args[-1]
        if name == "ill" and args:
            return args[0]
        if name == "linktext":
            return " ".join(args)
        return args[0] if args else ""
    if name == "angbr" and args:
        return f"⟨{args[0]}⟩"
    if name.startswith("lang-") and args:
        return args[-1]
    if name in {"ndash", "snd", "spaced ndash"}:
        return " – " if name != "ndash" else "–"
    if name in {"mdash", "spaced mdash"}:
        return "—"
    if name in {"nbsp", "space", "thinsp"}:
        return " "
    if name in {"'", "'s"}:
        return "'" if name == "'" else "'s"
    if name in {"c.", "circa", "ca."}:
        return f"c. {args[0]}" if args else "c."
    if name in {"frac", "sfrac"}:
        return "/".join(args[-2:]) if len(args) >= 2 else (f"1/{args[0]}" if args else "")
    if name in {"as of"} and args:
        return "As of " + " ".join(args[:1])
    if name in {"us$", "usd"} and args:
        return f"US${args[0]}"
    if name.startswith("formatnum:"):
        return parts[0].split(":", 1)[1]
    if name in {"floruit", "fl."} and args:
        return f"fl. {args[0]}"
    if name in {"reign", "r."}:
        return "r. "
    if name in {"okina"}:
        return "ʻ"
    if name == "1/2":
        return "½"
    return ""


def _link_text(body: str) -> str:
    """Replacement text for one innermost ``[[...]]`` link."""
    target, _, label = body.partition("|")
    low = target.strip().lower()
    if low.startswith(LINK_DROP_PREFIXES) or INTERWIKI.match(low):
        return ""
    if "|" in label:  # unusual multi-pipe link: the last part is the label
        label = label.rsplit("|", 1)[1]
    return (label or target).strip() if (label or target).strip() else ""


def _strip_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (nesting allowed), which hold data rather than prose."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth:
            if stripped.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _sub_until_stable(pattern: re.Pattern[str], repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


TEMPLATE_RE = re.compile(r"\{\{([^{}]*)\}\}")
LINK_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
EXT_LINK_RE = re.compile(r"\[(?:[a-z]+:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
HEADING_RE = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
MARKUP_LEFT = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|<|>|\||__[A-Z]+__|https?://|&[a-z]+;")


def wiki_to_paragraphs(wikitext: str) -> list[str]:
    """Convert MediaWiki markup into clean plain-text paragraphs (headings kept as their own paragraphs)."""
    text = wikitext.replace("\r\n", "\n")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/\s*>", "", text, flags=re.I)
    for tag in DROP_BLOCK_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.S | re.I)
    # Formulas and chemistry cannot be rendered as text: mark them so that their paragraphs are dropped.
    text = re.sub(r"<(math|chem|ce)\b[^>]*>.*?</\1\s*>", "<MATH>", text, flags=re.S | re.I)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?(nowiki|small|big|sub|sup|span|div|center|blockquote|poem|u|s|i|b|em|strong|abbr|cite|"
                  r"code|tt|var|font|onlyinclude|includeonly|noinclude|section)\b[^>]*>", "", text, flags=re.I)
    text = _sub_until_stable(TEMPLATE_RE, lambda m: _template_text(m.group(1)), text)
    text = _strip_tables(text)
    text = _sub_until_stable(LINK_RE, lambda m: _link_text(m.group(1)), text)
    text = EXT_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        heading = HEADING_RE.match(line)
        if heading:
            flush()
            title = heading.group(2).strip()
            if title.lower().strip(" :") in STOP_SECTIONS:
                break
            paragraphs.append("\x00" + title)  # heading marker, resolved below
            continue
        if not line or line.startswith(("*", "#", ";", ":", "|", "!", "{", "}")):
            flush()  # blank lines end a paragraph; lists, indents and leftovers are not prose
            continue
        current.append(line)
    flush()

    cleaned: list[str] = []
    for para in paragraphs:
        is_heading = para.startswith("\x00")
        para = _normalise(para.lstrip("\x00"))
        if not para or "<MATH>" in para or MARKUP_LEFT.search(para):
            continue
        if is_heading:
            if len(para) <= 80:
                cleaned.append("\x00" + para)
            continue
        if len(para) < 40 or not re.search(r"[.!?:;\"')]$", para) or para[0].islower():
            continue  # fragments, and continuations of dropped formulas or lists
        cleaned.append(para)
    # Keep a heading only when prose follows it.
    result = [p for i, p in enumerate(cleaned)
              if not p.startswith("\x00") or (i + 1 < len(cleaned) and not cleaned[i + 1].startswith("\x00"))]
    return [p.lstrip("\x00") for p in result]


def _normalise(text: str) -> str:
    """Unescape entities, normalise Unicode and whitespace, and tidy punctuation left by removed markup."""
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u00a0", " ").replace("\u200b", "").replace("\t", " ")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\(\s*[;,]\s*", "(", text)
    text = re.sub(r"\s*[;,]\s*\)", ")", text)
    text = re.sub(r"\(\s*(or|and|from|in)?\s*\)", "", text)
    text = re.sub(r"\s+([.,;:!?)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"([,;])(?=[,;.])", "", text)
    text = re.sub(r"\s{2,}", " ", text).strip()
    return text


# --------------------------------------------------------------------------------------------------- source


def fetch_wheel(dest: Path) -> Path:
    """Download the pinned gensim wheel (no dependencies) into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_PLATFORM,
           "-d", str(dest), f"gensim=={GENSIM_VERSION}"]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(dest.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no gensim {GENSIM_VERSION} wheel in {dest}")
    return wheels[0]


def read_dump(wheel: Path | None, dump: Path | None) -> bytes:
    """Return the decompressed XML dump, from a ``.bz2`` file or from the gensim wheel; checks the sha256."""
    if dump is not None:
        raw = dump.read_bytes()
    else:
        assert wheel is not None
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(DUMP_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DUMP_SHA256:
        raise SystemExit(f"unexpected dump sha256 {digest} (want {DUMP_SHA256})")
    return bz2.decompress(raw)


def parse_articles(xml_bytes: bytes) -> list[Article]:
    """Parse the dump and clean every eligible article (in dump order)."""
    root = ET.fromstring(xml_bytes)
    articles = []
    for page in root.iter(MW_NS + "page"):
        title = page.findtext(MW_NS + "title") or ""
        if page.findtext(MW_NS + "ns") != "0" or page.find(MW_NS + "redirect") is not None:
            continue
        if "(disambiguation)" in title or title.startswith("List of"):
            continue
        rev = page.find(MW_NS + "revision")
        assert rev is not None
        paragraphs = wiki_to_paragraphs(rev.findtext(MW_NS + "text") or "")
        if sum(len(p) for p in paragraphs) < MIN_ARTICLE_CHARS:
            continue
        articles.append(Article(title, page.findtext(MW_NS + "id") or "", rev.findtext(MW_NS + "id") or "",
                                rev.findtext(MW_NS + "timestamp") or "", [title, *paragraphs]))
    return articles


def truncate(paragraphs: list[str], max_chars: int) -> list[str]:
    """Leading paragraphs of an article up to about ``max_chars`` (whole paragraphs; no dangling heading)."""
    out: list[str] = []
    total = 0
    for para in paragraphs:
        if out and total + len(para) > max_chars:
            break
        out.append(para)
        total += len(para) + 2
    while len(out) > 1 and len(out[-1]) <= 80 and not re.search(r"[.!?:;\"')]$", out[-1]):
        out.pop()  # a trailing heading
    return out


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[str]:
    """All runs of ``n`` consecutive words in ``text`` (used to keep near-duplicate articles out)."""
    words = text.split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def split_articles(articles: list[Article], target: int, max_chars: int) -> dict[str, list[Article]]:
    """Deal articles (in salted-hash order) alternately to the splits until each reaches ``target`` bytes.

    An article that repeats any run of ``SHINGLE_WORDS`` words of an article already taken (Wikipedia
    sub-articles copy paragraphs of their parent, e.g. "Economy of Angola" and "Angola") is skipped.
    """
    order = sorted(articles, key=lambda a: hashlib.sha256((SALT + a.title).encode()).hexdigest())
    chosen: dict[str, list[Article]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    turn = 0
    for art in order:
        open_splits = [s for s in SPLITS if sizes[s] < target]
        if not open_splits:
            break
        paras = truncate(art.paragraphs, max_chars)
        text = "\n\n".join(paras)
        grams = shingles(text)
        if grams & seen:
            continue
        split = SPLITS[turn % len(SPLITS)]
        if split not in open_splits:
            split = open_splits[0]
        size = len(text.encode()) + 2
        if sizes[split] + size > MAX_SPLIT_BYTES:
            continue
        turn += 1
        seen |= grams
        chosen[split].append(Article(art.title, art.page_id, art.revision_id, art.timestamp, paras))
        sizes[split] += size
    return chosen


def render(articles: list[Article]) -> str:
    return "\n\n".join("\n\n".join(a.paragraphs) for a in articles) + "\n"


def render_sources(chosen: dict[str, list[Article]], texts: dict[str, str]) -> str:
    lines = [
        "# Default corpus: sources and licence",
        "",
        "Generated by `tools/build_corpus.py`; do not edit by hand (rerun the script instead).",
        "",
        "## Source",
        "",
        "English Wikipedia articles, from the XML dump excerpt "
        f"`{DUMP_MEMBER.rsplit('/', 1)[1]}` (sha256 `{DUMP_SHA256}`)",
        f"that the PyPI wheel `gensim=={GENSIM_VERSION}` ships as test data (`{DUMP_MEMBER}`).",
        "It holds the first pages (page ids 10 to 30302: Anarchism, Autism, Albedo, Alabama, Aristotle, ...) of a",
        "May 2016 dump of the English Wikipedia, each at its latest revision of the time (Feb.-May 2016).",
        "",
        "## Licence",
        "",
        "The text is from Wikipedia and is licensed under the Creative Commons Attribution-ShareAlike 3.0",
        "Unported licence (CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/); Wikipedia text is",
        "also available under the GNU Free Documentation License 1.3 (unversioned, no invariant sections).",
        "Authors: the Wikipedia contributors listed in each article's history,",
        "`https://en.wikipedia.org/w/index.php?title=TITLE&action=history`; the revision used is named below",
        "(`https://en.wikipedia.org/w/index.php?oldid=REVISION`).",
        "Changes made: wiki markup, references, templates, tables, images, lists and the trailing",
        "See also/References/External links sections were removed, whitespace was normalised, and long",
        "articles were truncated to their leading paragraphs. These text files are distributed under CC BY-SA 3.0;",
        "that licence covers only the files in this directory, not the rest of the project.",
        "",
        "## How the split was made",
        "",
        "Main-namespace articles that are not redirects, lists or disambiguation pages and keep at least",
        f"{MIN_ARTICLE_CHARS} characters after cleaning are sorted by `sha256(\"{SALT}\" + title)` and dealt",
        "alternately to `evaluation.txt` and `calibration.txt` (each article goes to exactly one file; at most",
        f"about {MAX_ARTICLE_CHARS} characters of its leading paragraphs), until each file holds about",
        f"{TARGET_BYTES} bytes. An article that repeats any run of {SHINGLE_WORDS} words of an article already",
        "taken is skipped (sub-articles such as \"Economy of Angola\" copy paragraphs of their parent), so",
        "calibration and evaluation text come from disjoint articles and share no such run of words.",
        "Each article starts with its title on a line of its own; section headings are kept as one-line",
        "paragraphs; paragraphs are separated by one blank line.",
        "",
    ]
    for split in SPLITS:
        data = texts[split].encode()
        lines += [f"## {split}.txt", "",
                  f"{len(data)} bytes, sha256 `{hashlib.sha256(data).hexdigest()}`, {len(chosen[split])} articles:",
                  ""]
        for art in chosen[split]:
            lines.append(f"- {art.title} (page {art.page_id}, revision {art.revision_id}, {art.timestamp})")
        lines.append("")
    return "\n".join(lines)


def build(wheel: Path | None, dump: Path | None, target: int, max_chars: int) -> dict[str, str]:
    """Return ``{file name: content}`` for the corpus directory."""
    if wheel is None and dump is None:
        with tempfile.TemporaryDirectory() as tmp:
            xml_bytes = read_dump(fetch_wheel(Path(tmp)), None)
    else:
        xml_bytes = read_dump(wheel, dump)
    chosen = split_articles(parse_articles(xml_bytes), target, max_chars)
    texts = {s: render(chosen[s]) for s in SPLITS}
    overlap = sorted(shingles(texts["evaluation"]) & shingles(texts["calibration"]))
    if overlap:
        raise SystemExit(f"calibration and evaluation share {len(overlap)} runs of words, e.g. {overlap[0]!r}")
    files = {f"{s}.txt": texts[s] for s in SPLITS}
    files["SOURCES.md"] = render_sources(chosen, texts)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--wheel", type=Path, help="use this local gensim wheel instead of pip download")
    parser.add_argument("--dump", type=Path, help="use this local copy of the enwiki .bz2 dump excerpt")
    parser.add_argument("--target-bytes", type=int, default=TARGET_BYTES)
    parser.add_argument("--max-article-chars", type=int, default=MAX_ARTICLE_CHARS)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = parser.parse_args(argv)

    files = build(args.wheel, args.dump, args.target_bytes, args.max_article_chars)
    summary: dict[str, object] = {"source": f"gensim=={GENSIM_VERSION}:{DUMP_MEMBER}", "out": str(args.out),
                                  "files": {}}
    mismatched = []
    for name, content in files.items():
        data = content.encode("utf-8")
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                mismatched.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        summary["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # type: ignore[index]
    if args.check:
        summary["check"] = "ok" if not mismatched else {"mismatched": mismatched}
    print(json.dumps(summary, indent=2))
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
