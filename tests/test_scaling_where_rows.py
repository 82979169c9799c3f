"""After --where, messages and outputs still number rows as the file does (0-based data rows)."""

import json

import numpy as np
import pytest

from scaling.io import filter_rows, law_data, load_table


def _csv(tmp_path):
    p = tmp_path / "runs.csv"
    # data rows 0..4; row 2 has no loss, row 3's N is text
    p.write_text("name,N,flops,loss\nr0,1,1,3.0\nr1,2,2,2.5\nr2,3,3,\nr3,x,4,2.0\nr4,5,5,1.5\n")
    return p


def test_filtered_table_keeps_file_row_numbers(tmp_path):
    t = filter_rows(load_table(_csv(tmp_path)), ["flops>1"])
    np.testing.assert_array_equal(t["flops"], [2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"loss: missing/NaN values in rows \[2\] \(0-based data rows"):
        law_data(t, ["flops", "loss"])
    with pytest.raises(ValueError, match=r"column 'N' \(for N\) is not numeric: row 3 .* holds 'x'"):
        law_data(t, ["N", "loss"])
    # filtering twice composes
    with pytest.raises(ValueError, match=r"column 'N' \(for N\) is not numeric: row 3 "):
        law_data(filter_rows(t, ["flops>3"]), ["N", "loss"])
    with pytest.raises(ValueError, match=r"loss: missing/NaN values in rows \[2\]"):
        law_data(filter_rows(t, ["flops>=3"]), ["loss"])

def test_cli_pareto_rows_after_where(tmp_path, capsys):
    from scaling.cli import main

    p = _csv(tmp_path)
    argv = ["pareto", str(p), "--objectives", "loss:min,flops:min", "--label", "name", "--where", "flops>1"]
    assert main(argv) == 2
    assert "missing values in rows [2] (use --dropna)" in capsys.readouterr().err
    assert main([*argv, "--dropna", "--sigma", "0.01", "--n-boot", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted((r["row"], r["label"]) for r in out["frontier"]) == [(1, "r1"), (3, "r3"), (4, "r4")]
    assert sorted(out["membership_probability"]) == ["1", "3", "4"]
