"""Table loaders: CSV, JSON lines, JSON lists, directories of trainer summary.json files; law_data mapping."""

import json

import numpy as np
import pytest

from scaling.io import iter_jsonl, law_data, load_table, parse_columns, read_summaries


def test_csv_numeric_string_and_blank_columns(tmp_path):
    p = tmp_path / "runs.csv"
    p.write_text("name,params,tokens,loss\na,1e6,2e7,3.5\nb,2e6,,3.1\n")
    t = load_table(p)
    assert t["name"].dtype == object and list(t["name"]) == ["a", "b"]
    np.testing.assert_array_equal(t["params"], [1e6, 2e6])
    assert np.isnan(t["tokens"][1])
    # Excel's "CSV UTF-8" begins with a byte-order mark, which used to stick to the first column's name
    p.write_bytes(b"\xef\xbb\xbfparams,loss\n1e6,3.5\n")
    assert list(load_table(p)) == ["params", "loss"]


def test_jsonl_and_json_list(tmp_path):
    rows = [{"N": 1e6, "D": 2e7, "loss": 3.0, "cfg": {"lr": 1e-3}}, {"N": 2e6, "D": 4e7, "loss": 2.8}]
    p = tmp_path / "runs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = load_table(p)
    np.testing.assert_array_equal(t["N"], [1e6, 2e6])
    assert t["cfg.lr"][0] == 1e-3 and np.isnan(t["cfg.lr"][1])  # ragged rows: missing -> NaN
    q = tmp_path / "runs.json"
    q.write_text(json.dumps(rows))
    np.testing.assert_array_equal(load_table(q)["loss"], [3.0, 2.8])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        load_table(bad)


def test_iter_jsonl_line_numbers_blank_lines_and_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\r\n{"b": [3]}')  # blank/space-only lines, CRLF, no final newline
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"b": [3]})]
    p.write_text('{"a": 1}\n\n{"a": 2,}\n')

    class Bad(Exception):
        pass

    with pytest.raises(Bad, match=r"x\.jsonl:3: invalid JSON \(Expecting property name") as info:
        list(iter_jsonl(p, error=Bad))
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    with pytest.raises(ValueError, match=r"x\.jsonl:3: bad line at column 9$"):
        list(iter_jsonl(p, invalid="bad line at column {e.colno}"))
    p.write_text('{"a":\n')  # the position in a truncated line is within that line
    with pytest.raises(ValueError, match=r"x\.jsonl:1: at 1:6$"):
        list(iter_jsonl(p, invalid="at {e.lineno}:{e.colno}"))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(p))


def test_directory_of_summaries(tmp_path):
    for i, (n, loss) in enumerate([(1e6, 3.2), (4e6, 2.9)]):
        d = tmp_path / f"run{i}" / "out"
        d.mkdir(parents=True)
        summary = {"family": "dense", "params": n, "tokens": 20 * n, "flops": 120 * n * n,
                   "final_eval_loss": loss, "config": {"model": {"d_model": 64 * (i + 1)}}}
        (d / "summary.json").write_text(json.dumps(summary))
    t = read_summaries(tmp_path)
    assert list(t["run"]) == ["run0/out", "run1/out"]
    np.testing.assert_array_equal(t["config.model.d_model"], [64, 128])
    data = law_data(t, ["N", "D", "loss"], {"N": "params", "D": "tokens", "loss": "final_eval_loss"})
    np.testing.assert_array_equal(data["D"], [2e7, 8e7])
    with pytest.raises(ValueError, match="no nothing.json files"):
        read_summaries(tmp_path / "run0" / "out" / "..", filename="nothing.json")


def test_law_data_derives_tokens_and_reports(tmp_path):
    t = {"n": np.array([1e6, 2e6]), "c": np.array([6e13, 2.4e14]), "y": np.array([3.0, 2.9])}
    msgs = []
    out = law_data(t, ["N", "D", "loss"], parse_columns("N=n, C=c, loss=y"), log=msgs.append)
    np.testing.assert_allclose(out["D"], [1e7, 2e7])
    assert "derived D = C / (6 N)" in msgs[0]
    # A user FLOP model: 8 N FLOPs per token.
    out = law_data(t, ["N", "D", "loss"], {"N": "n", "C": "c", "loss": "y"}, flops_per_token=lambda n: 8 * n,
                   log=msgs.append)
    np.testing.assert_allclose(out["D"], [7.5e6, 1.5e7])
    assert "flops_per_token" in msgs[-1]
    out = law_data({"N": t["n"], "D": np.array([1e7, 2e7]), "loss": t["y"]}, ["C", "loss"], log=None)
    np.testing.assert_allclose(out["C"], [6e13, 2.4e14])


def test_law_data_errors_name_the_problem(tmp_path):
    t = {"n": np.array([1e6, np.nan, 3e6]), "d": np.array([1e7, 2e7, -1.0]),
         "loss": np.array([3.0, 2.0, 1.0]), "name": np.array(["a", "b", "c"], dtype=object)}
    with pytest.raises(ValueError, match="column 'params' \\(for N\\) not found; available columns"):
        law_data(t, ["N", "D", "loss"], {"N": "params"})
    with pytest.raises(ValueError, match="no column for 'D'.*D = C/\\(6N\\)"):
        law_data(t, ["N", "D", "loss"], {"N": "n"})
    with pytest.raises(ValueError, match="N: missing/NaN values in rows \\[1\\]"):
        law_data(t, ["N", "D", "loss"], {"N": "n", "D": "d"})
    with pytest.raises(ValueError, match="D: non-positive values in rows \\[2\\]"):
        law_data(t, ["N", "D", "loss"], {"N": "n", "D": "d"}, dropna=True, log=None)
    with pytest.raises(ValueError, match=r"not numeric: row 0 \(0-based data rows, header excluded\) holds"):
        law_data(t, ["N", "loss"], {"N": "name"})
    # A column with one bad cell names that cell and its row, not the column's first (valid) value; the
    # CSV reader's row 2 is the file's line 4.
    bad = tmp_path / "bad.csv"
    bad.write_text("N,loss\n1e6,3.0\n2e6,2.5\nabc,2.0\n")
    with pytest.raises(ValueError, match="column 'N' \\(for N\\) is not numeric: row 2 .* holds 'abc'"):
        law_data(load_table(bad), ["N", "loss"])
    with pytest.raises(ValueError, match="not VAR=COLUMN"):
        parse_columns("N:params")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_table(tmp_path / "missing.csv")


# --- command line -------------------------------------------------------------------------------------------
def _run(argv, capsys):
    from scaling.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


CHIN = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.34, "beta": 0.37}


def _chinchilla_loss(n, d, p=CHIN):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _isoflop_csv(path, noise=0.0):
    """isoFLOP profiles centred on the true optimum of a Chinchilla law: C, N, loss (no D column)."""
    from scaling.optimal import chinchilla_closed_form

    rng = np.random.default_rng(0)
    lines = ["flops,params,loss"]
    for c in np.geomspace(1e18, 1e22, 5):
        n_opt = float(chinchilla_closed_form(CHIN, np.array([c]))[0][0])
        for n in n_opt * np.geomspace(1 / 8, 8, 9):
            loss = _chinchilla_loss(n, c / (6 * n)) * (1 + noise * rng.normal())
            lines.append(f"{c:.6e},{n:.6e},{loss:.8f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_isoflop_recovers_exponent_and_writes_files(tmp_path, capsys):
    data = _isoflop_csv(tmp_path / "iso.csv")
    rc, out, err = _run(["isoflop", data, "--columns", "C=flops,N=params,loss=loss", "--out", tmp_path / "o"],
                        capsys)
    assert rc == 0, err
    a_true = CHIN["beta"] / (CHIN["alpha"] + CHIN["beta"])
    # The parabola in log N is an approximation of the profile: a small bias is expected on a +-8x grid.
    assert out["a"] == pytest.approx(a_true, abs=0.01) and out["a"] + out["b"] == pytest.approx(1.0, abs=1e-6)
    assert len(out["optima"]) == 5 and "derived D = C / (6 N)" not in err
    assert (tmp_path / "o" / "isoflop.json").is_file() and (tmp_path / "o" / "isoflop.png").stat().st_size > 0
    # --flops-per-token without a D column: D* = C / (k N*), so N* D* / C = 1/k (it was 1/6 whatever k)
    for k in (6, 8):
        rc, out, err = _run(["isoflop", data, "--columns", "C=flops,N=params,loss=loss", "--flops-per-token",
                             f"{k}N"], capsys)
        assert rc == 0, err
        assert [o["N"] * o["D"] / o["C"] for o in out["optima"]] == pytest.approx([1 / k] * 5, rel=1e-9)


def test_cli_pareto_matches_definition(tmp_path, capsys):
    rng = np.random.default_rng(1)
    flops, loss = rng.uniform(1, 10, 50).round(1), rng.uniform(2, 4, 50).round(2)
    csv = tmp_path / "runs.csv"
    body = "\n".join(f"r{i},{f},{lo}" for i, (f, lo) in enumerate(zip(flops, loss, strict=True)))
    csv.write_text("name,flops,loss\n" + body)
    rc, out, err = _run(["pareto", csv, "--objectives", "loss:min,flops:min", "--label", "name",
                         "--sigma", "0.05,0.1", "--n-boot", "200", "--out", tmp_path / "p"], capsys)
    assert rc == 0, err
    rows = {r["row"] for r in out["frontier"]}
    dominated = lambda i, j: (loss[j] <= loss[i] and flops[j] <= flops[i]) and (
        loss[j] < loss[i] or flops[j] < flops[i])
    expect = {i for i in range(50) if not any(dominated(i, j) for j in range(50))}
    assert rows == expect
    assert all(r["label"] == f"r{r['row']}" and 0 <= r["p_frontier"] <= 1 for r in out["frontier"])
    assert (tmp_path / "p" / "pareto.png").is_file()


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    data = _isoflop_csv(tmp_path / "iso.csv")
    rc, _, err = _run(["isoflop", data, "--columns", "C=compute,N=params,loss=loss"], capsys)
    assert rc == 2 and "column 'compute' (for C) not found" in err and "flops" in err
    rc, _, err = _run(["isoflop", tmp_path / "nope.csv"], capsys)
    assert rc == 2 and "not found" in err
    rc, _, err = _run(["pareto", data, "--objectives", "loss:best"], capsys)
    assert rc == 2 and "min or max" in err
    rc, _, err = _run(["optimum", "--fit", tmp_path / "missing.json", "--compute", "1e24"], capsys)
    assert rc == 2 and "fit file not found" in err


def test_cli_on_directory_of_trainer_summaries(tmp_path, capsys):
    """isoflop and pareto straight from run directories, using the summary.json keys as default columns."""
    from scaling.optimal import chinchilla_closed_form

    for c in (1e18, 1e19, 1e20):
        n_opt = float(chinchilla_closed_form(CHIN, np.array([c]))[0][0])
        for j, n in enumerate(n_opt * np.geomspace(1 / 6, 6, 7)):
            d = c / (6 * n)
            run = tmp_path / "runs" / f"c{c:.0e}_{j}"
            run.mkdir(parents=True)
            # realised FLOPs: whole steps put a run within 1% of its budget, so two runs of one budget can be
            # up to 2% apart (here the sorted values jump 1.2%, from 0.991 C to 1.003 C: split at rtol 0.01)
            jitter = (0.991, 1.003, 1.006, 1.009, 0.990, 1.004, 1.007)[j]
            summary = {"params": n, "tokens": d, "flops": c * jitter,
                       "final_eval_loss": _chinchilla_loss(n, d), "final_loss": 9.9, "config": {"seed": 0}}
            (run / "summary.json").write_text(json.dumps(summary))
    rc, out, err = _run(["isoflop", tmp_path / "runs"], capsys)
    assert rc == 0, err
    assert out["a"] == pytest.approx(CHIN["beta"] / (CHIN["alpha"] + CHIN["beta"]), abs=0.01)
    assert len(out["optima"]) == 3 and out["rejected"] == []  # one budget per planned C (rtol 2.5% for runs)
    rc, _, err = _run(["isoflop", tmp_path / "runs", "--budget-rtol", "1e-4"], capsys)
    assert rc == 2 and "need at least 3 distinct model sizes" in err
    rc, out, err = _run(["isoflop", tmp_path / "runs", "--budget-rtol", "1e-4", "--on-edge", "drop"], capsys)
    assert rc == 2 and "got 0 (21 rejected; C=" in err
    assert "need at least 3 distinct model sizes, got 1" in err
    rc, out, err = _run(["pareto", tmp_path / "runs", "--objectives", "final_eval_loss:min,flops:min",
                         "--label", "run"], capsys)
    assert rc == 0, err
    # The smallest budget's best run is on the frontier; every frontier point is its budget's best run.
    assert out["frontier"] and all(r["label"].startswith("c1e+") for r in out["frontier"])


def test_filter_rows():
    from scaling.io import filter_rows

    t = {"loss": np.array([3.0, 3.5, 4.0]), "family": np.array(["dense", "moe", "dense"], dtype=object)}
    np.testing.assert_array_equal(filter_rows(t, ["loss<=3.5"])["loss"], [3.0, 3.5])
    np.testing.assert_array_equal(filter_rows(t, ["loss>3", "family==dense"])["loss"], [4.0])
    with pytest.raises(ValueError, match="only == and !="):
        filter_rows(t, ["family<dense"])
    with pytest.raises(ValueError, match="no comparison"):
        filter_rows(t, ["loss"])


def _chinchilla_csv(path, n_points=60, noise=0.005):
    """Runs on a (N, C) grid with C-only columns, so the CLI must derive D = C / (6N)."""
    rng = np.random.default_rng(3)
    n = np.exp(rng.uniform(np.log(5e7), np.log(1e10), n_points))
    tpp = np.exp(rng.uniform(np.log(2), np.log(200), n_points))  # tokens per parameter
    d = tpp * n
    loss = _chinchilla_loss(n, d) * np.exp(noise * rng.normal(size=n_points))
    rows = [f"{a:.8e},{6 * a * b:.8e},{c:.8f}" for a, b, c in zip(n, d, loss, strict=True)]
    path.write_text("model_size,train_flops,final_loss\n" + "\n".join(rows) + "\n")
    return path


def test_cli_fit_then_optimum(tmp_path, capsys):
    from scaling.optimal import chinchilla_closed_form

    data = _chinchilla_csv(tmp_path / "runs.csv")
    out_dir = tmp_path / "fit"
    cols = "N=model_size,C=train_flops,loss=final_loss"
    argv = ["fit", data, "--law", "chinchilla", "--columns", cols, "--n-boot", "50", "--out", out_dir]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "derived D = C / (6 N)" in err
    saved = json.loads((out_dir / "fit.json").read_text())
    for key in ("law", "params", "ci", "objective", "n_points", "converged", "derived"):
        assert key in saved and key in out
    assert saved["law"] == "chinchilla" and saved["n_points"] == 60 and saved["converged"]
    p = saved["params"]
    assert p["alpha"] == pytest.approx(CHIN["alpha"], abs=0.05)
    assert p["beta"] == pytest.approx(CHIN["beta"], abs=0.05)
    assert p["E"] == pytest.approx(CHIN["E"], abs=0.1)
    a = p["beta"] / (p["alpha"] + p["beta"])
    assert saved["derived"]["a"] == pytest.approx(a) and saved["derived"]["b"] == pytest.approx(1 - a)
    for k, (lo, hi) in saved["ci"].items():
        assert lo <= p[k] <= hi, k
    assert (out_dir / "fit.png").stat().st_size > 0

    rc, opt, err = _run(["optimum", "--fit", out_dir / "fit.json", "--compute", "1e24"], capsys)
    assert rc == 0, err
    n_star, d_star, l_star = (float(v[0]) for v in chinchilla_closed_form(p, np.array([1e24])))
    assert opt["N"] == pytest.approx(n_star, rel=1e-6) and opt["D"] == pytest.approx(d_star, rel=1e-6)
    assert opt["loss"] == pytest.approx(l_star, rel=1e-9)
    assert opt["tokens_per_param"] == pytest.approx(d_star / n_star)
    assert 6 * opt["N"] * opt["D"] == pytest.approx(1e24)
    assert opt["N_ci"][0] <= opt["N"] <= opt["N_ci"][1]

    # a fit whose D was derived with 8N: optimum uses that FLOP model unless told otherwise
    rc, _, err = _run([*argv[:-1], tmp_path / "fit8", "--flops-per-token", "8N"], capsys)
    assert rc == 0, err
    rc, opt8, err = _run(["optimum", "--fit", tmp_path / "fit8" / "fit.json", "--compute", "1e24"], capsys)
    assert rc == 0 and "FLOP model 8N" in err and 8 * opt8["N"] * opt8["D"] == pytest.approx(1e24)
    rc, opt6, _ = _run(["optimum", "--fit", tmp_path / "fit8" / "fit.json", "--compute", "1e24",
                        "--flops-per-token", "6N"], capsys)
    assert rc == 0 and 6 * opt6["N"] * opt6["D"] == pytest.approx(1e24)
    saved8 = json.loads((tmp_path / "fit8" / "fit.json").read_text())
    (tmp_path / "fit8" / "fit.json").write_text(json.dumps({**saved8, "flops_per_token": "fpt_column"}))
    rc, _, err = _run(["optimum", "--fit", tmp_path / "fit8" / "fit.json", "--compute", "1e24"], capsys)
    assert rc == 2 and "per-row FLOPs column 'fpt_column'" in err and "--flops-per-token kN" in err


def test_cli_backtest_ranks_the_generating_form_and_writes_json(tmp_path, capsys):
    # exact FLOPs scatter within 0.5% of five budgets: 0.25-decade bins put each budget in one fold
    data = _isoflop_csv(tmp_path / "iso.csv", noise=0.002)
    text = (tmp_path / "iso.csv").read_text().splitlines()
    rng = np.random.default_rng(3)
    rows = [line.split(",") for line in text[1:]]
    text = [text[0]] + [f"{float(c) * (1 + 0.005 * rng.uniform(-1, 1)):.6e},{n},{y}" for c, n, y in rows]
    (tmp_path / "iso.csv").write_text("\n".join(text) + "\n")
    argv = ["backtest", data, "--laws", "kaplan,chinchilla", "--columns", "C=flops,N=params,loss=loss",
            "--bin-decades", "0.25", "--min-train", "3", "--out", tmp_path / "o"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert len(out["keys"]) == 5 and out["rows_used"] == 45 and out["common_test_keys"] == out["keys"][3:]
    assert out["ranking"] == ["chinchilla", "kaplan"]
    assert out["forms"]["chinchilla"]["mean_are_common"] < 0.005
    assert "rolling-origin backtest" in err and "derived D = C / (6 N)" in err
    assert json.loads((tmp_path / "o" / "backtest.json").read_text())["ranking"] == out["ranking"]
    # without binning every point is its own fold key: 45 keys
    rc, out, _ = _run([*argv[:-6], "--min-train", "40"], capsys)
    assert rc == 0 and len(out["keys"]) == 45
    cols = ["--columns", "C=flops,N=params"]
    rc, _, err = _run(["backtest", data, "--laws", "chinchilla,nope", *cols], capsys)
    assert rc == 2 and "unknown law 'nope'" in err
    rc, _, err = _run(["backtest", data, *cols, "--bin-decades", "0"], capsys)
    assert rc == 2 and "--bin-decades must be > 0, got 0.0" in err
    rc, _, err = _run(["backtest", data, *cols, "--bin-decades", "1", "--min-train", "5"], capsys)
    assert rc == 2 and "need at least 6" in err


def test_cli_fit_errors(tmp_path, capsys):
    data = _chinchilla_csv(tmp_path / "runs.csv", n_points=10)
    cols = "N=model_size,loss=final_loss"
    rc, _, err = _run(["fit", data, "--law", "chinchilla", "--columns", cols], capsys)
    assert rc == 2 and "no column for 'D'" in err and "train_flops" in err
    rc, _, err = _run(["fit", data, "--law", "nonexistent"], capsys)
    assert rc == 2 and "unknown law" in err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    csv = tmp_path / "t.csv"
    csv.write_text("flops,loss\n1,3\n2,2\n3,2.5\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "scaling", "pareto", str(csv), "--objectives", "flops,loss"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["row"] for r in json.loads(proc.stdout)["frontier"]] == [0, 1]
    proc = subprocess.run([sys.executable, "-m", "scaling", "pareto", str(csv), "--objectives", "x:min"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: objective columns ['x'] not found")


def test_cli_downstream_on_obsscaling(tmp_path, capsys):
    from pathlib import Path

    from scaling.downstream import heldout_error

    data = Path(__file__).parent / "data" / "obsscaling" / "base_llm_benchmark_eval.csv"
    rc, out, err = _run(["downstream", data, "--columns", "C=FLOPs (1E21),accuracy=ARC-C", "--chance", "0.25",
                         "--cutoff", "84", "--dropna", "--n-boot", "20", "--out", tmp_path], capsys)
    assert rc == 0, err
    t = load_table(data)
    ok = np.isfinite(t["FLOPs (1E21)"]) & np.isfinite(t["ARC-C"])
    ref = heldout_error(t["FLOPs (1E21)"][ok], t["ARC-C"][ok], cutoff=84, chance=0.25)
    assert out["heldout"] == pytest.approx(ref) and out["n_points"] == ok.sum()
    assert (tmp_path / "downstream.png").is_file()
    # --n-boot gives intervals in the JSON too (not only the figure's band)
    f = out["fit"]
    assert f["n_boot"] == 20 and f["ci_level"] == 0.95
    for k in ("mid", "slope"):
        assert f["ci"][k][0] < f["ci"][k][1]
    assert out["C_mid_ci"] == pytest.approx(np.exp(f["ci"]["mid"]))


def test_cli_isoflop_seed_noise_bootstrap(tmp_path, capsys):
    """--noise-sd: the interval comes from redrawing the losses with that sd (wider with more noise; the
    point estimate unchanged); a bad value or a missing --n-boot is a one-line error."""
    data = _isoflop_csv(tmp_path / "iso.csv")
    cols = ["--columns", "C=flops,N=params,loss=loss"]
    outs = {}
    for sd in ("0.002", "0.02", "porian"):
        rc, outs[sd], err = _run(["isoflop", data, *cols, "--n-boot", "200", "--noise-sd", sd], capsys)
        assert rc == 0, err
    width = {k: o["a_ci"][1] - o["a_ci"][0] for k, o in outs.items()}
    assert outs["0.002"]["a"] == outs["0.02"]["a"] and width["0.02"] > 3 * width["0.002"] > 0
    assert outs["porian"]["a_ci"][0] < outs["porian"]["a"] < outs["porian"]["a_ci"][1]
    rc, _, err = _run(["isoflop", data, *cols, "--n-boot", "10", "--noise-sd", "-1"], capsys)
    assert rc == 2 and "--noise-sd must be a positive number or 'porian', got '-1'" in err
    rc, _, err = _run(["isoflop", data, *cols, "--noise-sd", "0.01"], capsys)
    assert rc == 2 and "give --n-boot N too" in err


def test_cli_input_mistakes_are_named(tmp_path, capsys):
    """What a user's own table gets wrong is named, with exit status 2: percentages where accuracies belong
    (a sigmoid bounded by 1 "converged" on them to C_mid = 1e-59), a semicolon-separated or non-UTF-8 file,
    broken JSON, a unit in a Pareto objective, a bad count or budget, a run of a directory by its name."""
    acc = tmp_path / "acc.csv"
    pct = (25, 27, 40, 70, 90, 95)
    acc.write_text("C,accuracy\n" + "".join(f"1e{18 + i},{a}\n" for i, a in enumerate(pct)))
    rc, _, err = _run(["downstream", acc, "--chance", "0.25", "--n-boot", "0"], capsys)
    assert rc == 2 and "accuracy must be in [0, 1]" in err and "percentages? divide by 100" in err
    rc, _, err = _run(["downstream", acc, "--ceiling", "1.5"], capsys)
    assert rc == 2 and "--ceiling 1.5 must be in (chance = 0, 1]" in err
    tsv = tmp_path / "runs.tsv"  # tab-separated is read as such
    tsv.write_text("N\tD\tloss\n1e8\t2e9\t3.1\n")
    assert {k: float(v[0]) for k, v in load_table(tsv).items()} == {"N": 1e8, "D": 2e9, "loss": 3.1}
    semi = tmp_path / "semi.csv"
    semi.write_text("N;D;loss\n1;2;3\n")
    rc, _, err = _run(["fit", semi], capsys)
    assert rc == 2 and "semicolon-separated?" in err
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"N,D,loss\n1e8,2e9,3.1\xff\n")
    rc, _, err = _run(["fit", latin], capsys)
    assert rc == 2 and "latin.csv: not UTF-8 text" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,\n')
    rc, _, err = _run(["fit", broken], capsys)
    assert rc == 2 and "broken.json: invalid JSON" in err and "line 2" in err
    units = tmp_path / "units.csv"  # a blank cell first: the message names the unit, not the blank
    units.write_text("loss,flops\n,1e18\n2.5 nats,1e18\n2.4,2e18\n")
    rc, _, err = _run(["pareto", units, "--objectives", "loss:min,flops:min"], capsys)
    assert rc == 2 and "objective column 'loss' is not numeric: row 1" in err and "'2.5 nats'" in err
    rc, _, err = _run(["fit", units, "--columns", "N=loss,D=flops,loss=flops"], capsys)
    assert rc == 2 and "column 'loss' (for N) is not numeric: row 1" in err
    rc, _, err = _run(["downstream", acc, "--chance", "1"], capsys)
    assert rc == 2 and "--chance 1 must be in [0, 1)" in err
    data = _isoflop_csv(tmp_path / "iso.csv")
    rc, _, err = _run(["fit", data, "--columns", "C=flops,N=params,loss=loss", "--flops-per-token", "0N"],
                      capsys)
    assert rc == 2 and "must be > 0 (e.g. 6N)" in err
    for argv, flag in ((["fit", data, "--n-boot", "-5"], "--n-boot"),
                       (["optimum", "--fit", data, "--compute", "abc"], "--compute")):
        with pytest.raises(SystemExit) as e:
            _run(argv, capsys)
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    # a directory of runs: a bad summary is named by its run, not by a row of the sorted file list
    for name, loss in (("a", 3.0), ("b", None), ("c", 2.9)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        s = {"params": 1e6, "tokens": 2e7, "flops": 1.2e14, "final_eval_loss": loss}
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps(s))
    rc, _, err = _run(["fit", tmp_path / "runs", "--n-boot", "0"], capsys)
    assert rc == 2 and "loss: missing/NaN values in runs ['b']" in err


def test_cli_observational_joins_the_target_and_matches_the_library(tmp_path, capsys):
    from pathlib import Path

    from scaling.downstream import fit_accuracy_vs_compute
    from scaling.observational import capability_pca, fit_family_compute, fit_observational

    here = Path(__file__).parent / "data" / "obsscaling"
    bench, emergent = here / "base_llm_benchmark_eval.csv", here / "base_llm_emergent_capability_eval.csv"
    names = ["MMLU", "ARC-C", "HellaSwag", "Winograd", "TruthfulQA", "GSM8K", "XWinograd", "HumanEval"]
    rc, out, err = _run(["observational", bench, "--benchmarks", ",".join(names),
                         "--target", "arithmetic_3da_2_acc", "--join", emergent, "--compute", "FLOPs (1E21)",
                         "--family", "Model Family",
                         "--reference", "Llama-2", "--components", "2", "--cutoff", "84", "--n-boot", "20",
                         "--out", tmp_path], capsys)
    assert rc == 0, err
    assert "63 of 128 models have no 'arithmetic_3da_2_acc'" in err
    assert json.loads((tmp_path / "observational.json").read_text())["heldout"] == out["heldout"]
    # the same analysis by hand: join on the model name, PCA over all 128, fit on the 65 with the task
    t, e = load_table(bench), load_table(emergent)
    score = dict(zip(e["Model"], e["arithmetic_3da_2_acc"], strict=True))
    y = np.array([score.get(m, np.nan) for m in t["Model"]])
    x = np.stack([t[b] for b in names], axis=1)
    pca = capability_pca(x, 2)
    has = np.isfinite(y)
    fit = fit_observational(pca.scores[has], y[has])
    assert out["n_fitted"] == has.sum() == 65 and out["fit"]["weights"] == pytest.approx(fit.weights)
    assert out["pca"]["explained_variance_ratio"] == pytest.approx(pca.explained_variance_ratio)
    c = t["FLOPs (1E21)"]
    ok = np.isfinite(c)
    fam = fit_family_compute(pca.scores[ok], c[ok], t["Model Family"][ok])
    eff = out["efficiency_vs_reference"]["times_the_compute_reference_needs"]
    assert eff["Pythia"] == pytest.approx(fam.efficiency("Pythia", "Llama-2")) and eff["Llama-2"] == 1.0
    train, test = has & ok & (c < 84), has & ok & (c >= 84)
    pca_tr = capability_pca(x[train], 2)
    held = fit_observational(pca_tr.scores, y[train])
    mae = np.abs(held.predict(pca_tr.transform(x[test])) - y[test]).mean()
    comp = fit_accuracy_vs_compute(c[train], y[train])
    h = out["heldout"]
    assert (h["n_train"], h["n_test"]) == (43, 20) and h["mae"] == pytest.approx(mae)
    assert h["compute_only_mae"] == pytest.approx(np.abs(comp.predict(c[test]) - y[test]).mean())
    assert h["mae"] < h["compute_only_mae"] < h["baseline_mae"]  # measured: 0.036, 0.070, 0.742
    # the held-out fit's bootstrap (same seed, same draws) and the share of held-out scores inside its band
    boot = fit_observational(pca_tr.scores, y[train], n_boot=20, seed=0)
    lo, hi = boot.interval(pca_tr.transform(x[test]), level=0.9)
    assert h["coverage_of_90pct_band"] == pytest.approx(np.mean((y[test] >= lo) & (y[test] <= hi)))
    assert (tmp_path / "observational.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_observational_input_mistakes_are_named(tmp_path, capsys):
    p = tmp_path / "m.csv"
    p.write_text("Model,a,b,acc,flops\nm1,0.3,0.4,0.1,1\nm2,0.5,0.6,0.5,10\nm3,0.7,0.8,0.9,100\n"
                 "m1,0.2,0.2,0.2,2\n")
    rc, _, err = _run(["observational", p, "--benchmarks", "a,zz", "--target", "acc"], capsys)
    assert rc == 2 and "--benchmarks: column 'zz' not found" in err
    rc, _, err = _run(["observational", p, "--benchmarks", "a", "--target", "acc"], capsys)
    assert rc == 2 and "at least two" in err
    rc, _, err = _run(["observational", p, "--benchmarks", "a,b", "--target", "acc", "--join", p], capsys)
    assert rc == 2 and "key column 'Model' repeats ['m1']" in err
    rc, _, err = _run(["observational", p, "--benchmarks", "a,b", "--target", "acc", "--components", "1",
                       "--family", "Model"], capsys)
    assert rc == 2 and "--family needs --compute" in err
    rc, _, err = _run(["observational", p, "--benchmarks", "a,b", "--target", "acc", "--components", "1",
                       "--compute", "flops", "--cutoff", "5"], capsys)
    assert rc == 2 and "--cutoff 5 leaves 2 models to fit and 2 to predict" in err
    # a warning from the fit reaches the user as one line, and the command still answers
    rc, _, err = _run(["observational", p, "--benchmarks", "a,b", "--target", "acc", "--components", "1",
                       "--chance", "0.6"], capsys)
    assert rc == 0 and "warning: fit_observational: the fixed floor 0.6 lies above most of the scores" in err
    assert "UserWarning" not in err and "cli.py" not in err


def test_cli_where_filters_rows_before_the_analysis(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    # r0 dominates r1 and r2; with r0 filtered out, r1 and r2 join r3 on the frontier
    csv.write_text("name,flops,loss\nr0,1,1.0\nr1,2,2.0\nr2,3,1.5\nr3,4,0.5\n")
    argv = ["pareto", csv, "--objectives", "loss:min,flops:min", "--label", "name"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert sorted(r["label"] for r in out["frontier"]) == ["r0", "r3"]
    rc, out, err = _run([*argv, "--where", "flops>1"], capsys)
    assert rc == 0 and "--where kept 3 of 4 rows" in err
    assert out["n_points"] == 3 and sorted(r["label"] for r in out["frontier"]) == ["r1", "r2", "r3"]
    rc, out, err = _run([*argv, "--where", "flops>1", "--where", "name!=r2"], capsys)
    assert rc == 0 and sorted((r["label"], r["flops"]) for r in out["frontier"]) == [("r1", 2.0), ("r3", 4.0)]
    rc, _, err = _run([*argv, "--where", "flops>9"], capsys)
    assert rc == 2 and "no rows left after --where" in err


def test_cli_pareto_dropna_keeps_row_numbers_and_labels(tmp_path, capsys):
    csv = tmp_path / "runs.csv"
    # row 1 has no loss; of the rest, r2 (fewest FLOPs) and r3 (lowest loss) are the frontier
    csv.write_text("name,flops,loss\nr0,3,3.0\nr1,1,\nr2,1,3.5\nr3,2,2.0\nr4,4,4.0\n")
    argv = ["pareto", csv, "--objectives", "loss:min,flops:min", "--label", "name"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "missing values in rows [1] (use --dropna)" in err
    rc, out, err = _run([*argv, "--dropna"], capsys)
    assert rc == 0 and "dropped 1 rows with missing objective values" in err and out["n_points"] == 4
    front = sorted((r["row"], r["label"], r["loss"]) for r in out["frontier"])
    assert front == [(2, "r2", 3.5), (3, "r3", 2.0)]


def _runs_dir(root, losses):
    """Trainer run directories on three isoFLOP budgets, each summary.json holding the keys of ``losses``
    (name -> function of N and D)."""
    from scaling.optimal import chinchilla_closed_form

    for c in (1e18, 1e19, 1e20):
        n_opt = float(chinchilla_closed_form(CHIN, np.array([c]))[0][0])
        for j, n in enumerate(n_opt * np.geomspace(1 / 6, 6, 7)):
            d = c / (6 * n)
            run = root / f"c{c:.0e}_{j}"
            run.mkdir(parents=True)
            s = {"params": n, "tokens": d, "flops": c, **{k: f(n, d) for k, f in losses.items()}}
            (run / "summary.json").write_text(json.dumps(s))
    return root


def test_cli_run_directory_loss_defaults_and_overrides(tmp_path, capsys):
    a_true = CHIN["beta"] / (CHIN["alpha"] + CHIN["beta"])
    # only final_loss: it is the default loss column
    runs = _runs_dir(tmp_path / "a", {"final_loss": _chinchilla_loss})
    rc, out, err = _run(["isoflop", runs], capsys)
    assert rc == 0, err
    assert out["a"] == pytest.approx(a_true, abs=0.01)
    # --columns wins over the summary.json default: final_eval_loss here is a law whose optimum is elsewhere
    other = {**CHIN, "alpha": 0.6}
    runs = _runs_dir(tmp_path / "b", {"final_eval_loss": lambda n, d: _chinchilla_loss(n, d, other),
                                      "smoothed": _chinchilla_loss})
    rc, out, err = _run(["isoflop", runs, "--columns", "loss=smoothed"], capsys)
    assert rc == 0, err
    assert out["a"] == pytest.approx(a_true, abs=0.01)


def test_cli_flops_per_token_column_and_bare_n(tmp_path, capsys):
    data = _isoflop_csv(tmp_path / "iso.csv")
    lines = data.read_text().splitlines()
    # a per-row FLOPs-per-token column holding 8 N: D = C / (8 N), so N* D* / C = 1/8
    rows = [f"{line},{8 * float(line.split(',')[1]):.6e}" for line in lines[1:]]
    data.write_text("\n".join([lines[0] + ",fpt", *rows]) + "\n")
    cols = ["--columns", "C=flops,N=params,loss=loss"]
    for spec, k in (("fpt", 8), ("N", 1), ("2.5n", 2.5)):
        rc, out, err = _run(["isoflop", data, *cols, "--flops-per-token", spec], capsys)
        assert rc == 0, err
        # (the column is written to 7 significant digits)
        assert [o["N"] * o["D"] / o["C"] for o in out["optima"]] == pytest.approx([1 / k] * 5, rel=1e-5), spec


def test_cli_fit_dropna_counts_rows_used(tmp_path, capsys):
    data = _chinchilla_csv(tmp_path / "runs.csv", n_points=30)
    data.write_text(data.read_text() + "1e8,6e17,\n")  # a run without a loss: row 30
    argv = ["fit", data, "--columns", "N=model_size,C=train_flops,loss=final_loss", "--n-boot", "0"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "loss: missing/NaN values in rows [30]" in err
    rc, out, err = _run([*argv, "--dropna"], capsys)
    assert rc == 0, err
    assert out["rows_used"] == out["n_points"] == 30
    assert "dropped 1 rows with missing values: rows [30]" in err
    rc, out, err = _run([*argv, "--dropna", "--where", "model_size>=1e9"], capsys)
    assert rc == 0, err
    n = np.array([float(line.split(",")[0]) for line in data.read_text().splitlines()[1:31]])
    assert out["rows_used"] == out["n_points"] == int((n >= 1e9).sum())


def test_cli_downstream_rejects_zero_compute(tmp_path, capsys):
    acc = tmp_path / "acc.csv"
    acc.write_text("C,accuracy\n0,0.25\n1e19,0.3\n1e20,0.5\n1e21,0.7\n1e22,0.9\n")
    rc, _, err = _run(["downstream", acc, "--n-boot", "0"], capsys)
    assert rc == 2 and "compute must be > 0" in err


def test_cli_observational_join_counts_and_family_compute(tmp_path, capsys):
    from scaling.observational import capability_pca, fit_family_compute

    # ten models in two families; the joined table scores seven of them plus two models DATA lacks;
    # m9's compute is 0 (unknown): it is left out of the family fit, not an error
    c = np.array([1, 2, 4, 8, 16, 3, 6, 12, 24, 0.0])
    fam = ["f1"] * 5 + ["f2"] * 5
    u = np.log(np.where(c > 0, c, 5)) + np.array([0, 0.1, -0.1, 0.05, 0, 0.3, 0.25, 0.35, 0.3, 0.2])
    a, b = 0.2 + 0.1 * u, 0.1 + 0.15 * u + 0.02 * np.sin(np.arange(10))
    acc = 1 / (1 + np.exp(-(u - 1.5)))
    data, join = tmp_path / "models.csv", tmp_path / "task.csv"
    data.write_text("Model,a,b,flops,family\n" + "".join(
        f"m{i},{a[i]:.6f},{b[i]:.6f},{c[i]:g},{fam[i]}\n" for i in range(10)))
    scored = [0, 1, 2, 3, 5, 6, 7]
    join.write_text("Model,acc\n" + "".join(f"m{i},{acc[i]:.6f}\n" for i in scored) + "x1,0.5\nx2,0.6\n")
    rc, out, err = _run(["observational", data, "--benchmarks", "a,b", "--target", "acc", "--join", join,
                         "--components", "1", "--n-boot", "0", "--compute", "flops", "--family", "family"],
                        capsys)
    assert rc == 0, err
    assert "2 models of" in err and "are not in DATA (e.g. ['x1', 'x2'])" in err
    assert "3 of 10 models have no 'acc'" in err
    assert out["n_models"] == 10 and out["n_fitted"] == 7
    x = np.round(np.stack([a, b], axis=1), 6)
    scores = capability_pca(x, 1).scores
    ref = fit_family_compute(scores[:9], c[:9], fam[:9])
    assert out["family_fit"]["n_models"] == {"f1": 5, "f2": 4}
    assert out["family_fit"]["slope"] == pytest.approx(np.atleast_1d(ref.slope).tolist())
