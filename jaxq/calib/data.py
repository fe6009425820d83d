"""Calibration data: a text, a text file or a JSONL file, tokenised into N seeded samples of L tokens.

Sources (`calibration_tokens(model, source, ...)`):
  * None: the built-in default, for offline use. The WikiText-2 validation split that sits next to a source
    checkout (../shared/data/wikitext-2/valid.txt from the repository root) when present, else the English
    prose of Python's own `pydoc_data.topics` (the help() texts; about 100k tokens, in every CPython).
  * a path (pathlib.Path, or a one-line str naming a file): `*.jsonl` is one JSON object per line whose
    `field` (default "text") holds a document; anything else is read as UTF-8 text.
  * a str of text, or token ids (any int array; flattened).
Documents are joined with blank lines into one token stream (no padding tokens, unlike ModelOpt's
left-padded batches), cut from the start into non-overlapping windows of L tokens (the tail is dropped),
and N of them are drawn without replacement with NumPy's generator seeded by `seed` (ModelOpt's 1234 by
default), kept in text order. Fewer windows than N: all of them are used, with a warning. Defaults follow
ModelOpt's hf_ptq.py (512 samples of 512 tokens); on a CPU 32-128 samples are plenty for a 100M-1B model.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from jaxq.eval import text_token_ids, token_windows

log = logging.getLogger(__name__)

DEFAULT_WIKITEXT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_SEED = 1234
# Tokenise at most this many characters per token wanted: enough for a seeded choice among many windows
# without tokenising a multi-gigabyte file (WikiText-2 averages ~4.5 characters per token).
_CHARS_PER_TOKEN_BUDGET = 32
_PATH_SUFFIXES = (".txt", ".jsonl", ".json", ".md")
_PIECE = 64_000


def default_calibration_text() -> tuple[str, str]:
    """(text, description) of the built-in default source (module docstring)."""
    if DEFAULT_WIKITEXT.is_file():
        return DEFAULT_WIKITEXT.read_text(encoding="utf-8"), str(DEFAULT_WIKITEXT)
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics"


def read_calibration_text(source: str | os.PathLike, field: str = "text", max_chars: int | None = None,
                          progress: bool = True) -> tuple[str, str]:
    """(text, description) of a text or file source; max_chars stops reading a long file early.

    ValueError for an empty file, a JSONL record without `field` or with a non-string one (naming the
    file and line); FileNotFoundError for a one-line str that looks like a path but names no file.
    """
    path = _as_path(source)
    if path is None:
        return str(source), "the given text"
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path} does not exist (pass a text or JSONL file, or text)")
    if path.suffix == ".jsonl":
        text = _read_jsonl(path, field, max_chars, progress)
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read(max_chars if max_chars is not None else -1)
    if not text.strip():
        raise ValueError(f"calibration data {path} is empty; pass a file with text in it")
    return text, str(path)


def calibration_tokens(model, source: str | os.PathLike | Sequence[int] | np.ndarray | None = None, *,
                       num_samples: int = 512, seq_len: int = 512, seed: int = DEFAULT_SEED, field: str = "text",
                       progress: bool = True) -> np.ndarray:
    """[n, seq_len] int32 token windows, n = min(num_samples, windows available) (module docstring).

    model: a LoadedModel (its tokenizer turns text into ids; without one, only token ids work).
    ValueError naming the source when it is empty or shorter than one window of seq_len tokens.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs num_samples >= 1 and seq_len >= 2, got {num_samples} x {seq_len}")
    if source is None or isinstance(source, (str, os.PathLike)):
        if model.tokenizer is None:
            raise ValueError(f"{model.source} has no tokenizer, so text calibration data (or the built-in "
                             "default) cannot be used; pass token ids")
        budget = _CHARS_PER_TOKEN_BUDGET * num_samples * seq_len
        if source is None:
            text, what = default_calibration_text()
            text = text[:budget]
        else:
            text, what = read_calibration_text(source, field, budget, progress)
        ids = _tokenize(model, text, progress)
    else:
        ids, what = np.asarray(source).reshape(-1), "the given token ids"
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"calibration token ids have dtype {ids.dtype}, expected integers")
    if len(ids) < seq_len:
        raise ValueError(f"calibration data {what} holds {len(ids)} tokens, fewer than one sample of "
                         f"{seq_len}; give more text or a smaller calib_seq")
    windows = token_windows(ids, seq_len)
    if len(windows) < num_samples:
        log.warning("calibration data %s holds %d samples of %d tokens, fewer than the %d asked; using all of "
                    "them", what, len(windows), seq_len, num_samples)
        return windows
    pick = np.sort(np.random.default_rng(seed).choice(len(windows), num_samples, replace=False))
    return windows[pick]


def _tokenize(model, text: str, progress: bool) -> np.ndarray:
    """Token ids of text, tokenised in pieces of about _PIECE characters cut after a newline (a fast tokenizer
    holds several times a text's size while it encodes it; a line break is a token boundary anyway)."""
    from tqdm.auto import tqdm

    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _PIECE)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    bar = tqdm(pieces, desc="tokenize", unit="piece", disable=not progress or len(pieces) < 4)
    return np.concatenate([text_token_ids(model, piece) for piece in bar])


def _as_path(source) -> pathlib.Path | None:
    """The file a source names, or None when it is text. A one-line str is a path when it names a file or
    looks like one (a path suffix or separator), so a mistyped file name is an error, not calibration text."""
    if isinstance(source, os.PathLike):
        return pathlib.Path(source)
    if "\n" in source or len(source) > 4096:
        return None
    if os.path.isfile(source) or source.endswith(_PATH_SUFFIXES) or os.sep in source.strip():
        return pathlib.Path(source)
    return None


def _read_jsonl(path: pathlib.Path, field: str, max_chars: int | None, progress: bool) -> str:
    from tqdm.auto import tqdm

    docs, total = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(tqdm(f, desc=f"read {path.name}", unit="record", disable=not progress), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({err.msg}); JSONL needs one per line") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno}: record has no field {field!r} (it has {keys}); pass the "
                                 "field that holds the text (field= / --calib-field)")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is a {type(record[field]).__name__}, "
                                 "expected a string")
            docs.append(record[field])
            total += len(record[field])
            if max_chars is not None and total >= max_chars:
                break
    return "\n\n".join(docs)
