"""SHARP tables -> validated columns: the one reader of the CSV files, real and synthetic alike.

Files are read by column name and validated once, here; every error names the file, the line (as a text
editor numbers it) or column, the cell as written and what was expected. A vectorised scan of the bytes
checks encoding, quoting and the field count of every line before pandas parses the columns.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from everest.config import DataConfig, Target
from everest.errors import DataError

LABEL_COLUMN = "Flare"
TIME_COLUMN = "DATE__OBS"
LABELS = {"N": 0, "P": 1, "padding": -1}
# Largest magnitude accepted: samples are float32 (max 3.4e38); real SHARP values stay below ~1e25.
MAX_ABS_VALUE = 1e37
# Largest NOAA_AR accepted: NOAA numbers have 5 digits; the bound keeps the int64 conversion exact.
MAX_REGION = 999_999_999

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


def require_file(path: Path) -> None:
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


def show_cell(text: str) -> str:
    """A cell's text for a message: quoted as written, shortened when huge."""
    if text == "":
        return "'' (an empty cell)"
    return repr(text) if len(text) <= 40 else f"{text[:30]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class CsvSource:
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


def region_meaning(column: str) -> str:
    """What a region column holds, for messages."""
    return "a NOAA active-region number" if column == "NOAA_AR" else "an active-region patch number (HARP or TARP)"


def _resolve_columns(path: Path, header: list[str], required: Sequence[str], features: Sequence[str],
                     aliases: Mapping[str, str]) -> dict[str, str]:
    """Check the ``required`` columns and map each feature to the column that holds it (honouring ``aliases``
    such as TOTBSQ for MEANALP)."""
    missing_base = [c for c in required if c not in header]
    found: dict[str, str] = {}
    missing: list[str] = []
    for feat in features:
        names = [feat] + [alias for alias, canon in aliases.items() if canon == feat]
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


def open_csv(path: str | Path, required: Sequence[str], features: Sequence[str] = (),
             aliases: Mapping[str, str] | None = None) -> tuple[CsvSource, dict[str, str]]:
    """A CSV file checked for its kind, encoding, quoting and field counts, with its ``required`` columns and
    features present once each; returns the file and the column of each feature (see :func:`_resolve_columns`)."""
    path = Path(path)
    require_file(path)
    _check_signature(path)
    layout = _scan(path)
    if len(layout.fields) == 0:
        raise DataError(f"{path}: file is empty (expected a CSV header and data rows)")
    header = [h.strip() for h in _split(_record(path, layout, 0).removeprefix(codecs.BOM_UTF8))]
    src = CsvSource(path, layout, header)
    if len(header) == 1 and (delim := next((d for d in ";\t|" if d in header[0]), None)):
        raise DataError(f"{path}: fields are separated by {delim!r} (line {layout.line[0]}); "
                        "expected commas (a comma-separated .csv file)")
    columns = _resolve_columns(path, header, required, features, aliases or {})
    require_once(src, [*required, *columns.values()])
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


def require_once(src: CsvSource, names: Sequence[str]) -> None:
    """Refuse a header in which one of ``names`` appears more than once, naming its column positions."""
    for name in dict.fromkeys(names):
        if src.header.count(name) > 1:
            at = [i + 1 for i, h in enumerate(src.header) if h == name]
            raise DataError(f"{src.path}: column {name!r} appears {len(at)} times in the header (columns {at}); "
                            "expected each column once")


def read_columns(src: CsvSource, used: Sequence[str], text: Sequence[str] = ()) -> pd.DataFrame:
    """The ``used`` columns of a file opened by :func:`open_csv`, by name; ``text`` columns kept as strings."""
    path, header = src.path, src.header
    names = [f"_{i}" for i in range(len(header))]  # positional: header names may repeat or need stripping
    col = {name: names[header.index(name)] for name in used}
    try:
        df = pd.read_csv(path, header=0, names=names, usecols=[col[n] for n in used], encoding="utf-8",
                         dtype={col[n]: str for n in text}, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:  # the scan should have caught these
        _check_quotes(path)
        raise DataError(f"{path}: cannot be parsed as CSV ({' '.join(str(err).split())}); {_TEXT_TABLE}") from None
    if len(df) != len(src.layout.fields) - 1:
        _check_quotes(path)
        raise DataError(f"{path}: {len(df)} rows parsed but {len(src.layout.fields) - 1} lines of data found "
                        "(stray quotes or control characters?); " + _TEXT_TABLE)
    return df.rename(columns={c: n for n, c in col.items()})[list(used)]


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """Read and validate one SHARP table by column name.

    Returns columns ``label`` (int8: 1 P, 0 N, -1 padding), ``time``, ``region`` and the configured
    features (float64, in configuration order). Raises :class:`DataError` for every malformed input.
    Tolerated: a UTF-8 byte-order mark, CRLF or CR line ends, blank lines, spaces around column names,
    quoted cells, extra columns, times with a UTC offset (converted to UTC).
    """
    path = Path(path)
    region_column = cfg.region_column
    src, columns = open_csv(path, (LABEL_COLUMN, TIME_COLUMN, region_column), cfg.features, cfg.feature_aliases)
    used = list(dict.fromkeys([LABEL_COLUMN, TIME_COLUMN, region_column, *columns.values()]))
    df = read_columns(src, used, text=(LABEL_COLUMN, TIME_COLUMN))

    labels = df[LABEL_COLUMN].str.strip()
    unknown = ~labels.isin(list(LABELS)).to_numpy()
    if unknown.any():
        raw = src.cell(int(np.flatnonzero(unknown)[0]), LABEL_COLUMN)
        hint = " (a repeated header line: files joined with cat?)" if raw.strip() == LABEL_COLUMN else ""
        raise DataError(f"{path}: column {LABEL_COLUMN!r} has unknown label {show_cell(raw)} at {src.where(unknown)}"
                        f"{hint}; expected one of {list(LABELS)}")
    label = labels.map(LABELS).to_numpy(np.int8)

    out = {"label": label}
    region = pd.to_numeric(df[region_column], errors="coerce").to_numpy(np.float64)
    bad_region = ~((region >= 0) & (region <= MAX_REGION) & (region == np.round(region)))
    if bad_region.any():
        raw = src.cell(int(np.flatnonzero(bad_region)[0]), region_column)
        raise DataError(f"{path}: column {region_column!r} holds {show_cell(raw)} at {src.where(bad_region)}; "
                        f"expected {region_meaning(region_column)} (a whole number from 0 to {MAX_REGION})")
    out["region"] = region.astype(np.int64)

    time = pd.to_datetime(df[TIME_COLUMN], errors="coerce", format="ISO8601", utc=True)
    bad_time = (time.isna() & (label != LABELS["padding"])).to_numpy()
    if bad_time.any():
        raw = src.cell(int(np.flatnonzero(bad_time)[0]), TIME_COLUMN)
        raise DataError(f"{path}: column {TIME_COLUMN!r} holds {show_cell(raw)} at {src.where(bad_time)}; "
                        "expected an ISO 8601 time such as 2010-05-04T23:12:00 (UTC unless an offset is given)")
    out["time"] = time.dt.tz_localize(None).to_numpy("datetime64[s]")

    for feat, name in columns.items():
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        huge = np.abs(values) > MAX_ABS_VALUE  # inf included
        if bad.any():
            raw = src.cell(first := int(np.flatnonzero(bad)[0]), name)
            if not huge[first] or "inf" in raw.lower():  # else a number written too large to hold, like 1e400
                hint = " (write numbers with a '.' decimal point and no thousands separators)" if "," in raw else ""
                raise DataError(f"{path}: column {name!r} must hold finite numbers; found {show_cell(raw)} at "
                                f"{src.where(bad)}{hint}")
        if huge.any():
            raw = src.cell(int(np.flatnonzero(huge)[0]), name)
            raise DataError(f"{path}: column {name!r} holds {show_cell(raw)} at {src.where(huge)}: beyond "
                            f"{MAX_ABS_VALUE:.0e}, the float32 range samples are stored in (a unit or parsing error?)")
        out[feat] = values
    table = pd.DataFrame(out)
    check_runs(src, table["region"].to_numpy(), table["time"].to_numpy(), region_column)
    return table


def check_runs(src: CsvSource, region: np.ndarray, time: np.ndarray, region_column: str,
               time_column: str = TIME_COLUMN) -> None:
    """Rows of one region must be contiguous and strictly increasing in time (rows without a time, such as
    padding rows, are skipped in the time order); the error names the file, the lines and the cells."""
    path = src.path
    new_run = np.r_[True, region[1:] != region[:-1]]
    uniq, counts = np.unique(region[new_run], return_counts=True)
    if (counts > 1).any():
        ar = int(uniq[counts > 1][0])
        lines = [src.line(r) for r in np.flatnonzero(new_run & (region == ar))[:2]]
        raise DataError(f"{path}: rows of region {region_column}={ar} are not contiguous "
                        f"(separate runs start at lines {lines}); expected one time-ordered run per region")
    idx = np.flatnonzero(~np.isnat(time))
    t = time[idx].astype("datetime64[s]").astype(np.int64)
    # Compare each dated row with the previous dated row of the same region.
    back = (region[idx[1:]] == region[idx[:-1]]) & (t[1:] <= t[:-1])
    if back.any():
        k = int(np.flatnonzero(back)[0])
        r, prev = int(idx[k + 1]), int(idx[k])
        was, now = (show_cell(src.cell(i, time_column)) for i in (prev, r))
        raise DataError(f"{path}: region {region_column}={int(region[r])} is out of time order at line {src.line(r)}: "
                        f"{now} does not follow {was} "
                        f"(line {src.line(prev)}; rows of a region must be strictly increasing in {time_column})")
