"""Bad data files fail with one ValueError line naming the file, the line and the problem, in every loader.

Each case damages one file of a small sample dataset (``write_sample``) and loads it with ``load_dataset``:
corrupt or truncated gzip, bytes that are not UTF-8, missing columns and fields, non-numeric ids and times,
empty files. A UTF-8 byte-order mark and CRLF line endings are legal: they load exactly like the clean file.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import zlib
from pathlib import Path

import pytest
import torch

from din_ext.data import load_dataset
from din_ext.data.readers import iter_lines, open_text, read_columns
from din_ext.data.samples import write_sample

FILES = {"amazon": ("reviews_Electronics_5.json", "meta_Electronics.json"),
         "taobao": ("raw_sample.csv", "behavior_log.csv", "ad_feature.csv", "user_profile.csv"),
         "recbole": ("recbole.inter", "recbole.user", "recbole.item")}
TARGETS = [pytest.param(loader, name, id=name) for loader, names in FILES.items() for name in names]
TABLES = [p for p in TARGETS if p.values[0] != "amazon"]
COMPRESS = pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
BOM = b"\xef\xbb\xbf"


def sample(root: Path, loader: str) -> Path:
    """A small sample dataset of ``loader`` in ``root / loader`` (RecBole names its files after that folder)."""
    return write_sample(loader, root / loader, seed=5, users=20)


def gzip_in_place(path: Path) -> bytes:
    """Replace ``path`` by its gzip'd bytes under the same name (the readers go by the magic number)."""
    packed = gzip.compress(path.read_bytes(), mtime=0)
    path.write_bytes(packed)
    return packed


def damaged(root: Path, loader: str, name: str, change) -> tuple[Path, bytes]:
    """A sample of ``loader`` whose file ``name`` holds ``change(its bytes)``: (its directory, the clean bytes)."""
    directory = sample(root, loader)
    clean = (directory / name).read_bytes()
    (directory / name).write_bytes(change(clean))
    return directory, clean


def edit_line(path: Path, number: int, edit) -> None:
    """Apply ``edit`` (bytes -> bytes) to line ``number`` (1-based) of ``path``."""
    lines = path.read_bytes().split(b"\n")
    edited = edit(lines[number - 1])
    assert edited != lines[number - 1], "the edit changed nothing"
    lines[number - 1] = edited
    path.write_bytes(b"\n".join(lines))


def regex_edit(pattern: str, replacement: str):
    """An ``edit_line`` edit replacing the first match of ``pattern``."""
    return lambda line: re.sub(pattern.encode(), replacement.encode(), line, count=1)


def field_edit(path: Path, column: str, value):
    """An ``edit_line`` edit setting ``column`` of a delimited file (None: dropping the row's last field)."""
    delimiter = b"\t" if path.suffix in (".inter", ".user", ".item") else b","
    header = [t.strip().split(b":")[0].decode() for t in path.read_bytes().split(b"\n", 1)[0].split(delimiter)]

    def edit(line: bytes) -> bytes:
        fields = line.split(delimiter)
        if value is None:
            return delimiter.join(fields[:-1])
        fields[header.index(column)] = value.encode()
        return delimiter.join(fields)
    return edit


def load_error(loader: str, directory: Path, pattern: str) -> None:
    """Loading raises a ValueError whose message matches ``pattern`` and is one line."""
    with pytest.raises(ValueError, match=pattern) as info:
        load_dataset(loader, directory)
    assert "\n" not in str(info.value)


def assert_same(actual, expected, where: str = "result") -> None:
    """Equal (train, test, schema): every tensor by ``torch.equal``, everything else by ``==``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), f"{where}.{f.name}")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


# ------------------------------------------------------------------------------------------ legal variants


@COMPRESS
@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf"])
@pytest.mark.parametrize("loader,name", TARGETS)
def test_bom_and_crlf_load_like_the_clean_file(tmp_path, loader, name, variant, compress):
    clean = load_dataset(loader, sample(tmp_path / "clean", loader))
    directory = sample(tmp_path / "edited", loader)
    path = directory / name
    data = path.read_bytes()
    if "crlf" in variant:
        data = data.replace(b"\n", b"\r\n")
    if "bom" in variant:
        data = BOM + data
    path.write_bytes(data)
    if compress:
        gzip_in_place(path)
    assert_same(load_dataset(loader, directory), clean)


# ------------------------------------------------------------------------------------------------ encoding


@COMPRESS
@pytest.mark.parametrize("where", ["line 3", "second to last line"])
@pytest.mark.parametrize("loader,name", TARGETS)
def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path, loader, name, where, compress):
    directory = sample(tmp_path, loader)
    path = directory / name
    lines = path.read_bytes().split(b"\n")
    number = 3 if where == "line 3" else len(lines) - 2  # late: past the text layer's first decoded chunk
    edit_line(path, number, lambda line: line[:4] + b"\xff" + line[4:])
    offset = sum(len(line) + 1 for line in lines[:number - 1]) + 4
    of = " of the decompressed data" if compress else ""
    if compress:
        gzip_in_place(path)
    load_error(loader, directory, rf"{re.escape(name)}, line {number}: not UTF-8 text: byte 0xff at offset "
                                  rf"{offset}{of} \(invalid start byte\)$")


@pytest.mark.parametrize("loader,name", TARGETS)
def test_an_incomplete_utf8_sequence_at_the_end_names_the_last_line(tmp_path, loader, name):
    # the first two bytes of the euro sign, then the file ends
    directory, data = damaged(tmp_path, loader, name, lambda clean: clean + b"\xe2\x82")
    last = data.count(b"\n") + 1
    load_error(loader, directory, rf"{re.escape(name)}, line {last}: not UTF-8 text: byte 0xe2 "
                                  rf"at offset {len(data)} \(unexpected end of data\)")


def test_every_way_of_reading_a_text_file_names_the_line_of_a_bad_byte(tmp_path):
    # the reader layer itself, as a loader added later would use it; the bad byte sits in the second gzip member,
    # after zero padding (both legal in gzip), far past the first block the text layer decodes
    first = "".join(f"{i},caf\u00e9\n" for i in range(5000)).encode()
    second = "".join(f"{i},\u20ac\n" for i in range(5000, 9000)).encode().replace(b"8000,", b"8000,\xc3(", 1)
    path = tmp_path / "two_members.csv"
    path.write_bytes(gzip.compress(b"a,b\n" + first) + bytes(64) + gzip.compress(second))
    offset = 4 + len(first) + second.index(b"\xc3(")
    message = rf"two_members\.csv, line 8002: not UTF-8 text: byte 0xc3 at offset {offset} of the decompressed data"
    for read in (lambda f: f.read(), lambda f: f.readlines(), lambda f: [f.readline() for _ in range(9001)], list):
        with open_text(path) as f, pytest.raises(ValueError, match=message):
            read(f)
    with pytest.raises(ValueError, match=message):
        list(iter_lines(path))
    with pytest.raises(ValueError, match=message):
        read_columns(path, {"a": "int", "b": "str"}, chunk_bytes=4096)
    path.write_bytes(gzip.compress(BOM + b"a,b\r\n" + first.replace(b"\n", b"\r\n")) + bytes(64)
                     + gzip.compress(second.replace(b"\xc3(", b"")))
    table = read_columns(path, {"a": "int", "b": "str"})
    assert table["a"].tolist() == list(range(9000)) and table["b"][0] == "caf\u00e9" and table["b"][-1] == "\u20ac"


# -------------------------------------------------------------------------------------------------- gzip


@pytest.mark.parametrize("loader,name", TARGETS)
def test_a_corrupt_gzip_block_names_the_line_and_both_offsets(tmp_path, loader, name):
    def split(clean: bytes):
        """(gzip of ``clean`` with a bad block from its middle line on, that line, its first compressed byte)."""
        lines = clean.splitlines(keepends=True)
        number = len(lines) // 2 + 1
        deflate = zlib.compressobj(wbits=31)
        first = deflate.compress(b"".join(lines[:number - 1])) + deflate.flush(zlib.Z_FULL_FLUSH)  # ends on a byte
        packed = bytearray(first + deflate.compress(b"".join(lines[number - 1:])) + deflate.flush())
        packed[len(first)] = 0xff  # block type 3 does not exist
        return bytes(packed), number, len(first)

    directory, data = damaged(tmp_path, loader, name, lambda clean: split(clean)[0])
    _, number, at = split(data)
    head = len(b"".join(data.splitlines(keepends=True)[:number - 1]))
    load_error(loader, directory, rf"{re.escape(name)}, line {number}: corrupt gzip data at compressed byte "
                                  rf"{at} \(decompressed byte {head}\): .*invalid block type")


@pytest.mark.parametrize("loader,name", TARGETS)
def test_a_gzip_crc_mismatch_is_a_value_error(tmp_path, loader, name):
    def bad_crc(clean: bytes) -> bytes:
        packed = bytearray(gzip.compress(clean, mtime=0))
        packed[-8] ^= 0xff  # the trailer's CRC-32 of the data, checked once its 4th byte is read
        return bytes(packed)

    directory, data = damaged(tmp_path, loader, name, bad_crc)
    last, crc_end = data.count(b"\n") + 1, len(bad_crc(data)) - 5
    load_error(loader, directory, rf"{re.escape(name)}, line {last}: corrupt gzip data at compressed byte {crc_end} "
                                  rf"\(decompressed byte {len(data)}\): .*incorrect data check; the damage is "
                                  "somewhere before$")


@pytest.mark.parametrize("cut", ["in the header", "two thirds in"])
@pytest.mark.parametrize("loader,name", TARGETS)
def test_a_truncated_gzip_names_the_line_where_the_data_ends(tmp_path, loader, name, cut):
    def truncate(clean: bytes) -> bytes:
        packed = gzip.compress(clean, mtime=0)
        return packed[:6] if cut == "in the header" else packed[:len(packed) * 2 // 3]

    directory, data = damaged(tmp_path, loader, name, truncate)
    kept = truncate(data)
    text = zlib.decompressobj(wbits=31).decompress(kept)  # what survives the cut
    line = text.count(b"\n") + 1
    load_error(loader, directory, rf"{re.escape(name)}, line {line}: the gzip data ends early, at "
                                  rf"compressed byte {len(kept)} \(decompressed byte {len(text)}\); "
                                  r"is the file truncated\?")


# ------------------------------------------------------------------------------------------------ content


@COMPRESS
@pytest.mark.parametrize("loader,name", TARGETS)
def test_an_empty_file_names_line_1(tmp_path, loader, name, compress):
    directory, _ = damaged(tmp_path, loader, name, lambda clean: gzip.compress(b"") if compress else b"")
    load_error(loader, directory, rf"{re.escape(name)}, line 1: .*empty")


@pytest.mark.parametrize("loader,name,text,line", [
    ("amazon", "reviews_Electronics_5.json", b"\n \n", 1),
    ("amazon", "meta_Electronics.json", b"\n", 1),
    ("taobao", "raw_sample.csv", b"user,time_stamp,adgroup_id,pid,nonclk,clk\n", 2),
    ("recbole", "recbole.inter", b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n", 2)],
    ids=["reviews-blank", "meta-blank", "raw_sample-header", "inter-header"])
def test_a_file_without_records_names_the_line_after_the_header(tmp_path, loader, name, text, line):
    directory, _ = damaged(tmp_path, loader, name, lambda clean: text)
    load_error(loader, directory, rf"{re.escape(name)}, line {line}: no ")


RENAMED = {"raw_sample.csv": ("clk", r"header .* lacks the column\(s\) \['clk'\]"),
           "behavior_log.csv": ("time_stamp", r"header .* lacks the column\(s\) \['time_stamp'\]"),
           "ad_feature.csv": ("adgroup_id", r"header .* lacks the column\(s\) \['adgroup_id'\]"),
           "user_profile.csv": ("age_level", r"header .* lacks the column\(s\) \['age_level'\]"),
           "recbole.inter": ("item_id", "header lacks the column 'item_id'"),
           "recbole.user": ("user_id", "header lacks the id column 'user_id'"),
           "recbole.item": ("item_id", "header lacks the id column 'item_id'")}


@pytest.mark.parametrize("loader,name", TABLES)
def test_a_header_without_a_needed_column_names_line_1(tmp_path, loader, name):
    directory = sample(tmp_path, loader)
    column, message = RENAMED[name]
    edit_line(directory / name, 1, regex_edit(rf"\b{column}\b", column.upper()))
    load_error(loader, directory, rf"{re.escape(name)}, line 1: {message}")


@pytest.mark.parametrize("loader,name", TABLES)
def test_a_row_missing_a_column_names_its_line(tmp_path, loader, name):
    directory = sample(tmp_path, loader)
    path = directory / name
    width = path.read_bytes().split(b"\n", 1)[0].count(b"\t" if loader == "recbole" else b",") + 1
    edit_line(path, 3, field_edit(path, None, None))
    load_error(loader, directory, rf"{re.escape(name)}, line 3: expected {width} columns, found {width - 1}")


AMAZON_FIELDS = [  # (file, field edit on line 3, what the error says)
    ("reviews_Electronics_5.json", r', "unixReviewTime": \d+', "", "missing field 'unixReviewTime'"),
    ("reviews_Electronics_5.json", r'"reviewerID": "\w+", ', "", "missing field 'reviewerID'"),
    ("meta_Electronics.json", r"'asin': '\w+', ", "", "missing field 'asin'"),
    ("reviews_Electronics_5.json", r'"unixReviewTime": \d+', '"unixReviewTime": "soon"',
     "unixReviewTime 'soon' is not an integer"),
    ("reviews_Electronics_5.json", r'"unixReviewTime": \d+', '"unixReviewTime": null',
     "unixReviewTime None is not an integer"),
    ("reviews_Electronics_5.json", r'"reviewerID": "\w+"', '"reviewerID": null', "reviewerID None is not a string"),
    ("reviews_Electronics_5.json", r'"asin": "\w+"', '"asin": ["B1"]', r"asin \['B1'\] is not a string"),
    ("meta_Electronics.json", r"'asin': '\w+'", "'asin': None", "asin None is not a string")]


@pytest.mark.parametrize("name,pattern,replacement,message", AMAZON_FIELDS,
                         ids=["reviews-no-time", "reviews-no-reviewer", "meta-no-asin", "reviews-time-text",
                              "reviews-time-null", "reviews-reviewer-null", "reviews-asin-list", "meta-asin-none"])
def test_an_amazon_record_missing_a_field_or_with_a_wrong_type_names_its_line(tmp_path, name, pattern, replacement,
                                                                              message):
    directory = sample(tmp_path, "amazon")
    edit_line(directory / name, 3, regex_edit(pattern, replacement))
    load_error("amazon", directory, rf"{re.escape(name)}, line 3: {message}")


NON_NUMERIC = [
    ("taobao", "raw_sample.csv", "user", "u1", "an integer"),
    ("taobao", "raw_sample.csv", "time_stamp", "soon", "an integer"),
    ("taobao", "raw_sample.csv", "adgroup_id", "ad7", "an integer"),
    ("taobao", "behavior_log.csv", "user", "u1", "an integer"),
    ("taobao", "behavior_log.csv", "time_stamp", "soon", "an integer"),
    ("taobao", "behavior_log.csv", "cate", "c5", "an integer"),
    ("taobao", "ad_feature.csv", "adgroup_id", "ad7", "an integer"),
    ("taobao", "ad_feature.csv", "cate_id", "c5", "an integer"),
    ("taobao", "ad_feature.csv", "price", "cheap", "a number"),
    ("taobao", "user_profile.csv", "userid", "u1", "an integer"),
    ("taobao", "user_profile.csv", "age_level", "old", "an integer"),
    ("recbole", "recbole.inter", "timestamp", "soon", "a number"),
    ("recbole", "recbole.inter", "rating", "five", "a number"),
    ("recbole", "recbole.user", "age", "old", "a number")]


@pytest.mark.parametrize("loader,name,column,value,what", NON_NUMERIC,
                         ids=[f"{name}-{column}" for _, name, column, _, _ in NON_NUMERIC])
def test_a_non_numeric_id_time_or_value_names_its_line(tmp_path, loader, name, column, value, what):
    directory = sample(tmp_path, loader)
    path = directory / name
    edit_line(path, 3, field_edit(path, column, value))
    load_error(loader, directory, rf"{re.escape(name)}, line 3: column '{column}': cannot parse '{value}' as {what}")
