"""Reading the raw text formats: plain or gzip'd files, delimited tables in chunks, JSON / Python-literal lines.

Every parse error is a ``ValueError`` that names the file and the 1-based line number. Tables are parsed a
chunk of lines at a time with numpy's C tokenizer (``np.loadtxt``), so a file of tens of millions of rows
loads at about a microsecond a row, and nothing holds more than one chunk of text at once.
"""

from __future__ import annotations

import ast
import gzip
import json
from itertools import repeat
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

MISSING = -1           # the code of a missing id ('' or NULL in an "id" column); maps to the OOV row
_MISSING_TEXT = ("", "NULL", "null", "NaN", "nan")
KINDS = ("int", "id", "float", "str")


def open_text(path):
    """Open ``path`` for reading text; gzip'd files (by magic number, whatever the name) are decompressed."""
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")  # universal newlines: CRLF files read like LF ones


def find_file(path, names: Sequence[str], what: str) -> Path:
    """The first of ``names`` (or the same with ``.gz``) inside directory ``path``; ``path`` itself if a file."""
    path = require_path(path, what)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is neither a file nor a directory")
    for name in names:
        for candidate in (path / name, path / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{what}: none of {list(names)} (or .gz) found in {path}")


def require_path(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what}: a path to the data is required")
    return Path(path)


def parse_error(path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def read_header(path, delimiter: str, normalize: Callable[[str], str] = str.strip) -> Tuple[str, ...]:
    """The header row of a delimited file, each name passed through ``normalize``."""
    with open_text(path) as f:
        first = f.readline()
    if not first.strip():
        raise parse_error(path, 1, "empty file: expected a header row")
    return tuple(normalize(t) for t in first.rstrip("\r\n").split(delimiter))


def _locate_width(path, lines, first_line: int, delimiter: str, width: int) -> None:
    for i, line in enumerate(lines):
        found = line.rstrip("\r\n").count(delimiter) + 1
        if found != width:
            raise parse_error(path, first_line + i, f"expected {width} columns, found {found}")


def _loadtxt(lines, delimiter: str, dtype, usecols):
    return np.loadtxt(lines, delimiter=delimiter, dtype=dtype, usecols=usecols, ndmin=2, comments=None,
                      quotechar=None)


def convert_column(path, raw: np.ndarray, kind: str, name: str, first_line: int) -> np.ndarray:
    """Column of strings -> typed column; ``raw`` is a numpy str array. Errors name the file and line."""
    if kind == "str":
        return raw
    values = raw
    if kind == "id":
        values = np.where(np.isin(raw, _MISSING_TEXT), str(MISSING), raw)
    dtype = np.float64 if kind == "float" else np.int64
    try:
        return values.astype(dtype)
    except (ValueError, OverflowError):
        caster = float if kind == "float" else int
        for i, text in enumerate(values.tolist()):
            try:
                caster(text)
            except (ValueError, OverflowError):
                what = "a number" if kind == "float" else "an integer"
                raise parse_error(path, first_line + i,
                                  f"column {name!r}: cannot parse {text!r} as {what}") from None
        raise


def read_table(path, columns: Dict[str, str], *, delimiter: str = ",",
               normalize: Callable[[str], str] = str.strip, chunk_bytes: int = 1 << 24,
               limit: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Chunks of a delimited text file with a header row, as ``{column: array}``.

    columns: name -> kind: ``"int"`` (int64, must parse), ``"id"`` (int64; '', NULL, NaN -> ``MISSING``),
    ``"float"`` (float64), ``"str"`` (numpy str). Names are matched after ``normalize`` (default: strip, so
    ``'new_user_class_level '`` matches). Rows must have as many fields as the header. limit: stop after
    that many data rows.
    """
    for kind in columns.values():
        if kind not in KINDS:
            raise ValueError(f"column kind must be one of {KINDS}, got {kind!r}")
    header = read_header(path, delimiter, normalize)
    missing = [c for c in columns if c not in header]
    if missing:
        raise parse_error(path, 1, f"header {list(header)} lacks the column(s) {missing}")
    width = len(header)
    index = {c: header.index(c) for c in columns}
    numeric = [c for c, k in columns.items() if k in ("int", "id")]
    strict = [c for c in numeric if columns[c] == "int"]
    rows_read = 0
    with open_text(path) as f:
        f.readline()
        line_no = 2
        while limit is None or rows_read < limit:
            lines = f.readlines(chunk_bytes)
            if not lines:
                break
            if limit is not None and rows_read + len(lines) > limit:
                lines = lines[:limit - rows_read]
            # every line's delimiter count, in C (map over str.count); find the offending line only when one is off
            if set(map(str.count, lines, repeat(delimiter, len(lines)))) != {width - 1}:
                _locate_width(path, lines, line_no, delimiter, width)
            if width == 1:  # the delimiter count cannot see blank lines, which loadtxt would skip
                blank = [i for i, line in enumerate(lines) if not line.strip()]
                if blank:
                    raise parse_error(path, line_no + blank[0], "empty line")
            out: Dict[str, np.ndarray] = {}
            # fast path: the integer columns in one C pass (again without the id columns when one of those holds
            # a missing value); what fails here is parsed as text below, which names the bad line
            for group in (numeric, strict) if strict != numeric else (numeric,):
                if not group:
                    continue
                try:
                    block = _loadtxt(lines, delimiter, np.int64, [index[c] for c in group])
                except ValueError:
                    continue
                out.update({c: block[:, j] for j, c in enumerate(group)})
                break
            rest = [c for c in columns if c not in out]
            if rest:
                text = _loadtxt(lines, delimiter, str, [index[c] for c in rest])
                for j, c in enumerate(rest):
                    out[c] = convert_column(path, text[:, j], columns[c], c, line_no)
            yield out
            rows_read += len(lines)
            line_no += len(lines)


def read_columns(path, columns: Dict[str, str], **options) -> Dict[str, np.ndarray]:
    """The whole table as ``{column: array}`` (``read_table`` chunks concatenated)."""
    parts = list(read_table(path, columns, **options))
    empty = {"int": np.int64, "id": np.int64, "float": np.float64, "str": str}
    return {c: (np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, dtype=empty[k]))
            for c, k in columns.items()}


def parse_record(text: str, path, line: int) -> dict:
    """One line holding a JSON object or a Python dict literal (the original Amazon meta files)."""
    try:
        record = json.loads(text)
    except ValueError:
        try:
            record = ast.literal_eval(text)  # safe: literals only, never code
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise parse_error(path, line, f"not a JSON object or Python dict literal ({type(err).__name__})") from None
    if not isinstance(record, dict):
        raise parse_error(path, line, f"expected an object, found {type(record).__name__}")
    return record


def iter_lines(path) -> Iterator[Tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a (possibly gzip'd) file."""
    with open_text(path) as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                yield number, text
