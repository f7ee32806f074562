"""Character tokenizer for the demo.

Why characters: the demo must train a backbone in minutes on a CPU. A character vocabulary (about 50 symbols
after lower-casing) keeps the backbone's output layer and the HMM's emission table (states x vocabulary) tiny, has
no out-of-vocabulary words, and needs no separate tokenizer training. It also makes the factorization barrier
plain to see: neighbouring masked characters of one word are strongly dependent, which is exactly what a one-step
factorized prediction cannot express and what an HMM over a 32-position window can.
"""

from __future__ import annotations

from collections import Counter

import torch

UNKNOWN = "\u2047"  # shown for characters outside the vocabulary
MASK = "\u2588"  # shown for masked positions


class CharTokenizer:
    """Lower-cased characters seen at least ``min_count`` times in the training text, plus unknown and mask ids.

    Ids ``0 .. n-1`` are characters and ``unknown_id = n``: the ``vocab_size = n + 1`` tokens a model predicts.
    ``mask_id = n + 1 = vocab_size`` lies outside the predicted vocabulary (as in MDLM), so embeddings need
    ``vocab_size + 1`` rows.
    """

    def __init__(self, characters: str):
        if len(set(characters)) != len(characters) or not characters:
            raise ValueError(f"characters: expected distinct characters, got {characters!r}")
        self.characters = characters
        self._index = {c: i for i, c in enumerate(characters)}
        self.unknown_id = len(characters)
        self.mask_id = len(characters) + 1
        self.vocab_size = len(characters) + 1

    @classmethod
    def fit(cls, text: str, min_count: int = 5) -> "CharTokenizer":
        """Vocabulary of the lower-cased ``text``: characters with at least ``min_count`` occurrences."""
        counts = Counter(text.lower())
        chars = "".join(sorted(c for c, n in counts.items() if n >= min_count))
        if not chars:
            raise ValueError("text: no character occurs often enough to build a vocabulary")
        return cls(chars)

    def encode(self, text: str) -> torch.Tensor:
        """(len(text),) int64 ids of the lower-cased text."""
        index, unknown = self._index, self.unknown_id
        return torch.tensor([index.get(c, unknown) for c in text.lower()], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of a 1-D id sequence; unknown and mask ids are shown as visible placeholders."""
        chars = self.characters
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            out.append(chars[i] if 0 <= i < len(chars) else MASK if i == self.mask_id else UNKNOWN)
        return "".join(out)
