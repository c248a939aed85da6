"""Reading the raw text formats: plain or gzip'd files, delimited tables in chunks, JSON / Python-literal lines.

Every parse error is a ``ValueError`` that names the file and the 1-based line number: a field that does not
parse, and equally bytes that are not UTF-8 or gzip data that is corrupt or cut short (then also the byte
offset, in the file and, for gzip, in the decompressed data). A UTF-8 byte-order mark and CRLF line endings
read like the plain file. Tables are parsed a chunk of lines at a time with numpy's C tokenizer
(``np.loadtxt``), so a file of tens of millions of rows loads at about a microsecond a row, and nothing holds
more than one chunk of text at once.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import json
import zlib
from contextlib import contextmanager
from functools import partial
from itertools import chain, repeat
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

MISSING = -1           # the code of a missing id ('' or NULL in an "id" column); maps to the OOV row
_MISSING_TEXT = ("", "NULL", "null", "NaN", "nan")
KINDS = ("int", "id", "float", "str")


# what decoding or decompressing a file raises: gzip.BadGzipFile (an OSError) for a bad header or trailer,
# zlib.error for corrupt deflate data, EOFError for a cut stream, UnicodeDecodeError for bytes that are not UTF-8
_READ_ERRORS = (UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile)
_PIECE = 1 << 16  # bytes read at a time when locating a read error


def _is_gzip(path) -> bool:
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


class TextFile:
    """A text file open for reading whose decoding and decompression errors are ValueErrors naming file and line.

    Reads like the ``io.TextIOWrapper`` it wraps (``readline``, ``readlines``, ``read``, iteration, ``with``).
    The text layer decodes ahead in blocks, so when one fails it cannot say on which line; the error path
    reads the raw bytes again to find the line and offset (``_read_error``). The checks wrap whole reads;
    iteration costs one generator step a line.
    """

    def __init__(self, path: Path, stream):
        self.path, self._stream = path, stream

    def __enter__(self) -> TextFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    @contextmanager
    def _located(self):
        try:
            yield
        except _READ_ERRORS as err:
            raise _read_error(self.path, err) from None

    def readline(self, size: int = -1) -> str:
        with self._located():
            return self._stream.readline(size)

    def readlines(self, hint: int = -1) -> List[str]:
        with self._located():
            return self._stream.readlines(hint)

    def read(self, size: int = -1) -> str:
        with self._located():
            return self._stream.read(size)

    def __iter__(self) -> Iterator[str]:
        with self._located():
            yield from self._stream


def open_text(path) -> TextFile:
    """Open ``path`` for reading text; gzip'd files (by magic number, whatever the name) are decompressed.

    Text is UTF-8; a byte-order mark at the start is dropped, and CRLF (or CR) line ends read as LF.
    """
    path = Path(path)
    # utf-8-sig: a BOM (Excel and Windows tools write one) would otherwise glue itself to the first name or record
    if _is_gzip(path):
        return TextFile(path, gzip.open(path, "rt", encoding="utf-8-sig"))
    return TextFile(path, open(path, "r", encoding="utf-8-sig"))  # universal newlines: CRLF reads like LF


class _Damaged(Exception):
    """A gzip stream goes bad at compressed byte ``offset``: zlib's ``reason``, or None where the data ends early."""

    def __init__(self, offset: int, reason: Optional[str]):
        super().__init__(offset, reason)
        self.offset, self.reason = offset, reason


def _gunzip(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed pieces of gzip file ``raw``, exactly up to where it goes bad, which raises ``_Damaged``.

    ``gzip.GzipFile`` drops what the failing read had decompressed and keeps no compressed offset, so this walks
    the members with zlib itself; a piece that fails is fed again a byte at a time to a copy of the
    decompressor taken before it, to find the byte. Zero padding between members is skipped, as gzip does.
    """
    inflater, offset, block = None, 0, b""  # offset: of block[0] in the file
    while True:
        if not block:
            block = raw.read(_PIECE)
            if not block:
                if inflater is not None:
                    raise _Damaged(offset, None)
                return
        if inflater is None:
            data = block.lstrip(b"\0")
            offset, block = offset + len(block) - len(data), data
            if not block:
                continue
            inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer around the deflate data
        before = inflater.copy()
        try:
            out = inflater.decompress(block)
        except zlib.error as err:
            for i in range(len(block)):
                try:
                    yield before.decompress(block[i:i + 1])
                except zlib.error:
                    raise _Damaged(offset + i, str(err)) from None
            raise _Damaged(offset, str(err)) from None
        yield out
        if inflater.eof:  # a member ends; what follows is padding or the next member
            rest = inflater.unused_data
            offset, block, inflater = offset + len(block) - len(rest), rest, None
        else:
            offset, block = offset + len(block), b""


def _read_error(path: Path, err: Exception) -> ValueError:
    """``err``, raised reading ``path`` as text, as a ValueError naming the line and byte where the file goes bad.

    Reads the file again as bytes, counting lines (LF) up to the first byte that is not UTF-8 or the first
    damaged gzip byte; runs on the error path only. Offsets are 0-based; for a gzip file both the compressed
    one and the one in the decompressed data are given.
    """
    gzipped = _is_gzip(path)
    line, done, carry = 1, 0, b""  # done: bytes decoded before carry, the start of a character split by a read
    with open(path, "rb") as raw:
        pieces = _gunzip(raw) if gzipped else iter(partial(raw.read, _PIECE), b"")
        try:
            for piece in chain(pieces, [None]):  # None: the end, where a partial character is an error too
                data = carry + (piece or b"")
                try:
                    used = codecs.utf_8_decode(data, "strict", piece is None)[1]
                except UnicodeDecodeError as bad:
                    where = f"offset {done + bad.start}" + (" of the decompressed data" if gzipped else "")
                    return parse_error(path, line + data.count(b"\n", 0, bad.start),
                                       f"not UTF-8 text: byte 0x{data[bad.start]:02x} at {where} ({bad.reason})")
                line, done, carry = line + data.count(b"\n", 0, used), done + used, data[used:]
        except _Damaged as bad:
            line += carry.count(b"\n")
            where = f"compressed byte {bad.offset} (decompressed byte {done + len(carry)})"
            if bad.reason is None:
                return parse_error(path, line, f"the gzip data ends early, at {where}; is the file truncated?")
            # a checksum is checked at the end of a member: the damage itself lies somewhere before
            after = "; the damage is somewhere before" if bad.reason.endswith(("data check", "length check")) else ""
            return parse_error(path, line, f"corrupt gzip data at {where}: {bad.reason}{after}")
    # the bytes read cleanly this time (the file changed meanwhile?): say what failed, without a line
    return ValueError(f"{path}: cannot read the file: {type(err).__name__}: {err}")


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
