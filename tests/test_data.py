"""Data path: exact sample formation, validation, splits, scaling, augmentation, caching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tables import make_table

from everest.config import DataConfig, Target
from everest.data import samples as S
from everest.data import tables as T
from everest.errors import DataError

CFG = DataConfig()
M24 = Target.parse("M-24")


def test_windows_follow_the_reference_rules(write_csv):
    # region 1: N(1), padding, P(3), N(7); region 2: N(4), P(5)
    path = write_csv(make_table([("N", 1, 1.0), ("padding", 1, 0.0), ("P", 1, 3.0), ("N", 1, 7.0),
                                 ("N", 2, 4.0), ("P", 2, 5.0)]))
    s = S.build_samples(T.read_table(path, CFG), CFG.features, seq_len=3, zero_filter=False)
    # one sample per non-padding row, current row last, history within the region only
    np.testing.assert_array_equal(s.row, [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(s.y, [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(s.region, [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(s.x[:, :, 0], [[0, 0, 1], [1, 0, 3], [0, 3, 7], [0, 0, 4], [0, 4, 5]])
    np.testing.assert_array_equal(s.valid, [[0, 0, 1], [1, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]])
    assert s.x.shape == (5, 3, 9) and s.x.dtype == np.float32


def test_c_zero_filter_looks_at_the_current_row(write_csv):
    table = make_table([("N", 1, 0.0), ("P", 1, 2.0), ("N", 1, 3.0)])
    table.loc[2, "R_VALUE"] = 0.0  # current row of the third sample has one zero feature
    s = S.build_samples(T.read_table(write_csv(table), CFG), CFG.features, seq_len=3, zero_filter=True)
    # row 0 (all zero) and row 2 (R_VALUE 0) are dropped as samples; row 0 is still history of row 1
    np.testing.assert_array_equal(s.row, [1])
    np.testing.assert_array_equal(s.valid, [[False, True, True]])


def test_totbsq_is_an_alias_of_meanalp(write_csv):
    table = make_table([("N", 1, 1.0), ("P", 1, 2.0)]).rename(columns={"MEANALP": "TOTBSQ"})
    t = T.read_table(write_csv(table), CFG)
    assert list(t.columns[3:]) == list(CFG.features)
    np.testing.assert_array_equal(t["MEANALP"], [1.0, 2.0])


def test_other_feature_lists_and_extra_columns(write_csv):
    table = make_table([("N", 1, 1.0), ("P", 1, 2.0)]).assign(EXTRA="x", AREA=[5.0, 6.0])
    cfg = DataConfig(features=("USFLUX", "AREA", "R_VALUE"))
    s = S.build_samples(T.read_table(write_csv(table), cfg), cfg.features, seq_len=2, zero_filter=False)
    np.testing.assert_array_equal(s.x[1], [[1.0, 5.0, 1.0], [2.0, 6.0, 2.0]])


def _bad(table: pd.DataFrame, row: int, col: str, value) -> pd.DataFrame:
    table = table.astype({col: object})
    table.loc[row, col] = value
    return table


BASE = make_table([("N", 1, 1.0), ("N", 1, 2.0), ("P", 1, 3.0), ("N", 2, 4.0)])


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("", ["file is empty"]),
        (",".join(BASE.columns) + "\n", ["no data rows"]),
        (BASE.drop(columns=["USFLUX"]), ["missing required column", "USFLUX"]),
        (BASE.drop(columns=["NOAA_AR"]), ["missing required column", "NOAA_AR"]),
        (BASE.drop(columns=["MEANALP"]), ["MEANALP (or TOTBSQ)"]),
        (_bad(BASE, 1, "TOTPOT", "abc"), ["'TOTPOT'", "'abc'", "line 3"]),
        (_bad(BASE, 2, "USFLUX", np.nan), ["'USFLUX'", "finite", "line 4"]),
        (_bad(BASE, 0, "R_VALUE", np.inf), ["'R_VALUE'", "inf", "line 2"]),
        (_bad(BASE, 1, "Flare", "Q"), ["unknown label 'Q'", "line 3"]),
        (_bad(BASE, 2, "DATE__OBS", "2011-01-01T00:00:00"), ["out of time order", "line 4"]),
        (_bad(BASE, 1, "DATE__OBS", "yesterday"), ["expected an ISO 8601 time", "'yesterday'", "line 3"]),
        (pd.concat([BASE, BASE.iloc[[1]]]), ["not contiguous"]),
        (pd.concat([BASE.iloc[:2], BASE.iloc[[1]], BASE.iloc[2:]]), ["out of time order"]),
        (_bad(BASE, 3, "NOAA_AR", "AR?"), ["'NOAA_AR'", "line 5"]),
    ],
    ids=["empty", "header-only", "missing-feature", "missing-region", "missing-meanalp", "non-numeric", "nan",
         "inf", "unknown-label", "time-order", "bad-time", "non-contiguous", "duplicate-row", "bad-region"],
)
def test_bad_input_names_file_and_problem(write_csv, content, fragments):
    path = write_csv(content)
    with pytest.raises(DataError) as err:
        T.read_table(path, CFG)
    msg = str(err.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        S.load_samples(tmp_path / "nope.csv", M24, CFG, 10)


def _many_regions(n_regions: int = 20, per_region: int = 6) -> pd.DataFrame:
    rows = []
    for r in range(n_regions):
        for k in range(per_region):
            rows.append(("P" if (r % 4 == 0 and k > 2) else "N", 100 + r, float(10 ** (r % 5 + k / 10))))
    return make_table(rows)


def test_region_split_is_disjoint_deterministic_and_stratified(write_csv):
    s = S.build_samples(T.read_table(write_csv(_many_regions()), CFG), CFG.features, 10, False)
    tr, va = S.split_validation(s, CFG, seed=3)
    assert not set(tr.region) & set(va.region)
    assert len(tr) + len(va) == len(s)
    assert va.n_positive > 0 and tr.n_positive > 0  # flaring regions split separately
    assert len(set(va.region)) == 4  # round(0.2 * 5 flaring) + round(0.2 * 15 quiet) = 1 + 3
    tr2, va2 = S.split_validation(s, CFG, seed=3)
    np.testing.assert_array_equal(va.row, va2.row)
    # One split shared by every seed (data.split_seed, default 0) ...
    _, va3 = S.split_validation(s, CFG, seed=4)
    np.testing.assert_array_equal(va3.row, va.row)
    # ... or, with split_seed None, one per experiment seed
    per_seed = CFG.model_copy(update={"split_seed": None})
    _, va4 = S.split_validation(s, per_seed, seed=3)
    _, va5 = S.split_validation(s, per_seed, seed=4)
    assert set(va4.region) != set(va5.region)


def test_time_split_takes_the_latest_regions(write_csv):
    s = S.build_samples(T.read_table(write_csv(_many_regions()), CFG), CFG.features, 10, False)
    tr, va = S.split_validation(s, DataConfig(validation_split="time"), seed=0)
    assert va.time.min() > tr.time.min()
    assert not set(tr.region) & set(va.region)


def test_scaler_fits_training_only_and_keeps_padding_zero(write_csv):
    s = S.build_samples(T.read_table(write_csv(_many_regions()), CFG), CFG.features, 10, False)
    tr, va = S.split_validation(s, CFG, seed=0)
    sc = S.Scaler.fit(tr, CFG.features, CFG)
    assert sc.method == "log_standard"  # values up to 1e4.5 trigger the log scaling in auto mode
    cur = np.log10(1 + tr.x[:, -1, 0].astype(np.float64))
    assert sc.mean[0] == pytest.approx(cur.mean())
    assert sc.std[0] == pytest.approx(cur.std())
    out = sc.transform(tr)
    assert np.all(out.x[~tr.valid] == 0)
    np.testing.assert_allclose(out.x[:, -1, 0].mean(), 0, atol=1e-5)
    again = S.Scaler.from_dict(sc.to_dict()).transform(va)
    np.testing.assert_array_equal(again.x, sc.transform(va).x)
    prescaled = S.Scaler.fit(S.SampleSet(**{**tr.__dict__, "x": np.clip(tr.x, -3, 3)}), CFG.features, CFG)
    assert prescaled.method == "none"


def test_augmentation_duplicates_positives_with_noise_on_real_steps_only(write_csv):
    s = S.build_samples(T.read_table(write_csv(_many_regions()), CFG), CFG.features, 10, False)
    out = S.augment_positives(s, noise=0.05, seed=0)
    n_pos = s.n_positive
    assert len(out) == len(s) + n_pos and out.n_positive == 2 * n_pos
    copy = out.subset(np.arange(len(s), len(out)))
    orig = s.subset(s.y == 1)
    np.testing.assert_array_equal(copy.row, orig.row)
    diff = copy.x - orig.x
    assert np.all(diff[~orig.valid] == 0)  # padding untouched
    assert np.all(diff[orig.valid] != 0)  # every feature of every real step jittered
    std = s.x[s.valid].std(axis=0)
    assert diff[orig.valid].std(axis=0) == pytest.approx(0.05 * std, rel=0.5)


def test_augmentation_copies_and_the_reference_default(write_csv):
    s = S.build_samples(T.read_table(write_csv(_many_regions()), CFG), CFG.features, 10, False)
    assert CFG.augment_copies == 1  # the reference: one noisy copy of each positive
    three = S.augment_positives(s, noise=0.05, seed=0, copies=3)
    assert len(three) == len(s) + 3 * s.n_positive and three.n_positive == 4 * s.n_positive
    copies = three.x[len(s):].reshape(3, s.n_positive, *s.x.shape[1:])
    assert not np.array_equal(copies[0], copies[1])  # each copy draws its own noise
    assert S.augment_positives(s, noise=0.05, seed=0, copies=0) is s
    with pytest.raises(ValueError, match="augment_copies"):
        DataConfig(augment_copies=-1)


def test_cache_reuses_and_invalidates(write_csv, tmp_path, monkeypatch):
    path = write_csv(_many_regions())
    cache = tmp_path / "cache"
    first, h1 = S.load_samples(path, M24, CFG, 10, cache)
    assert len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(S, "read_table", lambda *a, **k: pytest.fail("CSV parsed again despite the cache"))
    again, h2 = S.load_samples(path, M24, CFG, 10, cache)
    assert h1 == h2
    np.testing.assert_array_equal(first.x, again.x)
    monkeypatch.undo()
    _many_regions(21).to_csv(path, index=False)  # changed content -> new key
    changed, h3 = S.load_samples(path, M24, CFG, 10, cache)
    assert h3 != h1 and len(changed) > len(first)
    S.load_samples(path, M24, DataConfig(features=("USFLUX", "TOTPOT")), 10, cache)  # changed config -> new key
    assert len(list(cache.glob("*.npz"))) == 3


# Accepted spellings of the same table: each must read to exactly the arrays of the clean file.
CLEAN = _many_regions(3, 4).to_csv(index=False)


def _quote_all(text: str) -> str:
    return "".join(",".join(f'"{f}"' for f in line.split(",")) + "\n" for line in text.splitlines())


@pytest.mark.parametrize(
    "spell",
    [
        lambda t: "\ufeff" + t,  # UTF-8 byte-order mark (Excel's "CSV UTF-8")
        lambda t: t.replace("\n", "\r\n"),
        lambda t: t.replace("\n", "\r"),
        lambda t: t.replace("\n", "\r\r\n"),  # csv written in text mode on Windows: a blank line after each row
        lambda t: "\n\n" + t.replace("\n", "\n \t\n", 3) + "\n\n",  # blank and whitespace-only lines
        lambda t: t.rstrip("\n"),  # no line break after the last row
        lambda t: "\ufeff" + _quote_all(t).replace("\n", "\r\n"),
        lambda t: t.replace("USFLUX", " USFLUX ", 1).replace("Flare", "Flare\t", 1),
        lambda t: "".join(f"{i - 1 if i else ''},{line}\n" for i, line in enumerate(t.splitlines())),  # index column
        lambda t: t.replace(",1100,", ',"a note, with a comma\nand a line break",', 1),  # quoted text, unused column
    ],
    ids=["bom", "crlf", "cr", "cr-cr-lf", "blank-lines", "no-final-newline", "bom-quoted-crlf", "header-spaces",
         "index-column", "multiline-text-cell"],
)
def test_accepted_spellings_read_as_the_clean_file(write_csv, spell):
    clean = T.read_table(write_csv(CLEAN, "clean.csv"), CFG)
    path = write_csv("")
    path.write_bytes(spell(CLEAN).encode())
    table = T.read_table(path, CFG)
    pd.testing.assert_frame_equal(table, clean)
    a, b = (S.build_samples(t, CFG.features, 3, False) for t in (table, clean))
    for name in ("x", "valid", "y", "region", "row", "time"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_bom_and_crlf_give_the_clean_files_arrays(tiny_data, tmp_path):
    src = tiny_data / "training_data_M_24.csv"
    bom_crlf = tmp_path / "training_data_M_24.csv"
    bom_crlf.write_bytes(b"\xef\xbb\xbf" + src.read_bytes().replace(b"\n", b"\r\n"))
    a, _ = S.load_samples(src, M24, CFG, 10)
    b, _ = S.load_samples(bom_crlf, M24, CFG, 10)
    for name in ("x", "valid", "y", "region", "row", "time"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_time_offsets_are_converted_to_utc(write_csv):
    text = CLEAN.replace("2012-01-04T00:12:00", "2012-01-04T02:12:00+02:00", 1)
    assert text != CLEAN
    pd.testing.assert_frame_equal(T.read_table(write_csv(text), CFG), T.read_table(write_csv(CLEAN, "c.csv"), CFG))


TRICKY = ('Flare,DATE__OBS,NOTE\r\n\r\nN,"2012-01-01",x\rP,2012,"a\r\nb ""c"", d"\n  \n'
          'N,2013,"multi\nline\nnote"\r\n\tN,2014,\n"padding",,"tail"')


def test_scan_is_the_same_for_any_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    path.write_text(TRICKY, newline="")
    expect = T._scan(path)
    np.testing.assert_array_equal(expect.line, [1, 3, 4, 7, 10, 11])  # as a text editor numbers the lines
    np.testing.assert_array_equal(expect.fields, [3] * 6)
    assert T._split(TRICKY.encode()[expect.start[2]:expect.end[2]]) == ["P", "2012", 'a\r\nb "c", d']
    for chunk in (1, 2, 3, 5, 7, 64):
        monkeypatch.setattr(T, "_CHUNK", chunk)
        got = T._scan(path)
        for name in ("start", "end", "line", "fields"):
            np.testing.assert_array_equal(getattr(got, name), getattr(expect, name), err_msg=f"{name}, chunk {chunk}")


@pytest.mark.parametrize("chunk", [1 << 20, 3])
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"a,b\n1,2\n\n3,\xe94\n", "byte 0xe9 at line 4"),
        (b"a,b\n1,2\n3,4\xc3", "ends inside a multi-byte character"),
        (b'a,b\n"1\n2",3\n4,"5\n', "quoted field opened at line 4 is never closed"),
        (b'a,b\n1,2\n3,4 "inch"\n', "stray '\"' at line 3"),
        (b'a,b\n1,2\n3,"4"5\n', "stray '\"' at line 3"),
        (b"a,b\r\n1,2\r\n\x00\r\n", "NUL bytes (binary data) at line 3"),
    ],
    ids=["latin-1", "truncated-utf8", "unterminated-quote", "stray-open-quote", "stray-close-quote", "nul"],
)
def test_scan_refuses_bad_bytes_naming_the_line(tmp_path, monkeypatch, chunk, content, fragment):
    monkeypatch.setattr(T, "_CHUNK", chunk)
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match="t.csv") as err:
        T._scan(path, strict=True)  # what read_table runs when the fast scan finds a structure error
    assert fragment in str(err.value)


def _text_cell(line: int, column: str, text: str) -> str:
    lines = CLEAN.splitlines()
    fields = lines[line - 1].split(",")
    fields[lines[0].split(",").index(column)] = text
    return "\n".join([*lines[:line - 1], ",".join(fields), *lines[line:]]) + "\n"


def _ragged_after_blank_lines() -> str:
    lines = CLEAN.splitlines()
    return "\n".join([lines[0], "", lines[1], "  ", lines[2], lines[3].rsplit(",", 1)[0], *lines[4:]]) + "\n"


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (_text_cell(3, "TOTPOT", "inf"), ["'TOTPOT' must hold finite numbers; found 'inf' at line 3"]),
        (_text_cell(3, "TOTPOT", "1e400"), ["'TOTPOT' holds '1e400' at line 3", "beyond 1e+37"]),
        (_text_cell(3, "TOTPOT", " NaN "), ["found ' NaN ' at line 3"]),
        (_text_cell(3, "TOTPOT", ""), ["found '' (an empty cell) at line 3"]),
        (_text_cell(3, "TOTPOT", '"1,5"'), ["found '1,5'", "'.' decimal point"]),
        (_text_cell(3, "TOTPOT", "x" * 1000), ["found 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1000 characters)"]),
        (_text_cell(3, "NOAA_AR", "100.5"), ["'NOAA_AR' holds '100.5' at line 3", "a whole number"]),
        (_text_cell(3, "NOAA_AR", "1e30"), ["'NOAA_AR' holds '1e30' at line 3"]),
        (_text_cell(3, "Flare", ""), ["unknown label '' (an empty cell) at line 3"]),
        (_text_cell(3, "DATE__OBS", "2012-01-04 00:12:00 TAI"), ["holds '2012-01-04 00:12:00 TAI' at line 3"]),
        (_text_cell(3, "DATE__OBS", "2012-01-03T02:30:00+02:00"),
         ["out of time order at line 4: '2012-01-03T00:24:00' does not follow '2012-01-03T02:30:00+02:00' (line 3"]),
        ("\n" + _text_cell(3, "USFLUX", "inf"), ["found 'inf' at line 4"]),  # a blank line counts in line numbers
        (_ragged_after_blank_lines(), ["line 6 has 17 field(s) but the header (line 1) has 18"]),
        (CLEAN.replace("Cdec", "Flare"), ["column 'Flare' appears 2 times in the header (columns [1, 6])"]),
        (CLEAN.replace(",", ";"), ["fields are separated by ';'", "expected commas"]),
    ],
    ids=["inf", "1e400", "nan-with-spaces", "empty", "decimal-comma", "huge-cell", "region-fraction",
         "region-huge", "empty-label", "tai-time", "time-offset-order", "blank-line-numbering",
         "ragged", "duplicate-header", "semicolons"],
)
def test_messages_quote_cells_as_written(write_csv, content, fragments):
    path = write_csv(content)
    with pytest.raises(DataError) as err:
        T.read_table(path, CFG)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_directory_in_place_of_a_table(tmp_path):
    (tmp_path / "training_data_M_24.csv").mkdir()
    with pytest.raises(DataError, match="is a directory; expected a SHARP table"):
        S.load_samples(tmp_path / "training_data_M_24.csv", M24, CFG, 10)
