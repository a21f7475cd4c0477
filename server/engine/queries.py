"""Text queries of open-vocabulary detectors (OWLv2): their limits, their tokenizers, and what a stream sets.

Queries are checked and tokenized where they are set (REST or a control message); only the encoding, which runs the
model's text encoder, happens on the inference thread (the runner's QueryCache per stream, once per change).
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.budget import BudgetError

log = logging.getLogger("eventful.engine")

MAX_QUERIES = 16  # text queries per stream
MAX_QUERY_CHARS = 64  # characters of one query (after stripping surrounding whitespace)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a directory holding either has a tokenizer to load


class QueriesUnsupported(RuntimeError):
    """The loaded model takes no text queries (REST 409, the control message's error `queries_unsupported`)."""

    def __init__(self, message: str = "the loaded model has no text queries (they are for OWLv2 models)"):
        super().__init__(message)
        self.message = message


class QueryError(BudgetError):
    """Queries out of the limits (REST 422, the control message's error `invalid_queries`); `field` names the one
    at fault (`queries` or `queries.<index>`)."""


@dataclass(frozen=True)
class StreamQueries:
    """Queries as set: the stripped texts (the results' labels) and their token ids (BOS .. EOS each)."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]


def parse_query_list(text: str) -> list[str]:
    """'person, car' -> ['person', 'car'] (the --default-queries and --queries form)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def check_query_texts(queries: Any) -> tuple[str, ...]:
    """A JSON value -> the stripped query texts; QueryError naming the first one out of the limits."""
    if not isinstance(queries, list | tuple):
        raise QueryError("queries", "queries must be a list of strings")
    if not 1 <= len(queries) <= MAX_QUERIES:
        raise QueryError("queries", f"between 1 and {MAX_QUERIES} queries (got {len(queries)})")
    texts = []
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise QueryError(f"queries.{i}", f"query {i} is not a string")
        stripped = query.strip()
        if not 1 <= len(stripped) <= MAX_QUERY_CHARS:
            raise QueryError(f"queries.{i}", f"query {i} must be 1 to {MAX_QUERY_CHARS} characters after stripping "
                             f"surrounding whitespace (got {len(stripped)})")
        texts.append(stripped)
    return tuple(texts)


class QueryTokenizer:
    """A CLIP tokenizer loaded from a local directory (transformers), safe to call from any thread."""

    kind = "clip"

    def __init__(self, tokenizer: Any, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self._lock = threading.Lock()  # a fast tokenizer refuses concurrent use ("Already borrowed")

    def __call__(self, text: str) -> list[int]:
        """BOS, the text's tokens, EOS."""
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])


class FallbackTokenizer:
    """For random weights only (the named `owlv2-base-patch16`, which comes without tokenizer files): each word or
    punctuation mark, lower-cased, hashed (CRC-32) to one id below BOS (vocab_size - 2) and EOS (vocab_size - 1,
    the highest id: the text encoder pools it). Deterministic, so equal queries give equal embeddings and different
    ones differ; the ids mean nothing, and neither do the labels of a random-weight model."""

    kind = "fallback"
    source = "built-in fallback (random weights only: hashed words, no vocabulary)"

    def __init__(self, vocab_size: int):
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [self.bos, *(1 + zlib.crc32(w.encode()) % (self.bos - 1) for w in words), self.eos]


Tokenizer = Callable[[str], list[int]]


def has_tokenizer_files(path: str | Path) -> bool:
    directory = Path(path)
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def tokenize_queries(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int) -> StreamQueries:
    """Texts -> StreamQueries; QueryError for a query longer than the text encoder's positions (it is refused, not
    truncated: a truncated query would be a different query under the same label)."""
    ids = []
    for i, text in enumerate(texts):
        row = tuple(int(t) for t in tokenizer(text))
        if len(row) > max_tokens:
            raise QueryError(f"queries.{i}", f"query {i} ({text!r}) is {len(row)} tokens with BOS and EOS; the text "
                             f"encoder takes at most {max_tokens}")
        ids.append(row)
    return StreamQueries(tuple(texts), tuple(ids))
