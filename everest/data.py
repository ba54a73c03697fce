"""SHARP tables -> validated columns -> ``(N, T, F)`` sample arrays.

The only data path: real files and the synthetic generator's files go through the same reader.
Files are read by column name and validated once, here; every error names the file, the line (as a text
editor numbers it) or column, the cell as written and what was expected. A vectorised scan of the bytes
checks encoding, quoting and the field count of every line before pandas parses the columns. Sample
windows are built with array operations (no loop over rows), cached per file content + data
configuration, split by active region (or time) for validation, scaled with statistics of the training
split only, and (M/M5) positives duplicated with noise.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from everest.config import DataConfig, Target
from everest.errors import DataError
from everest.io import write_npz

log = logging.getLogger(__name__)

LABEL_COLUMN = "Flare"
TIME_COLUMN = "DATE__OBS"
REGION_COLUMN = "NOAA_AR"
LABELS = {"N": 0, "P": 1, "padding": -1}
# Largest magnitude accepted: samples are float32 (max 3.4e38); real SHARP values stay below ~1e25.
MAX_ABS_VALUE = 1e37
# Largest NOAA_AR accepted: NOAA numbers have 5 digits; the bound keeps the int64 conversion exact.
MAX_REGION = 999_999_999
# Bump when sample formation changes, so stale caches are rebuilt.
BUILDER_VERSION = "1"
# Fewest positive samples a validation split may hold. The threshold is the one of highest validation TSS,
# whose recall term moves in steps of 1 / positives: below 10 positives one sample moves TSS by more than
# 0.1, as much as the seed-to-seed spread of the rarest targets, so the chosen threshold would be noise.
MIN_VALIDATION_POSITIVES = 10


@dataclass(frozen=True)
class SampleSet:
    """Samples of one file: windows of ``seq_len`` rows of one region, oldest first, current row last."""

    x: np.ndarray  # (N, T, F) float32 feature windows; zeros at front padding and `padding` rows
    valid: np.ndarray  # (N, T) bool, True where the step is a real (non-padding) record
    y: np.ndarray  # (N,) int8 labels 0/1 of the current row
    region: np.ndarray  # (N,) int64 NOAA_AR of the current row
    row: np.ndarray  # (N,) int64 0-based data-row index of the current row in its file
    time: np.ndarray  # (N,) datetime64[s] record time of the current row

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> SampleSet:
        """Samples selected by a boolean mask or integer index."""
        return SampleSet(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def n_positive(self) -> int:
        return int(self.y.sum())


_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime) -> digest, for this process


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content (streamed), for caching and provenance.

    Remembered per process while the file's inode, size and modification time stay the same, so the
    five seeds of a target, its baselines and the flow's planning hash each table once per process.
    Every process that reads a table hashes it itself: a result's identity names the bytes it read.
    """
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def data_file(data_dir: Path, target: Target, split: str) -> Path:
    """Path of ``training_data_{cls}_{h}.csv`` / ``testing_data_...`` for ``split`` in train|test."""
    prefix = {"train": "training", "test": "testing"}[split]
    return Path(data_dir) / f"{prefix}_data_{target.file_suffix}.csv"


# What a file saved under a .csv name may really be, told by its first bytes.
_SIGNATURES = {
    b"\x1f\x8b": "the file is gzip-compressed: decompress it first (gunzip)",
    b"PK\x03\x04": "the file is a ZIP archive or an Excel .xlsx workbook: export the table as CSV",
    b"\xd0\xcf\x11\xe0": "the file is an Excel .xls workbook: export the table as CSV",
    b"PAR1": "the file is in Parquet format: convert it to CSV",
    b"\x89HDF": "the file is in HDF5 format: convert it to CSV",
    b"\xff\xfe": "the file is UTF-16 text: save it as UTF-8 (Excel: 'CSV UTF-8')",
    b"\xfe\xff": "the file is UTF-16 text: save it as UTF-8 (Excel: 'CSV UTF-8')",
    b"version https://git-lfs.github.com/spec/": "the file is a Git LFS pointer, not the data: run `git lfs pull`",
}
_TEXT_TABLE = "expected a comma-separated text table (UTF-8 or ASCII)"
_CHUNK = 1 << 20  # bytes per step of the structure scan
_COMMA, _QUOTE, _LF, _CR = b',"\n\r'
_FIELD_EDGE = np.isin(np.arange(256), list(b',"\n\r'))  # by byte: may precede an opening / follow a closing quote
_VISIBLE = ~np.isin(np.arange(256), list(b" \t\n\r"))  # by byte: makes a line non-blank


def _require_file(path: Path) -> None:
    """Raise a DataError unless ``path`` is a regular file."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a SHARP table (a CSV file such as training_data_M_24.csv)")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "data file not found"
        raise DataError(f"{path}: {what} (expected a SHARP table such as training_data_M_24.csv)")


def _check_signature(path: Path) -> None:
    """Refuse compressed, binary, UTF-16, Git LFS and HTML files by their first bytes, naming what they are."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    what = next((w for magic, w in _SIGNATURES.items() if head.startswith(magic)), None)
    if what is None and head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        what = "the file is an HTML page (a web page saved in place of the data?)"
    if what:
        raise DataError(f"{path}: {what}; {_TEXT_TABLE}")


@dataclass(frozen=True)
class _Layout:
    """The records of a CSV file, header first; blank lines (only spaces, tabs, line breaks) are no records."""

    start: np.ndarray  # (R,) byte offset of each record
    end: np.ndarray  # (R,) byte offset of its closing line break (the file size for an unterminated last line)
    line: np.ndarray  # (R,) 1-based line where it starts, as a text editor numbers lines
    fields: np.ndarray  # (R,) number of comma-separated fields


def _scan(path: Path, strict: bool = False) -> _Layout:
    """Records and field counts of a CSV file, in one vectorised pass over its bytes.

    Quoting as RFC 4180 (a quoted field may hold commas and line breaks); a line ends at LF, CRLF or a lone
    CR, as pandas reads it. NUL bytes, invalid UTF-8 and unterminated quotes raise DataError; with ``strict``
    (slower: for error paths) so do quotes inside a field, which pandas keeps as text but that throw the
    field count of this scan off.
    """
    ends, fields, nonblank, lines = [], [], [], []  # per chunk, one entry per record ending in it
    n_records = n_lines = n_quoted = 0  # so far: records, line breaks, line breaks inside quotes
    carry_sep, carry_mark, quoted_at_end = 0, False, 0  # the unfinished record; quoted breaks before it
    in_quote, quote_line, offset, last = False, 0, 0, _LF
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            while chunk.endswith((b"\r", b'"')) and (more := fh.read(1)):
                chunk += more  # the byte after a CR or a quote tells what it does
            a = np.frombuffer(chunk, np.uint8)
            brk = a == _LF
            if b"\r" in chunk:
                brk |= (a == _CR) & np.r_[a[1:] != _LF, True]
            if (i := chunk.find(b"\0")) >= 0:
                raise DataError(f"{path}: NUL bytes (binary data) at line {_line_in(brk, i, n_lines)}; {_TEXT_TABLE}")
            if utf8.getstate()[0] or not chunk.isascii():
                pending = len(utf8.getstate()[0])
                try:
                    utf8.decode(chunk)
                except UnicodeDecodeError as err:
                    line = _line_in(brk, max(err.start - pending, 0), n_lines)
                    raise DataError(f"{path}: not UTF-8: byte 0x{err.object[err.start]:02x} at line {line} "
                                    f"(a Latin-1 or Windows-1252 export?); {_TEXT_TABLE}") from None
            sep = a == _COMMA
            quoted = np.zeros(0, np.int64)
            if in_quote or b'"' in chunk:
                bom = offset == 0 and chunk.startswith(codecs.BOM_UTF8)
                inside, opened, stray = _quotes(a, in_quote, last, bom, strict)
                if stray >= 0:
                    raise DataError(f"{path}: a stray '\"' at line {_line_in(brk, stray, n_lines)}: a quote may only "
                                    'enclose a whole field (write a quote within a quoted field as "")')
                if opened >= 0:
                    quote_line = _line_in(brk, opened, n_lines)
                in_quote = bool(inside[-1])
                quoted = np.flatnonzero(brk & inside)
                sep &= ~inside
                rec = np.flatnonzero(brk & ~inside)
            else:
                rec = np.flatnonzero(brk)
            seps = np.flatnonzero(sep)
            if rec.size:
                n_sep = np.diff(np.searchsorted(seps, rec), prepend=0)
                n_sep[0] += carry_sep
                marked = n_sep > 0
                if not marked.all():  # records without a comma: blank unless some byte is visible
                    marked |= np.logical_or.reduceat(_VISIBLE[a[: rec[-1] + 1]], np.r_[0, rec[:-1] + 1])
                    marked[0] |= carry_mark
                q_end = np.searchsorted(quoted, rec) + n_quoted
                lines.append(np.arange(n_records, n_records + rec.size) + np.r_[quoted_at_end, q_end[:-1]] + 1)
                ends.append(rec + offset)
                fields.append(n_sep + 1)
                nonblank.append(marked)
                n_records += rec.size
                quoted_at_end = int(q_end[-1])
                carry_sep = int(seps.size - np.searchsorted(seps, rec[-1]))
                carry_mark = carry_sep > 0 or bool(_VISIBLE[a[rec[-1] + 1:]].any())
            else:
                carry_sep += seps.size
                carry_mark = carry_mark or carry_sep > 0 or bool(_VISIBLE[a].any())
            n_lines += int(np.count_nonzero(brk))
            last = int(a[-1])
            n_quoted += quoted.size
            offset += len(chunk)
    if in_quote:
        _check_quotes(path, strict)  # names the line of the opening quote
        raise DataError(f"{path}: the quoted field opened at line {quote_line} is never closed (a stray '\"'?); "
                        "expected every quoted field to end with a quote")
    try:
        utf8.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8: the file ends inside a multi-byte character; {_TEXT_TABLE}") from None
    if carry_mark:  # a last line without a line break
        lines.append([n_records + quoted_at_end + 1])
        ends.append([offset])
        fields.append([carry_sep + 1])
        nonblank.append([True])
    end, keep = _cat(ends, np.int64), _cat(nonblank, bool)
    start = np.r_[0, end[:-1] + 1]
    return _Layout(start[keep], end[keep], _cat(lines, np.int64)[keep], _cat(fields, np.int64)[keep])


def _quotes(a: np.ndarray, in_quote: bool, before: int, bom: bool, strict: bool) -> tuple[np.ndarray, int, int]:
    """Quoting of one chunk: which bytes lie within a quoted field; with ``strict`` also the last quote that
    opens a field and the first that does not sit at a field's edge (-1: none). ``before`` is the previous byte."""
    q = a == _QUOTE
    inside = np.bitwise_xor.accumulate(q) ^ in_quote  # after each byte
    if not strict:
        return inside, -1, -1
    # An opening quote follows a comma, a line break or (for "") a quote; a closing quote precedes one of those.
    at = np.flatnonzero(q)
    opening = inside[at]
    prev, nxt = a[at - 1], a[np.minimum(at + 1, a.size - 1)]  # a chunk never ends in a quote but at the file's end
    prev[at == 0] = before
    ok = np.where(opening, _FIELD_EDGE[prev] | (bom & (at == 3)), _FIELD_EDGE[nxt])  # after a byte-order mark: ok
    opens = at[opening]
    return inside, int(opens[-1]) if opens.size else -1, int(at[np.argmin(ok)]) if not ok.all() else -1


def _check_quotes(path: Path, strict: bool = False) -> None:
    """On a structure error: raise the more precise DataError for a stray quote, if the file has one."""
    if not strict:
        _scan(path, strict=True)


def _cat(parts: list, dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


def _line_in(brk: np.ndarray, i: int, lines_before: int) -> int:
    """1-based line of byte ``i`` of a chunk whose line breaks are ``brk``, after ``lines_before`` earlier lines."""
    return lines_before + int(np.count_nonzero(brk[:i])) + 1


def _split(raw: bytes) -> list[str]:
    """Fields of one record's bytes, quotes removed as RFC 4180 says (slow: for headers and messages)."""
    raw = raw.removesuffix(b"\r")
    a = np.frombuffer(raw, np.uint8)
    cuts = np.flatnonzero((a == _COMMA) & ~np.bitwise_xor.accumulate(a == _QUOTE)).tolist()
    out = []
    for lo, hi in zip([-1, *cuts], [*cuts, len(raw)], strict=True):
        field = raw[lo + 1:hi]
        if len(field) >= 2 and field[:1] == field[-1:] == b'"':
            field = field[1:-1].replace(b'""', b'"')
        out.append(field.decode("utf-8", "replace"))
    return out


def _record(path: Path, layout: _Layout, index: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(int(layout.start[index]))
        return fh.read(int(layout.end[index] - layout.start[index]))


def _show(text: str) -> str:
    """A cell's text for a message: quoted as written, shortened when huge."""
    if text == "":
        return "'' (an empty cell)"
    return repr(text) if len(text) <= 40 else f"{text[:30]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class _Source:
    """A CSV file being read: its layout and header, to name lines and quote cells in error messages."""

    path: Path
    layout: _Layout
    header: list[str]

    def record(self, index: int) -> bytes:
        """Bytes of record ``index`` (0: the header), without its line break."""
        return _record(self.path, self.layout, index)

    def line(self, row: int) -> int:
        """Line of data row ``row`` (0-based) as a text editor numbers it."""
        return int(self.layout.line[row + 1])

    def where(self, mask: np.ndarray) -> str:
        first = int(np.flatnonzero(mask)[0])
        return f"line {self.line(first)} ({int(mask.sum())} such row(s) in all)"

    def cell(self, row: int, column: str) -> str:
        """Text of data row ``row`` in ``column`` exactly as written."""
        return _split(self.record(row + 1))[self.header.index(column)]


def _resolve_columns(path: Path, header: list[str], cfg: DataConfig) -> dict[str, str]:
    """Map each configured feature to the column that holds it (honouring aliases such as TOTBSQ)."""
    missing_base = [c for c in (LABEL_COLUMN, TIME_COLUMN, REGION_COLUMN) if c not in header]
    found: dict[str, str] = {}
    missing: list[str] = []
    for feat in cfg.features:
        names = [feat] + [alias for alias, canon in cfg.feature_aliases.items() if canon == feat]
        hit = next((n for n in names if n in header), None)
        if hit is None:
            missing.append(feat if len(names) == 1 else f"{feat} (or {' / '.join(names[1:])})")
        else:
            found[feat] = hit
    if missing_base or missing:
        shown = [h if len(h) <= 40 else h[:37] + "..." for h in header[:40]]
        more = f" and {len(header) - 40} more" if len(header) > 40 else ""
        raise DataError(f"{path}: missing required column(s) {missing_base + missing}; "
                        f"the file has columns {shown}{more}")
    return found


def _read_header(path: Path, layout: _Layout, cfg: DataConfig) -> tuple[_Source, dict[str, str]]:
    """Parse and check the header; the file's structure (one field per column on every line) is checked too."""
    if len(layout.fields) == 0:
        raise DataError(f"{path}: file is empty (expected a CSV header and data rows)")
    header = [h.strip() for h in _split(_record(path, layout, 0).removeprefix(codecs.BOM_UTF8))]
    src = _Source(path, layout, header)
    if len(header) == 1 and (delim := next((d for d in ";\t|" if d in header[0]), None)):
        raise DataError(f"{path}: fields are separated by {delim!r} (line {layout.line[0]}); "
                        "expected commas (a comma-separated .csv file)")
    columns = _resolve_columns(path, header, cfg)
    for name in dict.fromkeys([LABEL_COLUMN, TIME_COLUMN, REGION_COLUMN, *columns.values()]):
        if header.count(name) > 1:
            at = [i + 1 for i, h in enumerate(header) if h == name]
            raise DataError(f"{path}: column {name!r} appears {len(at)} times in the header (columns {at}); "
                            "expected each column once")
    ragged = layout.fields[1:] != len(header)
    if ragged.any():
        _check_quotes(path)
        row = int(np.flatnonzero(ragged)[0])
        hint = "; a quoted field may run past its line (check its '\"')" if b'"' in src.record(row + 1) else ""
        raise DataError(f"{path}: line {src.line(row)} has {layout.fields[row + 1]} field(s) but the header "
                        f"(line {layout.line[0]}) has {len(header)}; expected {len(header)} comma-separated fields "
                        f"on every line ({int(ragged.sum())} such line(s) in all){hint}")
    if len(layout.fields) == 1:
        raise DataError(f"{path}: no data rows (only a header)")
    return src, columns


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """Read and validate one SHARP table by column name.

    Returns columns ``label`` (int8: 1 P, 0 N, -1 padding), ``time``, ``region`` and the configured
    features (float64, in configuration order). Raises :class:`DataError` for every malformed input.
    Tolerated: a UTF-8 byte-order mark, CRLF or CR line ends, blank lines, spaces around column names,
    quoted cells, extra columns, times with a UTC offset (converted to UTC).
    """
    path = Path(path)
    _require_file(path)
    _check_signature(path)
    src, columns = _read_header(path, _scan(path), cfg)
    header = src.header
    used = list(dict.fromkeys([LABEL_COLUMN, TIME_COLUMN, REGION_COLUMN, *columns.values()]))
    names = [f"_{i}" for i in range(len(header))]  # positional: header names may repeat or need stripping
    col = {name: names[header.index(name)] for name in used}
    try:
        df = pd.read_csv(path, header=0, names=names, usecols=[col[n] for n in used], encoding="utf-8",
                         dtype={col[LABEL_COLUMN]: str, col[TIME_COLUMN]: str}, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:  # the scan should have caught these
        _check_quotes(path)
        raise DataError(f"{path}: cannot be parsed as CSV ({' '.join(str(err).split())}); {_TEXT_TABLE}") from None
    if len(df) != len(src.layout.fields) - 1:
        _check_quotes(path)
        raise DataError(f"{path}: {len(df)} rows parsed but {len(src.layout.fields) - 1} lines of data found "
                        "(stray quotes or control characters?); " + _TEXT_TABLE)

    labels = df[col[LABEL_COLUMN]].str.strip()
    unknown = ~labels.isin(list(LABELS)).to_numpy()
    if unknown.any():
        raw = src.cell(int(np.flatnonzero(unknown)[0]), LABEL_COLUMN)
        hint = " (a repeated header line: files joined with cat?)" if raw.strip() == LABEL_COLUMN else ""
        raise DataError(f"{path}: column {LABEL_COLUMN!r} has unknown label {_show(raw)} at {src.where(unknown)}"
                        f"{hint}; expected one of {list(LABELS)}")
    label = labels.map(LABELS).to_numpy(np.int8)

    out = {"label": label}
    region = pd.to_numeric(df[col[REGION_COLUMN]], errors="coerce").to_numpy(np.float64)
    bad_region = ~((region >= 0) & (region <= MAX_REGION) & (region == np.round(region)))
    if bad_region.any():
        raw = src.cell(int(np.flatnonzero(bad_region)[0]), REGION_COLUMN)
        raise DataError(f"{path}: column {REGION_COLUMN!r} holds {_show(raw)} at {src.where(bad_region)}; "
                        f"expected a NOAA active-region number (a whole number from 0 to {MAX_REGION})")
    out["region"] = region.astype(np.int64)

    time = pd.to_datetime(df[col[TIME_COLUMN]], errors="coerce", format="ISO8601", utc=True)
    bad_time = (time.isna() & (label != LABELS["padding"])).to_numpy()
    if bad_time.any():
        raw = src.cell(int(np.flatnonzero(bad_time)[0]), TIME_COLUMN)
        raise DataError(f"{path}: column {TIME_COLUMN!r} holds {_show(raw)} at {src.where(bad_time)}; "
                        "expected an ISO 8601 time such as 2010-05-04T23:12:00 (UTC unless an offset is given)")
    out["time"] = time.dt.tz_localize(None).to_numpy("datetime64[s]")

    for feat, name in columns.items():
        values = pd.to_numeric(df[col[name]], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        huge = np.abs(values) > MAX_ABS_VALUE  # inf included
        if bad.any():
            raw = src.cell(first := int(np.flatnonzero(bad)[0]), name)
            if not huge[first] or "inf" in raw.lower():  # else a number written too large to hold, like 1e400
                hint = " (write numbers with a '.' decimal point and no thousands separators)" if "," in raw else ""
                raise DataError(f"{path}: column {name!r} must hold finite numbers; found {_show(raw)} at "
                                f"{src.where(bad)}{hint}")
        if huge.any():
            raw = src.cell(int(np.flatnonzero(huge)[0]), name)
            raise DataError(f"{path}: column {name!r} holds {_show(raw)} at {src.where(huge)}: beyond "
                            f"{MAX_ABS_VALUE:.0e}, the float32 range samples are stored in (a unit or parsing error?)")
        out[feat] = values
    table = pd.DataFrame(out)
    _check_regions(src, table)
    return table


def _check_regions(src: _Source, table: pd.DataFrame) -> None:
    """Rows of one region must be contiguous and strictly increasing in time."""
    path = src.path
    region = table["region"].to_numpy()
    new_run = np.r_[True, region[1:] != region[:-1]]
    run_regions = region[new_run]
    uniq, counts = np.unique(run_regions, return_counts=True)
    if (counts > 1).any():
        ar = int(uniq[counts > 1][0])
        lines = [src.line(r) for r in np.flatnonzero(new_run & (region == ar))[:2]]
        raise DataError(f"{path}: rows of region {REGION_COLUMN}={ar} are not contiguous "
                        f"(separate runs start at lines {lines}); expected one time-ordered run per region")
    t = table["time"].to_numpy().astype("datetime64[s]").astype(np.int64)
    known = table["time"].notna().to_numpy()
    # Compare each dated row with the previous dated row of the same region.
    idx = np.flatnonzero(known)
    same = region[idx[1:]] == region[idx[:-1]]
    back = same & (t[idx[1:]] <= t[idx[:-1]])
    if back.any():
        k = int(np.flatnonzero(back)[0])
        r, prev = int(idx[k + 1]), int(idx[k])
        raise DataError(f"{path}: region {REGION_COLUMN}={int(region[r])} is out of time order at line {src.line(r)}: "
                        f"{_show(src.cell(r, TIME_COLUMN))} does not follow {_show(src.cell(prev, TIME_COLUMN))} "
                        f"(line {src.line(prev)}; rows of a region must be strictly increasing in {TIME_COLUMN})")


def build_samples(table: pd.DataFrame, features: tuple[str, ...], seq_len: int, zero_filter: bool) -> SampleSet:
    """One sample per non-padding row: it and up to ``seq_len - 1`` earlier rows of the same region.

    Windows are front-padded with zero steps; ``padding`` rows serve as history only. With
    ``zero_filter`` (the reference's C-class rule) a sample is dropped when any feature of its
    *current* row is exactly 0.
    """
    label = table["label"].to_numpy()
    region = table["region"].to_numpy()
    feats = table[list(features)].to_numpy(np.float32)  # (R, F)
    n_rows = len(table)
    run_start = np.maximum.accumulate(np.where(np.r_[True, region[1:] != region[:-1]], np.arange(n_rows), 0))
    pos = np.arange(n_rows) - run_start  # position of each row within its region's run

    keep = label != LABELS["padding"]
    if zero_filter:
        keep &= ~(feats == 0).any(axis=1)
    rows = np.flatnonzero(keep)
    back = np.arange(seq_len - 1, -1, -1)  # (T,) steps back from the current row, oldest first
    src = rows[:, None] - back[None, :]  # (N, T) source row of each step
    in_region = back[None, :] <= pos[rows][:, None]  # (N, T)
    src = np.where(in_region, src, 0)
    valid = in_region & (label[src] != LABELS["padding"])  # (N, T)
    x = feats[src] * valid[:, :, None]  # (N, T, F)
    return SampleSet(
        x=x.astype(np.float32, copy=False),
        valid=valid,
        y=label[rows].astype(np.int8),
        region=region[rows],
        row=rows.astype(np.int64),
        time=table["time"].to_numpy()[rows].astype("datetime64[s]"),
    )


def _cache_key(file_digest: str, target: Target, cfg: DataConfig) -> str:
    parts = {
        "file": file_digest,
        "class": target.flare_class,
        "features": cfg.features,
        "aliases": sorted(cfg.feature_aliases.items()),
        "zero_filter": cfg.c_zero_filter and target.flare_class == "C",
        "builder": BUILDER_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_samples(path: str | Path, target: Target, cfg: DataConfig, seq_len: int,
                 cache_dir: Path | None = None) -> tuple[SampleSet, str]:
    """Samples of one file plus its content hash; reuses a cache built from the same content and config."""
    samples, digest, save = read_samples(Path(path), target, cfg, seq_len, cache_dir)
    save()
    return samples, digest


def read_samples(path: Path, target: Target, cfg: DataConfig, seq_len: int,
                 cache_dir: Path | None) -> tuple[SampleSet, str, Callable[[], None]]:
    """Like :func:`load_samples`, but the cache write is returned, so callers can write only after all
    their inputs proved valid (bad input leaves nothing behind)."""
    _require_file(path)
    digest = file_hash(path)
    cache = None
    if cache_dir is not None and cfg.cache:
        cache = Path(cache_dir) / f"{path.stem}-{_cache_key(digest, target, cfg)}-T{seq_len}.npz"
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    return SampleSet(**{f.name: z[f.name] for f in fields(SampleSet)}), digest, lambda: None
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring unreadable sample cache %s (%s); rebuilding", cache, err)
    table = read_table(path, cfg)
    zero_filter = cfg.c_zero_filter and target.flare_class == "C"
    samples = build_samples(table, cfg.features, seq_len, zero_filter)
    if len(samples) == 0:
        raise DataError(f"{path}: no usable samples (all rows are padding"
                        + (" or have a zero feature in the C-class filter)" if zero_filter else ")"))

    def save() -> None:
        if cache is not None:
            write_npz(cache, **{f.name: getattr(samples, f.name) for f in fields(SampleSet)})

    return samples, digest, save


def split_validation(samples: SampleSet, cfg: DataConfig, seed: int) -> tuple[SampleSet, SampleSet]:
    """Carve a validation split out of training samples by active region (or by time), never by row.

    ``region``: regions are shuffled with ``cfg.split_seed`` (or ``seed`` when that is None), separately
    for regions with and without positives (so both splits see flare episodes), and ``validation_fraction``
    of each group goes to validation.
    ``time``: the latest ``validation_fraction`` of regions by first record time go to validation.
    """
    regions, first = np.unique(samples.region, return_index=True)
    if len(regions) < 2:
        raise DataError(f"cannot split {len(regions)} region(s) into training and validation by region")
    if cfg.validation_split == "time":
        order = regions[np.argsort(samples.time[first], kind="stable")]
        n_val = max(1, round(cfg.validation_fraction * len(regions)))
        val_regions = order[-n_val:]
    else:
        rng = np.random.default_rng(seed if cfg.split_seed is None else cfg.split_seed)
        flaring = np.isin(regions, np.unique(samples.region[samples.y == 1]))
        val_regions = []
        for group in (regions[flaring], regions[~flaring]):
            if len(group):
                n_val = round(cfg.validation_fraction * len(group))
                val_regions.append(rng.permutation(group)[:n_val])
        val_regions = np.concatenate(val_regions)
        if len(val_regions) == 0:
            val_regions = rng.permutation(regions)[:1]
    is_val = np.isin(samples.region, val_regions)
    if is_val.all():
        is_val[np.isin(samples.region, val_regions[:1], invert=True)] = False
    return samples.subset(~is_val), samples.subset(is_val)


def require_positives(train_path: Path, samples: SampleSet) -> None:
    """Refuse a training table without positive samples: there is nothing to learn."""
    if samples.n_positive == 0:
        raise DataError(f"{train_path}: no positive samples: all {len(samples)} samples are labelled 'N' in "
                        f"column {LABEL_COLUMN!r}, so there is nothing to learn; expected flaring rows labelled "
                        "'P' (a different label convention?)")


def check_learnable(train_path: Path, train_all: SampleSet, val: SampleSet, split: str = "validation split") -> None:
    """Refuse a training table that cannot be learned from, or a validation ``split`` of it too poor in
    positives to choose a threshold on, naming the file and the counts. A test table without positives is
    allowed: its undefined metrics are reported as undefined."""
    require_positives(train_path, train_all)
    if val.n_positive < MIN_VALIDATION_POSITIVES:
        flaring = len(np.unique(val.region[val.y == 1]))
        raise DataError(f"{train_path}: the {split} ({len(np.unique(val.region))} regions, {len(val)} samples) "
                        f"holds {val.n_positive} positive sample(s) from {flaring} flaring region(s) of the "
                        f"table's {train_all.n_positive}; at least {MIN_VALIDATION_POSITIVES} are needed to choose "
                        "a decision threshold (raise data.validation_fraction, or give a table with more flaring "
                        "regions)")


def learnable_folds(train_path: Path, samples: SampleSet, k: int, seed: int,
                    cfg: DataConfig) -> list[tuple[SampleSet, SampleSet]]:
    """The ``k`` region folds tuning scores on (:func:`region_folds`), each refused unless learnable."""
    require_positives(train_path, samples)
    folds = region_folds(samples, k, seed if cfg.split_seed is None else cfg.split_seed)
    for i, (_, val) in enumerate(folds):
        check_learnable(train_path, samples, val, f"validation fold {i + 1} of {k}")
    return folds


def region_folds(samples: SampleSet, k: int, seed: int) -> list[tuple[SampleSet, SampleSet]]:
    """``k`` region-disjoint (training, validation) pairs: every region is validation in exactly one fold.

    Regions with and without positives are dealt round-robin into the folds after a seeded shuffle, so
    every fold sees flare episodes (as :func:`split_validation` does for one split).
    """
    regions = np.unique(samples.region)
    if k < 2 or len(regions) < k:
        raise DataError(f"cannot make {k} region-disjoint folds of {len(regions)} region(s): need k >= 2 and at "
                        "least k regions")
    rng = np.random.default_rng(seed)
    flaring = np.isin(regions, np.unique(samples.region[samples.y == 1]))
    ordered = np.concatenate([rng.permutation(regions[flaring]), rng.permutation(regions[~flaring])])
    fold_of = dict(zip(ordered.tolist(), np.arange(len(ordered)) % k, strict=True))
    sample_fold = np.array([fold_of[r] for r in samples.region.tolist()])
    return [(samples.subset(sample_fold != i), samples.subset(sample_fold == i)) for i in range(k)]


def prepare_folds(data_dir: str | Path, target: Target, seed: int, cfg: DataConfig, seq_len: int, k: int,
                  cache_dir: Path | None = None) -> tuple[list[tuple[SampleSet, SampleSet]], dict[str, str]]:
    """Scaled, augmented (training, validation) folds of the training file alone, and its content hash.

    The testing file is never opened: tuning on these folds cannot see the test period.
    """
    path = data_file(Path(data_dir), target, "train")
    samples, digest = load_samples(path, target, cfg, seq_len, cache_dir)
    folds = []
    for train, val in learnable_folds(path, samples, k, seed, cfg):
        scaler = Scaler.fit(train, cfg.features, cfg)
        train, val = scaler.transform(train), scaler.transform(val)
        if target.flare_class in cfg.augment_classes:
            train = augment_positives(train, cfg.augment_noise, seed, cfg.augment_copies)
        folds.append((train, val))
    return folds, {path.name: digest}


@dataclass(frozen=True)
class Scaler:
    """Per-feature scaling fitted on the training split: optional signed log10, then standardisation."""

    method: str  # "log_standard" | "standard" | "none"
    log_mask: np.ndarray  # (F,) bool: features put through signed log10
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, samples: SampleSet, features: tuple[str, ...], cfg: DataConfig) -> Scaler:
        """Fit on the current rows of the training samples (each record once)."""
        current = samples.x[:, -1, :].astype(np.float64)  # (N, F)
        method = cfg.scaling
        log_mask = np.array([f in cfg.log_features for f in features])
        if method == "auto":
            method = "log_standard" if (np.abs(current) > 1e3).any() else "none"
        if method != "log_standard":
            log_mask = np.zeros(len(features), bool)
        f = len(features)
        if method == "none":
            return cls(method, log_mask, np.zeros(f), np.ones(f))
        z = np.where(log_mask, _signed_log10(current), current)
        std = z.std(axis=0)
        return cls(method, log_mask, z.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, samples: SampleSet) -> SampleSet:
        """Scaled copy; padding steps stay exactly zero."""
        x = samples.x.astype(np.float64)
        x = np.where(self.log_mask, _signed_log10(x), x)
        x = (x - self.mean) / self.std
        x = np.where(samples.valid[:, :, None], x, 0.0).astype(np.float32)
        return replace(samples, x=x)

    def to_dict(self) -> dict:
        """JSON-able form stored with the model."""
        return {"method": self.method, "log_mask": self.log_mask.tolist(),
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        return cls(d["method"], np.array(d["log_mask"], bool), np.array(d["mean"]), np.array(d["std"]))


def _signed_log10(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log10(1.0 + np.abs(x))


def augment_positives(samples: SampleSet, noise: float, seed: int, copies: int = 1) -> SampleSet:
    """Append ``copies`` noisy copies of every positive (reference M/M5 augmentation: one copy), on scaled
    training data only.

    Noise is ``noise`` x the feature's standard deviation over real steps, added to every feature of
    the real steps of the window (never to front padding, never to the label).
    """
    pos = np.flatnonzero(samples.y == 1)
    if len(pos) == 0 or noise == 0 or copies == 0:
        return samples
    real = samples.x[samples.valid]  # (n_real_steps, F)
    std = real.std(axis=0) if len(real) else np.zeros(samples.x.shape[2])
    rng = np.random.default_rng([seed, 0xA06])
    copy = samples.subset(np.tile(pos, copies))
    jitter = rng.standard_normal(copy.x.shape).astype(np.float32) * (noise * std).astype(np.float32)
    copy = replace(copy, x=copy.x + jitter * copy.valid[:, :, None])
    return SampleSet(**{f.name: np.concatenate([getattr(samples, f.name), getattr(copy, f.name)])
                        for f in fields(SampleSet)})


@dataclass(frozen=True)
class ExperimentData:
    """Scaled train / validation / test samples of one target and seed, with provenance."""

    train: SampleSet
    val: SampleSet
    test: SampleSet
    scaler: Scaler
    file_hashes: dict[str, str]  # file name -> sha256


def prepare_experiment(data_dir: str | Path, target: Target, seed: int, cfg: DataConfig, seq_len: int,
                       cache_dir: Path | None = None) -> ExperimentData:
    """Everything one experiment needs: read (or reuse cached) samples, split, scale, augment."""
    train_path, test_path = data_file(Path(data_dir), target, "train"), data_file(Path(data_dir), target, "test")
    train_all, h_train, save_train = read_samples(train_path, target, cfg, seq_len, cache_dir)
    test, h_test, save_test = read_samples(test_path, target, cfg, seq_len, cache_dir)
    require_positives(train_path, train_all)
    train, val = split_validation(train_all, cfg, seed)
    check_learnable(train_path, train_all, val)
    save_train()
    save_test()
    scaler = Scaler.fit(train, cfg.features, cfg)
    train, val, test = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    if target.flare_class in cfg.augment_classes:
        train = augment_positives(train, cfg.augment_noise, seed, cfg.augment_copies)
    return ExperimentData(train, val, test, scaler, {train_path.name: h_train, test_path.name: h_test})
