"""Trainer tests on a very small model: sharding equivalence, exact resume, cross-mesh restore, NaN stop,
learning with AdamW and Muon, summary.json, and the CLI end to end.

Runs are shared through module fixtures because every ``train`` call compiles its step (the slow part).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import train as train_cli
from experiments.checkpoint import Checkpointer
from experiments.config import ConfigError
from experiments.metrics import read_metrics
from experiments.presets import get_preset
from experiments.trainer import NonFiniteLossError, build_program, train
from models import accounting

SUMMARY_KEYS = {
    "family",
    "optimizer",
    "params",
    "non_embedding_params",
    "embedding_params",
    "tokens",
    "flops_per_token",
    "flops",
    "steps",
    "final_loss",
    "final_eval_loss",
    "entropy_floor",
    "tokens_per_second",
    "wall_seconds",
    "seed",
    "config",
}


class Interrupt(Exception):
    pass


def interrupt_at(k):
    def hook(step):
        if step == k:
            raise Interrupt(step)

    return hook


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def small_cfg(data_dir, *overrides):
    # Async checkpointing on purpose: the exact-resume test then also shows that donating the state to the
    # next step while orbax writes in the background does not corrupt a checkpoint.
    base = [
        "model.vocab_size=64",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.max_seq_len=16",
        "data.synthetic.vocab_size=64",
        "data.synthetic.successors=[4, 2]",
        f"data.synthetic_dir={data_dir}",
        "data.n_train_tokens=20000",
        "data.n_val_tokens=2048",
        "data.seq_len=16",
        "data.batch_size=8",
        "trainer.steps=6",
        "trainer.microbatches=2",
        "trainer.eval_every=3",
        "trainer.eval_steps=2",
        "trainer.eval_batch_size=8",
        "trainer.log_every=1",
        "trainer.checkpoint_every=3",
        "trainer.async_checkpoint=true",
        "trainer.progress=false",
        "optimizer.learning_rate=0.01",
        "optimizer.warmup_steps=2",
    ]
    return get_preset("tiny").override(base + list(overrides)).validate()


ONE = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
# peak_flops is execution-only (a resume on one device may drop it): the 8-device runs also log MFU
EIGHT = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "trainer.peak_flops=1e12")


def run(cfg, workdir, n_devices, **kw):
    return train(cfg, workdir, devices=jax.devices()[:n_devices], log=lambda s: None, **kw)


def final_params(workdir, step):
    """Params of the checkpoint at ``step`` as host numpy arrays (restored with their saved layout)."""
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, restored["params"])


def assert_params_close(a, b, tol=1e-4):
    # Relative difference per tensor, not per element: Adam divides by sqrt(v), so an element whose gradient
    # is ~0 turns fp32 reduction-order noise into a visible (but harmless) per-element difference.
    def check(x, y):
        assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y), (np.linalg.norm(x - y), np.linalg.norm(y))

    jax.tree.map(check, a, b)


def curve(workdir, key):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("one")
    summary = run(small_cfg(data_dir, *ONE), wd, 1)
    return wd, summary


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("eight")
    summary = run(small_cfg(data_dir, *EIGHT), wd, 8)
    return wd, summary


def test_eight_devices_match_one_device(one_device_run, eight_device_run, data_dir):
    one_device_cfg = small_cfg(data_dir, *ONE)
    (wd1, s1), (wd8, s8) = one_device_run, eight_device_run
    for key in ("loss", "grad_norm", "eval_loss"):
        c1, c8 = curve(wd1, key), curve(wd8, key)
        assert c1.keys() == c8.keys() and len(c1) >= 2
        np.testing.assert_allclose(
            [c8[k] for k in sorted(c8)], [c1[k] for k in sorted(c1)], rtol=2e-5, err_msg=key
        )
    assert s8["final_eval_loss"] == pytest.approx(s1["final_eval_loss"], rel=2e-5)
    # The run actually changed the loss (else equal curves would prove little).
    losses = curve(wd1, "loss")
    assert abs(losses[6] - losses[1]) > 0.05
    p1, p8 = final_params(wd1, 6), final_params(wd8, 6)
    assert_params_close(p8, p1)
    # MFU = model FLOPs per second over the peak of all 8 devices (1e12 each), per record and in the summary.
    fpt = s8["flops_per_token"]
    assert fpt == accounting.flops_per_token(one_device_cfg.model, 16)["training"]
    records = [r for r in read_metrics(wd8) if "loss" in r]
    assert len(records) == 6 and all("mfu" not in r for r in read_metrics(wd1))
    for r in records:
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_second"] / (8 * 1e12), rel=1e-9)
    assert s8["mfu"] == pytest.approx(fpt * s8["tokens_per_second"] / (8 * 1e12), rel=1e-9)


def test_resume_is_exact(tmp_path, data_dir, one_device_run):
    wd1, s1 = one_device_run
    cfg = small_cfg(data_dir, *ONE)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path, 1, on_step=interrupt_at(5))  # checkpoint at 3, metrics written up to 5
    assert max(r["step"] for r in read_metrics(tmp_path)) == 5
    s = run(cfg, tmp_path, 1)  # resumes from step 3
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("step_time", "tokens_per_second")} for r in rs
    ]
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(wd1))
    a, b = final_params(tmp_path, 6), final_params(wd1, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert s["final_loss"] == s1["final_loss"] and s["final_eval_loss"] == s1["final_eval_loss"]
    # The resumed session continues the checkpoint's bookkeeping: the timed tokens of steps 1-3 (kept from the
    # first session) and 4-6 (its own), and more training and wall time than at step 3.
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    assert ckpt.all_steps() == [3, 6]
    meta3, meta6 = ckpt.restore_meta(3), ckpt.restore_meta(6)
    ckpt.close()
    assert meta3["timed_tokens"] == 3 * 8 * 16 and meta6["timed_tokens"] == 6 * 8 * 16
    assert meta6["train_seconds"] > meta3["train_seconds"] and meta6["wall_seconds"] > meta3["wall_seconds"]
    assert meta6["last_loss"] == curve(wd1, "loss")[6]
    # Finished: running again does no work and returns the same summary.
    before = (tmp_path / "metrics.jsonl").read_text()
    assert run(cfg, tmp_path, 1) == s
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_each_step_trains_on_its_own_batch(tmp_path, data_dir, monkeypatch):
    """A batch is a pure function of (seed, step): step k (0-based) trains on train_batch(k), each made once
    (the next one while a step runs), in a fresh session and in one resumed from the step-3 checkpoint."""
    import dataclasses

    import experiments.trainer as trainer_mod

    made, fed = [], []  # (batch, step) of each batch made; the step each train step's batch was made for
    real_batch, real_build = trainer_mod.train_batch, trainer_mod.build_program

    def train_batch(ds, cfg, prog, step, stream=None):
        batch = real_batch(ds, cfg, prog, step, stream)
        made.append((batch, step))
        return batch

    def build_program(cfg, mesh):
        prog = dataclasses.replace(real_build(cfg, mesh))  # a copy: the memoised program stays as it is
        step = prog.step

        def recording_step(state, batch):
            fed.append(next(k for b, k in made if b is batch))
            return step(state, batch)

        prog.step = recording_step
        return prog

    monkeypatch.setattr(trainer_mod, "train_batch", train_batch)
    monkeypatch.setattr(trainer_mod, "build_program", build_program)
    cfg = small_cfg(data_dir, *ONE)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path, 1, on_step=interrupt_at(4))
    assert fed == [0, 1, 2, 3] and [k for _, k in made] == [0, 1, 2, 3, 4]
    made.clear()
    fed.clear()
    run(cfg, tmp_path, 1)  # resumes from the checkpoint of step 3 (1-based): 0-based steps 3, 4, 5
    assert fed == [3, 4, 5] and [k for _, k in made] == [3, 4, 5]


def test_resume_survives_a_crash_mid_write(tmp_path, data_dir, one_device_run):
    """What a kill mid-write leaves: a torn last metrics line and an empty (never completed) newer checkpoint
    step. The resume drops the torn line, sets the broken step aside (named), resumes from the good step and
    still reproduces the uninterrupted run exactly. A torn summary.json of a finished run is rewritten from
    its final checkpoint instead of failing every retry."""
    wd1, s1 = one_device_run
    cfg = small_cfg(data_dir, *ONE)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path, 1, on_step=interrupt_at(5))  # checkpoint at 3
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 3.5')
    (tmp_path / "checkpoints" / "6").mkdir()  # orbax now reports step 6 as the latest
    logs = []
    s = train(cfg, tmp_path, devices=jax.devices()[:1], log=logs.append)
    assert any(re.search(r"checkpoint step 6 is unreadable .*moved to .*checkpoints_unreadable/6-.*resuming "
                         r"from step 3", m) for m in logs), logs
    assert any(re.search(r"metrics.jsonl:\d+: dropped a torn last record", m) for m in logs), logs
    assert s["final_eval_loss"] == s1["final_eval_loss"]
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path, 6), final_params(wd1, 6))
    summary = (tmp_path / "summary.json").read_text()
    (tmp_path / "summary.json").write_text(summary[: len(summary) // 2])
    logs.clear()
    again = train(cfg, tmp_path, devices=jax.devices()[:1], log=logs.append)
    assert again["final_eval_loss"] == s["final_eval_loss"]
    assert any("summary.json is unreadable" in m for m in logs)
    assert json.loads((tmp_path / "summary.json").read_text())["final_eval_loss"] == s["final_eval_loss"]


def test_read_metrics_names_a_bad_line_and_drops_only_a_torn_tail(tmp_path):
    from experiments.data import DataError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: unreadable metrics record"):
        read_metrics(tmp_path)
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):  # not the last line: not a torn write
        read_metrics(tmp_path, drop_torn_tail=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path, drop_torn_tail=True) == [{"step": 1, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": "1"}\n')
    with pytest.raises(DataError, match="not a JSON object with an integer 'step'"):
        read_metrics(tmp_path)


def test_unreadable_checkpoints_and_unusable_data_are_named_before_training(tmp_path, data_dir):
    """No readable checkpoint: CheckpointError names the directory and moves nothing. A dataset without a
    val split, or a text dataset with the synthetic task battery asked for, is refused before any step
    (these were found only at the final evaluation, after all the training)."""
    from experiments.checkpoint import CheckpointError
    from experiments.data import DataError, _write_metadata, write_split

    cfg = small_cfg(data_dir, *ONE)
    (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*run/checkpoints could be restored \(steps "
                       r"\[3\]\).*move that directory away"):
        run(cfg, tmp_path / "run", 1)
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    text = tmp_path / "text"
    text.mkdir()
    rng = np.random.default_rng(0)
    meta = {"vocab_size": 64, "dtype": "uint16", "n_tokens": {}}
    for split in ("train", "val"):
        meta["n_tokens"][split] = write_split(text, split, rng.integers(0, 64, 5000), 64)["n_tokens"]
        if split == "train":
            _write_metadata(text, meta)
            with pytest.raises(DataError, match=r"has no 'val' split \(it has \['train'\]\)"):
                run(small_cfg(data_dir, *ONE, f"data.path={text}"), tmp_path / "a", 1)
    _write_metadata(text, meta)
    with pytest.raises(ConfigError, match="eval_tasks: the built-in downstream battery needs a synthetic"):
        run(small_cfg(data_dir, *ONE, f"data.path={text}", "trainer.eval_tasks=true"), tmp_path / "b", 1)
    for d in ("a", "b"):
        assert not any((tmp_path / d / "checkpoints").iterdir())


def test_async_metrics_give_the_same_run_and_resume_exactly(tmp_path, data_dir, one_device_run):
    """trainer.async_metrics=true (fetch step s's metrics after dispatching s+1; the CPU default is off):
    the same metrics, checkpoints and parameters as the synchronous run, also across an interruption."""
    wd1, s1 = one_device_run
    cfg = small_cfg(data_dir, *ONE, "trainer.async_metrics=true", "trainer.eval_every=0")
    ref = small_cfg(data_dir, *ONE, "trainer.eval_every=0")
    # steps 1, 2, 4, 5 are not checkpoint steps: there the loop runs one step ahead of the metrics
    with pytest.raises(Interrupt):
        run(cfg, tmp_path / "async", 1, on_step=interrupt_at(5))
    assert max(r["step"] for r in read_metrics(tmp_path / "async")) == 5
    s_async = run(cfg, tmp_path / "async", 1)
    s_sync = run(ref, tmp_path / "sync", 1)
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("step_time", "tokens_per_second")} for r in rs
    ]
    assert strip(read_metrics(tmp_path / "async")) == strip(read_metrics(tmp_path / "sync"))
    assert curve(tmp_path / "async", "loss") == {k: v for k, v in curve(wd1, "loss").items()}
    for step in (3, 6):
        jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "async", step),
                     final_params(tmp_path / "sync", step))
    assert s_async["final_loss"] == s_sync["final_loss"] == s1["final_loss"]


def test_async_metrics_default_is_off_on_cpus_and_on_on_accelerators():
    """trainer.async_metrics=None resolves by the mesh's platform (measured slower on a CPU, where the
    "device" is the host's own cores); an explicit setting wins."""
    from types import SimpleNamespace

    from experiments import sharding as shd
    from experiments.config import MeshConfig
    from experiments.trainer import async_metrics

    cpu = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")], dtype=object))
    assert async_metrics(None, cpu) is False and async_metrics(None, gpu) is True
    assert async_metrics(True, cpu) is True and async_metrics(False, gpu) is False


def test_checkpoint_from_eight_devices_resumes_on_one(tmp_path, data_dir, one_device_run, eight_device_run):
    (wd1, _), (wd8, _) = one_device_run, eight_device_run
    with pytest.raises(Interrupt):
        run(small_cfg(data_dir, *EIGHT), tmp_path, 8, on_step=interrupt_at(4))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    assert ckpt.latest_step() == 3
    ckpt.close()
    run(small_cfg(data_dir, *ONE), tmp_path, 1)  # mesh settings may change on resume
    resumed = curve(tmp_path, "loss")
    # Steps 1..3 come from the 8-device session (kept), 4..6 were computed on one device from its checkpoint.
    assert [resumed[k] for k in (1, 2, 3)] == [curve(wd8, "loss")[k] for k in (1, 2, 3)]
    np.testing.assert_allclose(
        [resumed[k] for k in range(1, 7)], [curve(wd1, "loss")[k] for k in range(1, 7)], rtol=2e-5
    )
    assert_params_close(final_params(tmp_path, 6), final_params(wd1, 6))


def test_summary_has_schema_and_consistent_values(one_device_run, data_dir):
    wd, s = one_device_run
    assert SUMMARY_KEYS <= set(s)
    on_disk = json.loads((wd / "summary.json").read_text())
    assert on_disk == s
    cfg = small_cfg(data_dir, *ONE)
    assert s["steps"] == 6 and s["tokens"] == 6 * 8 * 16
    assert s["flops_per_token"] == accounting.flops_per_token(cfg.model, 16)["training"]
    assert s["flops"] == pytest.approx(s["flops_per_token"] * s["tokens"])
    n_params = sum(x.size for x in jax.tree.leaves(final_params(wd, 6)))
    assert s["params"] == n_params == s["embedding_params"] + s["non_embedding_params"]
    meta = json.loads((Path(data_dir) / "metadata.json").read_text())
    assert s["entropy_floor"] == meta["entropy_rate"] and s["unigram_entropy"] == meta["unigram_entropy"]
    assert 0 < s["entropy_floor"] < s["unigram_entropy"] < math.log(64)
    assert s["final_loss"] == curve(wd, "loss")[6] and s["final_eval_loss"] == curve(wd, "eval_loss")[6]
    # Step k's record (1-based) is after k steps of 8 x 16 tokens, logged with the lr that step used,
    # lr(k - 1): linear warmup to 0.01 over 2 steps, then cosine to min_lr_ratio 0.1 at step 6
    # (optim/schedules.py).
    assert curve(wd, "tokens") == {k: k * 8 * 16 for k in range(1, 7)}
    cosine = lambda s: 0.01 * (0.1 + 0.9 * (1 + math.cos(math.pi * (s - 2) / 4)) / 2)
    lrs = curve(wd, "lr")
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([lrs[k] for k in range(1, 7)], [0.005, 0.01, *map(cosine, range(2, 6))],
                               rtol=1e-5)
    # One eval record per eval step (3, and the final one at 6) and the checkpoints of steps 3 and 6.
    assert [r["step"] for r in read_metrics(wd) if "eval_loss" in r] == [3, 6]
    ckpt = Checkpointer(wd / "checkpoints", keep=2, async_save=False)
    assert ckpt.all_steps() == [3, 6]
    # The timed tokens of the last checkpoint are all the run's tokens.
    assert ckpt.restore_meta(6)["timed_tokens"] == 6 * 8 * 16
    ckpt.close()
    assert s["tokens_per_second"] > 0 and s["wall_seconds"] > 0 and s["seed"] == 0
    assert s["config"]["trainer"]["steps"] == 6 and s["optimizer"] == "adamw" and s["family"] == "dense"
    assert json.loads((wd / "config.json").read_text()) == s["config"]
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    # passes over the train split, and the distinct validation tokens scored (2 steps x 8 windows of 16)
    assert s["epochs"] == pytest.approx(6 * 8 * 16 / meta["n_tokens"]["train"]) and s["eval_tokens"] == 256


def test_repeated_training_data_is_warned_and_counted(tmp_path, data_dir):
    """More training tokens than the train split holds: windows are drawn with replacement, so data repeats,
    and a law reading summary.json's tokens as D would take them as unique. Named when training starts."""
    from experiments.trainer import data_warnings, open_dataset

    cfg = small_cfg(data_dir, *ONE, "trainer.steps=200", "trainer.eval_every=0", "trainer.checkpoint_every=0")
    ds = open_dataset(cfg, tmp_path)
    (warning,) = data_warnings(cfg, ds)
    assert warning.startswith("25,600 training tokens from a 20,000-token train split")
    assert "1.28 epochs" in warning
    assert data_warnings(small_cfg(data_dir, *ONE), ds) == []  # 768 tokens: no warning


@pytest.mark.parametrize("async_metrics", ["false", "true"])
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, data_dir, async_metrics):
    cfg = small_cfg(
        data_dir,
        *ONE,
        "optimizer.learning_rate=1e30",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "optimizer.grad_clip_norm=null",
        # every step with synchronous metrics; with async ones every third, so the non-finite step 2 is seen
        # only after step 3 (a checkpoint step) has been dispatched, and step 3 must not be checkpointed
        f"trainer.checkpoint_every={1 if async_metrics == 'false' else 3}",
        "trainer.microbatches=1",
        f"trainer.async_metrics={async_metrics}",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss at step (\d+).*Last good checkpoint"
    ):
        run(cfg, tmp_path, 1)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    good = ckpt.latest_step()
    ckpt.close()
    bad_step = max(r["step"] for r in read_metrics(tmp_path))
    if async_metrics == "false":
        assert good is not None and good == bad_step - 1
        params = final_params(tmp_path, good)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    else:
        assert bad_step == 2 and good is None
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_non_finite_step_leaves_the_state_untouched(data_dir):
    """The step itself (not only the host loop) refuses a non-finite update: an inf embedding entry makes
    the loss and the gradients NaN, and the returned state is the input state, parameters and optimiser
    state alike (the bench and notebooks call Program.step directly)."""
    from experiments import sharding as shd

    cfg = small_cfg(data_dir, *ONE)
    prog = build_program(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    host = jax.device_get(prog.init_state())
    host["params"]["embed"]["embedding"] = np.array(host["params"]["embed"]["embedding"])
    host["params"]["embed"]["embedding"][5, 0] = np.inf
    tokens = np.full((2, 4, 17), 5, dtype=np.int32)
    state = jax.device_put(host, prog.state_shardings)
    new, m = prog.step(state, shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape))
    assert not math.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new), host)


def test_a_non_finite_gradient_norm_alone_stops_the_run(tmp_path, data_dir, monkeypatch):
    """A finite loss with an inf/NaN gradient norm is a non-finite step too: the step did not apply its
    update, so going on would silently skip it. Step 2's grad_norm is made inf here."""
    import dataclasses

    import jax.numpy as jnp

    import experiments.trainer as trainer_mod

    def with_inf_grad_norm_at_step_2(cfg, mesh):
        prog = dataclasses.replace(build_program(cfg, mesh))  # a copy: the memoised program stays as it is
        calls = []

        def step(state, batch):
            new, m = prog.train_step(state, batch, prog.hyper)
            calls.append(1)
            return new, ({**m, "grad_norm": jnp.float32(jnp.inf)} if len(calls) == 2 else m)

        prog.step = step
        return prog

    monkeypatch.setattr(trainer_mod, "build_program", with_inf_grad_norm_at_step_2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 2 \(loss=[0-9.]+, "
                       r"grad_norm=inf\).*Last good checkpoint: none"):
        run(small_cfg(data_dir, *ONE), tmp_path, 1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "summary.json").exists()


def test_non_finite_validation_loss_fails_the_run_without_a_summary(tmp_path, data_dir, monkeypatch):
    """A finite training loss with a non-finite val loss used to write a summary that the sweep neither took
    as finished nor as failed ("partial", retried for ever); now the run fails naming it."""
    import experiments.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite validation loss after the final step 6"):
        run(small_cfg(data_dir, *ONE, "trainer.steps=6"), tmp_path, 1)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_decreases(tmp_path, data_dir, optimizer):
    lr = {"adamw": "0.01", "muon": "0.02"}[optimizer]
    cfg = small_cfg(
        data_dir,
        *ONE,
        f"optimizer.name={optimizer}",
        f"optimizer.learning_rate={lr}",
        "trainer.steps=40",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.log_every=15",
        "trainer.microbatches=1",
        "data.batch_size=16",
    )
    s = run(cfg, tmp_path, 1)
    # Logged every 15 steps and at the last step, which is the summary's final loss.
    losses = curve(tmp_path, "loss")
    assert sorted(losses) == [15, 30, 40] and s["final_loss"] == losses[40]
    # checkpoint_every=0: the final state is still checkpointed (a rerun then finds the run finished).
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    assert ckpt.all_steps() == [40]
    ckpt.close()
    # Far below a uniform guess (ln 64 = 4.16) and below the best context-free (unigram) model.
    assert s["final_eval_loss"] < s["unigram_entropy"] - 0.1, s


def test_cli_end_to_end(tmp_path, data_dir, capsys):
    wd = tmp_path / "run"
    argv = [
        "--preset",
        "tiny",
        "--workdir",
        str(wd),
        "--set",
        "trainer.steps=4",
        "--set",
        "trainer.progress=false",
        "--set",
        "model.n_layers=1",
        "--set",
        "optimizer.warmup_steps=1",
        "--set",
        "data.n_train_tokens=20000",
        "--set",
        "trainer.eval_steps=1",
        "--set",
        f"data.synthetic_dir={data_dir}/cli",
        "--set",
        "trainer.async_checkpoint=true",
    ]
    assert train_cli.main(argv) == 0
    s = json.loads((wd / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s) and s["steps"] == 4
    out = capsys.readouterr().out
    assert "optimizer partition" in out and "done:" in out
    assert train_cli.main(argv) == 0  # resume of a finished run: no extra work
    assert "already finished" in capsys.readouterr().out
    # ... also with another checkpoint cadence (execution-only), and config.json stays the summary's config
    assert train_cli.main([*argv, "--set", "trainer.checkpoint_every=3"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert json.loads((wd / "config.json").read_text()) == s["config"]
    assert train_cli.main([*argv, "--set", "trainer.steps=5"]) == 2
    assert "different config" in capsys.readouterr().err
    assert train_cli.main([*argv, "--set", "trainer.stepz=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'stepz'" in err and "microbatches" in err  # lists the valid fields


def test_program_rejects_indivisible_batch(data_dir):
    from experiments.sharding import make_mesh

    cfg = small_cfg(
        data_dir, *EIGHT, "data.batch_size=6", "trainer.microbatches=1", "trainer.eval_batch_size=4"
    )
    with pytest.raises(ConfigError, match="not divisible by mesh data\\*fsdp=4"):
        build_program(cfg, make_mesh(cfg.mesh))
    # The per-device split is of each microbatch: 8 sequences in 4 microbatches of 2 cannot split 4 ways.
    cfg = small_cfg(data_dir, *EIGHT, "data.batch_size=8", "trainer.microbatches=4")
    with pytest.raises(ConfigError, match=r"data.batch_size / trainer.microbatches=2 is not divisible by "
                       r"mesh data\*fsdp=4"):
        build_program(cfg, make_mesh(cfg.mesh))
    # ... and so is the eval batch.
    cfg = small_cfg(data_dir, *EIGHT, "trainer.eval_batch_size=6")
    with pytest.raises(ConfigError, match=r"eval batch size=6 is not divisible by mesh data\*fsdp=4"):
        build_program(cfg, make_mesh(cfg.mesh))


def _reference_loss(model, params, tokens_BxL1):
    """Mean next-token cross-entropy of ``tokens_BxL1`` written out: predict token t+1 from tokens <= t."""
    import jax.numpy as jnp

    logits_BxLxV, _ = model.apply({"params": params}, tokens_BxL1[:, :-1])
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
    return -jnp.take_along_axis(logp_BxLxV, tokens_BxL1[:, 1:, None], axis=-1).mean()


def test_train_step_reports_the_full_batch_loss_and_gradient_norm(data_dir):
    """Gradient accumulation over 2 microbatches: the step's loss and grad_norm are those of the whole batch
    of 8 sequences (the mean over all its tokens and the norm of that mean's gradient), computed here in one
    plain pass. An accumulated sum not divided by the number of microbatches doubles grad_norm (AdamW's
    update barely notices, so the loss curves alone cannot tell)."""
    from experiments import sharding as shd

    cfg = small_cfg(data_dir, *ONE)
    prog = build_program(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    M, L = cfg.trainer.microbatches, cfg.data.seq_len
    assert M == 2
    tokens = np.random.default_rng(1).integers(0, 64, size=(M, 8 // M, L + 1), dtype=np.int32)
    state = prog.init_state()
    params = jax.device_get(state["params"])  # a host copy: the step donates the state
    whole = tokens.reshape(8, L + 1)
    loss, grads = jax.value_and_grad(lambda p: _reference_loss(prog.model, p, whole))(params)
    grad_norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in jax.tree.leaves(grads)))
    halves = [float(_reference_loss(prog.model, params, tokens[i])) for i in range(M)]
    assert abs(halves[0] - halves[1]) > 1e-4  # the microbatches differ, so a per-microbatch loss would show
    eval_loss = prog.eval_step(params, {}, shd.host_batch(whole, prog.eval_batch_sharding, whole.shape))
    assert float(eval_loss) == pytest.approx(float(loss), rel=1e-6)
    _, m = prog.step(state, shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape))
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)


def test_evaluate_is_the_mean_over_the_documented_validation_windows(tmp_path, data_dir):
    """evaluate: the mean loss over trainer.eval_steps batches of eval_batch_size windows, window j of the val
    split starting at token j * seq_len (data.TokenDataset.sequential_batch), batch i holding windows
    i*B .. i*B+B-1."""
    from experiments import sharding as shd
    from experiments.trainer import evaluate, open_dataset

    cfg = small_cfg(data_dir, *ONE)
    prog = build_program(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    ds = open_dataset(cfg, tmp_path)
    state = prog.init_state()
    params = jax.device_get(state["params"])
    B, L = cfg.eval_batch_size, cfg.data.seq_len
    assert (B, L, cfg.trainer.eval_steps) == (8, 16, 2)
    val = np.asarray(ds.tokens("val"), dtype=np.int32)
    per_batch = []
    for i in range(2):
        windows = np.stack([val[(i * B + b) * L:(i * B + b) * L + L + 1] for b in range(B)])
        per_batch.append(float(_reference_loss(prog.model, params, windows)))
    assert abs(per_batch[0] - per_batch[1]) > 1e-4
    assert evaluate(ds, cfg, prog, state) == pytest.approx(np.mean(per_batch), rel=1e-6)


def test_bench_smoke(tmp_path, capsys):
    from experiments import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--steps", "2", "--matmul-size", "64", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens_per_second"] > 0 and r["matmul_flops_per_device"]["float32"] > 0
    assert r["model_flops_per_second"] == pytest.approx(r["flops_per_token"] * r["tokens_per_second"])
    assert 0 < r["mfu_vs_measured_matmul"] and r["mfu_vs_config_peak"] is None
    assert "MFU vs measured matmul" in capsys.readouterr().out


def _without_source_info(prog) -> str:
    """The compiled train step's HLO without source locations (which name the caller's line; JAX's
    compilation cache key leaves them out too)."""
    text = re.sub(r", metadata=\{[^}]*\}", "", prog.train_step.as_text())
    return "\n".join(line for line in text.splitlines() if not re.match(r"\d+ [{\"]", line))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_runs_differing_in_lr_and_schedule_share_one_compiled_step(data_dir, optimizer):
    """Learning rates and schedules are arguments of the train step, so same-shape runs compile to one
    program (the study's compilation cache then loads it instead of compiling) -- and each run still
    follows its own schedule: the two runs' first updates of a hidden matrix differ by exactly the ratio of
    their step-0 learning rates."""
    from experiments import sharding as shd

    a = small_cfg(data_dir, *ONE, f"optimizer.name={optimizer}", "optimizer.learning_rate=0.01",
                  "optimizer.warmup_steps=2", "trainer.steps=6", "optimizer.schedule=cosine",
                  "optimizer.grad_clip_norm=null")
    b = small_cfg(data_dir, *ONE, f"optimizer.name={optimizer}", "optimizer.learning_rate=0.003",
                  "optimizer.warmup_steps=0", "trainer.steps=9", "optimizer.schedule=wsd",
                  "optimizer.decay_fraction=0.3", "optimizer.grad_clip_norm=null")
    mesh = shd.make_mesh(a.mesh, jax.devices()[:1])
    pa, pb = build_program(a, mesh), build_program(b, mesh)
    assert pa is not pb and _without_source_info(pa) == _without_source_info(pb)
    np.testing.assert_allclose([float(pa.schedule(0)), float(pb.schedule(0))], [0.005, 0.003], rtol=1e-6)

    M = a.trainer.microbatches
    tokens = np.random.default_rng(0).integers(
        0, 64, size=(M, a.data.batch_size // M, a.data.seq_len + 1), dtype=np.int32
    )
    moved = []
    for prog in (pa, pb):
        state = prog.init_state()
        before = np.asarray(state["params"]["blocks"]["mlp"]["up"]["kernel"])
        new, _ = prog.step(state, shd.host_batch(tokens, prog.train_batch_sharding, tokens.shape))
        moved.append(np.abs(np.asarray(new["params"]["blocks"]["mlp"]["up"]["kernel"]) - before))
    ratio = np.median(moved[0] / np.maximum(moved[1], 1e-30))
    # AdamW: |update| = lr(0) * (|m / sqrt(v)| = 1, + weight decay, equal in both); Muon: the same
    # orthogonalised direction in both, scaled by lr(0). A schedule baked into the program would give 1.
    assert ratio == pytest.approx(0.005 / 0.003, rel=0.01)


def test_a_long_evaluation_on_a_simulated_8_device_mesh_finishes(tmp_path):
    """100 eval steps dispatched without a wait aborted the process (SIGABRT: XLA:CPU's 40 s all-reduce
    rendezvous timeout) on 8 simulated CPU devices; evaluate now waits every EVAL_SYNC_EVERY steps. In a
    subprocess: the abort would take the test worker with it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    args = ["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--set", "trainer.steps=3",
            "--set", "optimizer.warmup_steps=1", "--set", "data.n_val_tokens=20000",
            "--set", "trainer.eval_steps=100", "--set", "trainer.progress=false"]
    out = subprocess.run([sys.executable, "-m", "experiments.train", *args], env=env, capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 1600 windows asked of a 312-window val split: the distinct tokens scored, and a warning
    assert summary["devices"] == 8 and summary["eval_tokens"] == (20000 - 1) // 64 * 64
    assert "validation asks for 1600 windows" in out.stdout + out.stderr
