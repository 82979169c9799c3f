"""scaling.io edge cases: file kinds, --columns and --where parsing, law_data's checks and messages.

Expected values are small hand-made tables and hand arithmetic."""

import json

import numpy as np
import pytest

from scaling.io import filter_rows, law_data, load_table, parse_columns


def test_file_kinds_and_shapes(tmp_path):
    # .ndjson is JSON lines; a key first seen in a later line is still a column (NaN before it)
    p = tmp_path / "runs.ndjson"
    p.write_text('{"a": 1}\n{"a": 2, "b": 3, "tags": [1, 2], "ok": true}\n')
    t = load_table(p)
    assert list(t) == ["a", "b", "ok"]  # lists are dropped, not turned into text
    np.testing.assert_array_equal(t["a"], [1.0, 2.0])
    assert np.isnan(t["b"][0]) and t["b"][1] == 3.0
    assert np.isnan(t["ok"][0]) and t["ok"][1] == 1.0  # JSON true is 1
    p.write_text('{"flag": false}\n{"flag": true}\n')
    np.testing.assert_array_equal(load_table(p)["flag"], [0.0, 1.0])
    # a JSON file holding one object is a one-row table
    q = tmp_path / "one.json"
    q.write_text('{"N": 1e6, "loss": 3.0}')
    assert {k: v.tolist() for k, v in load_table(q).items()} == {"N": [1e6], "loss": [3.0]}
    # a header with tabs and no commas is tab-separated even when the file is named .csv
    c = tmp_path / "runs.csv"
    c.write_text("N\tloss\n1e6\t3.5\n2e6\t3.1\n")
    t = load_table(c)
    assert list(t) == ["N", "loss"]
    np.testing.assert_array_equal(t["loss"], [3.5, 3.1])
    # a JSON lines file with a byte that is not UTF-8 is named by its line
    j = tmp_path / "latin.jsonl"
    j.write_bytes(b'{"name": "a"}\n{"name": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8 text"):
        load_table(j)


def test_parse_columns_rejects_empty_names():
    assert parse_columns(" N = params , loss=final loss") == {"N": "params", "loss": "final loss"}
    for spec in ("N=", "=params", "N=params, loss= "):
        with pytest.raises(ValueError, match="empty variable or column name"):
            parse_columns(spec)
    with pytest.raises(ValueError, match="maps 'loss' twice \\('x' and 'y'\\)"):
        parse_columns("N=n,loss=x,loss=y")  # the later one once won silently


def test_filter_rows_every_operator():
    t = {"x": np.array([1.0, 2.0, 3.0]), "s": np.array(["a", "b", "a"], dtype=object)}
    expect = {"x<2": [1.0], "x<=2": [1.0, 2.0], "x>2": [3.0], "x>=2": [2.0, 3.0], "x==2": [2.0],
              "x!=2": [1.0, 3.0], "s==a": [1.0, 3.0], "s!=a": [2.0], " x >= 2 ": [2.0, 3.0]}
    for cond, kept in expect.items():
        np.testing.assert_array_equal(filter_rows(t, [cond])["x"], kept, err_msg=cond)
    # conditions combine with AND, whichever kind of column comes first
    np.testing.assert_array_equal(filter_rows(t, ["x>=2", "x<3"])["x"], [2.0])
    np.testing.assert_array_equal(filter_rows(t, ["s==a", "x>1"])["x"], [3.0])
    np.testing.assert_array_equal(filter_rows(t, ["x>1", "s==a"])["s"], ["a"])
    with pytest.raises(ValueError, match=r"column 'y' not found; columns: \['x', 's'\]"):
        filter_rows(t, ["y<1"])
    with pytest.raises(ValueError, match="'abc' is not a number"):
        filter_rows(t, ["x<abc"])


def test_law_data_messages_and_checks():
    msgs = []
    t = {"n": np.array([1e6, 2e6]), "c": np.array([6e13, 2.4e14]), "y": np.array([3.0, 2.9])}
    law_data(t, ["N", "D", "loss"], {"N": "n", "C": "c", "loss": "y"}, log=msgs.append)
    assert msgs == ["no token column: derived D = C / (6 N) from columns 'c' and 'n'"]
    # C derived from N and D with a user FLOP model: C = 8 N D (1e6 * 1e7 * 8 = 8e13)
    out = law_data({"N": np.array([1e6, 2e6]), "D": np.array([1e7, 2e7]), "loss": t["y"]}, ["C", "loss"],
                   flops_per_token=lambda n: 8 * n, log=msgs.append)
    np.testing.assert_allclose(out["C"], [8e13, 3.2e14])
    assert msgs[-1] == "no compute column: derived C = flops_per_token(N) * D"
    # --dropna drops a NaN in any needed column, the target included, and says how many rows it dropped
    t = {"N": np.array([1.0, 2.0, np.nan, 4.0]), "loss": np.array([3.0, np.nan, 2.0, 1.0])}
    msgs = []
    out = law_data(t, ["N", "loss"], dropna=True, log=msgs.append)
    np.testing.assert_array_equal(out["row"], [0, 3])
    np.testing.assert_array_equal(out["loss"], [3.0, 1.0])
    assert msgs == ["dropped 2 rows with missing values: rows [1, 2] (0-based data rows, header excluded)"]
    with pytest.raises(ValueError, match="no rows left after dropping missing values"):
        law_data({"N": np.array([np.nan, 1.0]), "loss": np.array([1.0, np.nan])}, ["N", "loss"], dropna=True,
                 log=None)
    # infinite and zero values are named by row; zero is allowed where positivity is not required
    with pytest.raises(ValueError, match=r"N: infinite values in rows \[1\]"):
        law_data({"N": np.array([1.0, np.inf]), "loss": np.array([1.0, 2.0])}, ["N", "loss"])
    with pytest.raises(ValueError, match=r"N: non-positive values in rows \[0\]"):
        law_data({"N": np.array([0.0, 1.0]), "loss": np.array([1.0, 2.0])}, ["N", "loss"])
    out = law_data({"N": np.array([0.0, 1.0]), "loss": np.array([1.0, 2.0])}, ["N", "loss"], positive=False)
    np.testing.assert_array_equal(out["N"], [0.0, 1.0])


def test_bad_rows_lists_ten_then_counts():
    loss = np.ones(12)
    loss[:10] = np.nan
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \(0-based"):
        law_data({"loss": loss}, ["loss"])
    loss[10] = np.nan  # 11 bad rows: the first 10 and the count
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \.\.\. \(11 rows\) \(0-"):
        law_data({"loss": loss}, ["loss"])


def test_summary_directory_drops_list_values(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps({"params": 1e6, "history": [3.0, 2.0]}))
    assert list(load_table(tmp_path)) == ["run", "params"]
