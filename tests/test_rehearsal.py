"""The --dry rehearsal (experiments/rehearsal.py): the GPU presets' real plans, cut to a few steps, keep every
run, shape, dtype and WSD link; a trimmed gpu-quick rehearsal trains and reports end to end on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import study
from experiments.config import ExperimentConfig
from experiments.rehearsal import rehearse
from experiments.report import validate_report
from experiments.study_presets import get_study_preset
from optim.schedules import wsd_decay_start


def _real_plan(name, tmp_path):
    spec = get_study_preset(name)
    return spec, study.plan_lr_stage(spec, tmp_path) + study.plan_main_stage(spec, tmp_path, {})


@pytest.mark.parametrize("preset", ["gpu-quick", "gpu-full"])
def test_rehearsal_keeps_the_plan_and_cuts_only_steps_batch_and_data(preset, tmp_path):
    spec, real = _real_plan(preset, tmp_path)
    cut = rehearse(real, steps=3, devices=8)
    assert [(r.name, r.kind, r.group, r.fit) for r in cut] == [(r.name, r.kind, r.group, r.fit) for r in real]
    kinds = {r.kind for r in cut}
    assert {"isoflop", "heldout", "wsd_stable", "wsd_branch"} <= kinds
    by_name = {r.name: r for r in cut}
    n_train = {r.config["data"]["n_train_tokens"] for r in cut}
    assert len(n_train) == 1  # one shared corpus
    for r0, r in zip(real, cut, strict=True):
        a, b = ExperimentConfig.from_dict(r0.config), ExperimentConfig.from_dict(r.config)
        assert a.model.attention_impl == "cudnn" and b.model.attention_impl == "xla"
        assert dataclasses.replace(b.model, attention_impl="cudnn") == a.model  # shapes and dtypes kept
        assert r.params == r0.params and r.flops_per_token == r0.flops_per_token
        assert b.data.seq_len == a.data.seq_len and b.data.synthetic == a.data.synthetic
        # gpu-full's runs read up to 3.5e10 tokens: streamed from the source, never repeated (test_stream.py)
        assert b.data.stream == a.data.stream == (preset == "gpu-full")
        assert b.optimizer.learning_rate == a.optimizer.learning_rate
        assert b.optimizer.schedule == a.optimizer.schedule and b.optimizer.warmup_steps == 1
        assert b.data.batch_size == 8 and b.trainer.eval_steps == 1
        assert r.run_id != r0.run_id
        if r.parent is None:
            assert r.steps == min(3, r0.steps)
        else:
            parent = by_name[r.parent["run"]]
            assert r.parent["step"] == parent.steps  # seeded from the parent's last checkpoint
            if r.kind == "wsd_branch":  # its cool-down starts exactly where the stable phase stopped, and
                # lasts the 2 steps that decay at all (at 0.2 of 4 steps it was 1 step, at the peak)
                assert wsd_decay_start(b.optimizer, r.steps) == parent.steps
                assert r.steps - parent.steps >= 2
            else:
                assert r.steps == parent.steps + 3
    assert max(r.steps * r.batch_size for r in cut) * cut[0].config["data"]["seq_len"] <= min(
        r.config["data"]["n_train_tokens"] for r in cut
    )
    with pytest.raises(ValueError, match="steps must be >= 2"):
        rehearse(real, steps=1)


def test_dry_study_trains_fits_and_reports_a_trimmed_gpu_quick(tmp_path, capsys):
    spec = dataclasses.replace(
        get_study_preset("gpu-quick"),
        budgets=(3e14,),
        sizes_per_budget=2,
        heldout_budgets=(1e15,),
        wsd_sizes=1,
        n_bootstrap=4,
        downstream=False,  # the battery on this 1024-token corpus: test_tasks.py (the full --dry run: README)
    )
    out = tmp_path / "dry"
    report = study.run_study(spec, out, workers=1, executor="sequential", dry=True, dry_steps=2)
    validate_report(report)
    assert report["notes"][0] == study.REHEARSAL_NOTE
    assert "REHEARSAL" in (out / "report.md").read_text()
    runs = report["runs"]
    assert {r["kind"] for r in runs} == {"isoflop", "heldout", "wsd_stable", "wsd_branch"}
    assert all(r["status"] == "done" for r in runs), [(r["name"], r["error"]) for r in runs]
    assert json.loads((out / study.REHEARSAL_FILE).read_text())["preset"] == "gpu-quick"
    for r in runs:  # the real shapes trained, for a few steps
        s = json.loads((out / "runs" / r["run_id"] / "summary.json").read_text())
        assert s["steps"] == r["steps"] <= 5 and r["params"] > 1e5
    # the rehearsal directory and a real study directory are never mixed up
    with pytest.raises(SystemExit, match="holds a --dry rehearsal"):
        study.run_study(spec, out, workers=1, executor="sequential")
    real = tmp_path / "real"
    real.mkdir()
    (real / "plan.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds a real study"):
        study.run_study(spec, real, workers=1, executor="sequential", dry=True)
