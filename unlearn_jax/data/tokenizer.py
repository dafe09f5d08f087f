"""A tokenizer that needs no download: whole words of a known corpus, every other byte as itself.

Token ids::

    0 PAD, 1 BOS, 2 EOS                  special tokens
    3 .. 258                            the 256 byte values (byte b is id 3 + b)
    259 .. 259 + len(words) - 1         whole pieces of text (``words``), e.g. ``" Korvath"``

Text is cut into *pieces* by one rule (:func:`pieces`): a run of ASCII letters or a run of digits,
each with the single space before it if there is one, or any other single character (again with
its leading space). A piece in the word table becomes one token; any other piece becomes the
tokens of its UTF-8 bytes. So every string can be encoded, ``decode(encode(text)) == text`` for
every string, and with an empty word table this is a plain byte-level tokenizer (vocabulary 259).

Built from a generated corpus (:meth:`Tokenizer.from_corpus`), the word table holds every piece of
two or more characters the corpus uses, so the corpus encodes to about one token per word: short
sequences that a small model learns quickly, without spelling each name letter by letter.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3
BYTE_OFFSET = NUM_SPECIAL
FIRST_WORD_ID = BYTE_OFFSET + 256
SPECIAL_NAMES = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}

# Alternatives in order: letters, digits, one other non-space character (each with an optional
# leading space), a space. Every character of a string starts a match, so the pieces tile the text.
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^A-Za-z0-9 ]| ")


def pieces(text: str) -> list[str]:
    """Cuts ``text`` into the pieces the tokenizer looks up; ``"".join(pieces(t)) == t``.

    Examples:
      >>> pieces("Where was Ilse born?  In 1962.")
      ['Where', ' was', ' Ilse', ' born', '?', ' ', ' In', ' 1962', '.']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    return _PIECE.findall(text)


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """Whole-piece tokens with a byte fallback; see the module docstring for the id layout.

    Attributes:
      words: the whole-piece vocabulary, distinct strings of at least two characters, each a
        single piece (what :func:`pieces` returns). Word ``i`` has id ``259 + i``.

    Raises:
      ValueError: if a word repeats, is shorter than two characters or is not a single piece.

    Examples:
      >>> tok = Tokenizer(words=(" born", "Where"))
      >>> ids = tok.encode("Where was Ilse born?")
      >>> len(ids), tok.decode(ids)
      (12, 'Where was Ilse born?')
      >>> Tokenizer().vocab_size  # byte-level
      259
    """

    words: tuple[str, ...] = ()

    def __post_init__(self):
        words = tuple(self.words)
        if len(set(words)) != len(words):
            repeated = sorted(w for w, c in collections.Counter(words).items() if c > 1)
            raise ValueError(f"words must be distinct, these repeat: {repeated[:5]}.")
        for word in words:
            if not isinstance(word, str) or len(word) < 2 or pieces(word) != [word]:
                raise ValueError(
                    f"every word must be a single piece of >= 2 characters (see pieces()), got "
                    f"{word!r}."
                )
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "_ids", {w: FIRST_WORD_ID + i for i, w in enumerate(words)})

    @classmethod
    def from_corpus(cls, texts: Iterable[str], *, max_words: int | None = None) -> Tokenizer:
        """The tokenizer whose words are the pieces of ``texts`` with two or more characters.

        Words are ordered by decreasing count, ties in code-point order; ``max_words`` keeps the
        most frequent. The result depends only on the multiset of pieces, so the same corpus always
        gives the same ids.

        Raises:
          ValueError: if ``max_words`` is negative.
        """
        if max_words is not None and (isinstance(max_words, bool) or max_words < 0):
            raise ValueError(f"max_words must be None or an integer >= 0, got {max_words=}.")
        counts = collections.Counter(p for text in texts for p in pieces(text) if len(p) >= 2)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(words=tuple(ranked if max_words is None else ranked[:max_words]))

    @property
    def vocab_size(self) -> int:
        """The number of token ids: ``3 + 256 + len(words)``."""
        return FIRST_WORD_ID + len(self.words)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """The token ids of ``text`` (optionally with BOS first and EOS last)."""
        ids = [BOS_ID] if bos else []
        for piece in pieces(text):
            word_id = self._ids.get(piece)
            if word_id is not None:
                ids.append(word_id)
            else:
                ids.extend(BYTE_OFFSET + b for b in piece.encode("utf-8"))
        if eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
        """The text of token ids; special tokens are dropped, and with ``stop_at_eos`` (default)
        nothing after the first EOS is read. Byte runs that are not valid UTF-8 (a model can emit
        them) decode with U+FFFD replacement characters.

        Raises:
          ValueError: if an id is outside ``[0, vocab_size)``.
        """
        out: list[str] = []
        run = bytearray()
        for token in np.asarray(ids, np.int64).reshape(-1).tolist():
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside [0, {self.vocab_size}).")
            if token == EOS_ID and stop_at_eos:
                break
            if BYTE_OFFSET <= token < FIRST_WORD_ID:
                run.append(token - BYTE_OFFSET)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if token >= FIRST_WORD_ID:
                out.append(self.words[token - FIRST_WORD_ID])
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Each id as a readable string (``"<bos>"``, ``" Korvath"``, ``"<0x41>"``), for debugging."""
        names = []
        for token in np.asarray(ids, np.int64).reshape(-1).tolist():
            if token in SPECIAL_NAMES:
                names.append(SPECIAL_NAMES[token])
            elif BYTE_OFFSET <= token < FIRST_WORD_ID:
                names.append(f"<0x{token - BYTE_OFFSET:02X}>")
            else:
                names.append(self.words[token - FIRST_WORD_ID])
        return names

    def to_info(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :meth:`from_info` rebuilds the tokenizer."""
        return {
            "kind": "words+bytes",
            "words": list(self.words),
            "vocab_size": self.vocab_size,
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
        }

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Tokenizer:
        """The tokenizer described by :meth:`to_info`'s output.

        Raises:
          ValueError: if ``info`` is not such a description.
        """
        if not isinstance(info, dict) or info.get("kind") != "words+bytes" or "words" not in info:
            raise ValueError(
                "info must be the dict of Tokenizer.to_info() (kind 'words+bytes' with 'words')."
            )
        return cls(words=tuple(info["words"]))
