"""experiments/lr_annealing_check.py end to end on a few steps: three schedules trained, each curve predicted
from the other two by both loss-curve laws and a no-annealing baseline, and the per-step learning rates it
fits with are the ones the trainer used."""

import json

import numpy as np

from experiments import lr_annealing_check
from experiments.metrics import read_metrics
from experiments.presets import get_preset
from scaling.lr_annealing import DECAYS


def test_check_trains_three_schedules_and_reports_each_held_out_curve(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "60", "--eval-every", "10", "--fit-from", "10",
            "--bootstrap", "20"]
    assert lr_annealing_check.main(args) == 0
    report = json.loads((tmp_path / "lr_annealing.json").read_text())
    assert (tmp_path / "lr_annealing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["fit_from"] == 10 and sorted(report["held_out"]) == ["constant", "cosine", "wsd"]
    for name, row in report["held_out"].items():
        assert row["n_points"] == 6, name  # validation at steps 10, 20, ..., 60
        for law in ("lr_annealing", "multipower", "no_annealing"):
            assert np.isfinite([row[law]["mean_abs_rel_err"], row[law]["final_rel_err"]]).all(), (name, law)
        assert row["lr_annealing"]["fit"]["decay"] in DECAYS and len(row["multipower"]["fit"]["params"]) == 7
        for law in ("lr_annealing", "multipower"):  # each law's 90% band for a measurement, from 20 refits
            band = row[law]["band"]
            if "error" in band:  # 7 parameters on 12 points: an unconverged fit's refits may all fail too
                assert law == "multipower" and row[law]["fit"]["converged"] is False, (name, band)
                assert band["error"] == "none of the 20 bootstrap refits converged"
                continue
            assert 1 <= band["n_converged"] <= 20 and 0 <= band["coverage"] <= 1, (name, law)
            assert band["final"][0] < band["final"][1] and set(band["blocks"]) == {"0", "1"}, (name, law)
        assert "error" not in row["lr_annealing"]["band"]
        assert "band" not in row["no_annealing"]
    # the schedule each update used, as the trainer logged it (update t takes the schedule at count t - 1)
    for name in lr_annealing_check.SCHEDULES:
        cfg = get_preset("tiny").override([f"optimizer.schedule={name}", "trainer.steps=60"]).validate()
        lr = lr_annealing_check.per_step_lr(cfg)
        logged = [(r["step"], r["lr"]) for r in read_metrics(tmp_path / name) if "lr" in r]
        assert len(logged) >= 3
        np.testing.assert_allclose([lr[s - 1] for s, _ in logged], [v for _, v in logged], rtol=1e-6)
    lr_wsd = lr_annealing_check.per_step_lr(
        get_preset("tiny").override(["optimizer.schedule=wsd", "trainer.steps=60"]).validate())
    assert lr_wsd[47] == lr_wsd.max() and lr_wsd[-1] < 0.5 * lr_wsd.max()  # the cooldown is the last 20%
    # a rerun reuses the three finished runs and refits to the same numbers
    capsys.readouterr()
    assert lr_annealing_check.main(args) == 0
    assert json.loads((tmp_path / "lr_annealing.json").read_text()) == report
    assert lr_annealing_check.main([*args[:-1], "-1"]) == 2
    assert "--bootstrap must be >= 0" in capsys.readouterr().err
