"""Every model family trains through the one trainer: MoE, MoR and MLA with AdamW and Muon, their
non-parameter state (aux-loss-free router biases) is trained, checkpointed and resumed, summary.json carries
the family fields, and a tiny MoE on the 8-device (data, fsdp, tensor) mesh matches one device."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import sharding as shd
from experiments.metrics import read_metrics
from experiments.presets import get_preset
from experiments.trainer import build_program, train
from models import accounting

SMALL = [  # shrink the tiny-* presets to a few seconds per run; the families' own settings are kept
    "model.d_model=32",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "data.batch_size=8",
    "data.n_train_tokens=20000",
    "data.n_val_tokens=2048",
    "data.synthetic.successors=[4, 2]",
    "trainer.steps=12",
    "trainer.eval_every=0",
    "trainer.eval_steps=1",
    "trainer.eval_batch_size=8",
    "trainer.log_every=1",
    "trainer.checkpoint_every=6",
    "trainer.progress=false",
    "optimizer.warmup_steps=2",
]
ONE = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
EIGHT = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
LR = {"adamw": "0.01", "muon": "0.02"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def cfg_for(preset, data_dir, *overrides):
    return get_preset(preset).override([*SMALL, f"data.synthetic_dir={data_dir}", *overrides]).validate()


def run(cfg, workdir, n_devices=1, **kw):
    return train(cfg, workdir, devices=jax.devices()[:n_devices], log=lambda s: None, **kw)


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def saved_state(workdir, step):
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, restored)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mla", "tiny-mor"])
def test_family_trains_and_summarises(tmp_path, data_dir, preset, optimizer):
    opt = (f"optimizer.name={optimizer}", f"optimizer.learning_rate={LR[optimizer]}")
    cfg = cfg_for(preset, data_dir, *ONE, *opt)
    s = run(cfg, tmp_path)
    curve = losses(tmp_path)
    # From ~ln 64 = 4.16 at initialisation; 12 steps of either optimiser must clearly lower it.
    assert np.mean([curve[k] for k in (10, 11, 12)]) < curve[1] - 0.3, curve
    assert np.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < curve[1]
    c, L = cfg.model, cfg.data.seq_len
    # flops_per_token is the exact *active* training FLOPs of the family, and the family fields are there.
    assert s["flops_per_token"] == s["active_flops_per_token"] == accounting.flops_per_token(c, L)["training"]
    assert s["active_params"] == accounting.param_counts(c)["active"]
    assert s["kv_cache_bytes_per_token"] > 0 and s["attention"] == c.attention and s["family"] == c.family
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    records = read_metrics(tmp_path)
    if c.family == "moe":
        assert s["experts"] == 4 and s["top_k"] == 2 and s["shared_experts"] == 1 and s["router"] == "softmax"
        assert s["active_params"] < s["params"]
        assert all(r["moe_load_balance"] >= 1.0 - 1e-5 for r in records if "loss" in r)  # E*sum f P >= 1
        assert {"moe_dropped_fraction", "moe_router_z", "moe_max_violation"} <= set(records[0])
        load = [r["moe_expert_load"] for r in records if "moe_expert_load" in r]
        assert load and np.allclose(np.sum(load[-1], axis=-1), 1.0)  # per layer, fractions of assignments
    if c.family == "mor":
        assert (s["recursions"], s["sharing"], s["router"], s["kv_strategy"]) == (
            3, "middle_cycle", "expert_choice", "recursion_wise")
        # Expert choice keeps exactly the scheduled tokens: capacities 1, 2/3, 1/3 -> mean depth 2 of 3.
        assert s["expected_depth"] == pytest.approx(2.0, abs=1.0 / L)
        assert all(r["mor_mean_depth"] == pytest.approx(s["expected_depth"]) for r in records if "loss" in r)
        assert s["flops_per_token"] < s["full_depth_flops_per_token"]
    if c.attention == "mla":
        assert s["kv_lora_rank"] == 32 and s["rope_head_dim"] == 8


@pytest.mark.parametrize(
    "preset, overrides, collection",
    [
        ("tiny-moe", ("model.moe_bias_update_rate=0.01", "model.moe_router=sigmoid"), "moe_state"),
        ("tiny-mor", ("model.mor_router=token_choice", "model.mor_aux_loss=loss_free",
                      "model.mor_bias_update_rate=0.01"), "mor_state"),
    ],
)
def test_router_bias_state_is_trained_checkpointed_and_resumed(tmp_path, data_dir, preset, overrides,
                                                               collection):
    cfg = cfg_for(preset, data_dir, *ONE, *overrides, "optimizer.learning_rate=0.01")
    s = run(cfg, tmp_path / "full")
    bias = saved_state(tmp_path / "full", 12)["model_state"][collection]
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(bias)])
    # Each step moves every bias entry by +-rate (or 0 at exact balance): nonzero, on the rate grid.
    assert np.abs(b).max() > 0 and np.abs(b).max() <= 12 * 0.01 + 1e-6
    assert np.allclose(np.round(b / 0.01), b / 0.01, atol=1e-3)

    class Stop(Exception):
        pass

    def stop_at_8(step):
        if step == 8:
            raise Stop

    with pytest.raises(Stop):  # checkpoint at 6 holds the bias; the resume must continue from it exactly
        run(cfg, tmp_path / "resumed", on_step=stop_at_8)
    s2 = run(cfg, tmp_path / "resumed")
    assert s2["final_loss"] == s["final_loss"] and s2["final_eval_loss"] == s["final_eval_loss"]


def test_tiny_moe_on_eight_devices_matches_one(tmp_path, data_dir):
    """Expert parallelism ("expert" -> fsdp) with data and tensor parallelism; dropless ragged_dot dispatch
    and the router-bias state sharded over the expert axis."""
    extra = ("model.moe_bias_update_rate=0.001", "trainer.steps=6", "trainer.microbatches=2")
    cfg1 = cfg_for("tiny-moe", data_dir, *ONE, *extra)
    cfg8 = cfg_for("tiny-moe", data_dir, *EIGHT, *extra)
    run(cfg1, tmp_path / "one", 1)
    run(cfg8, tmp_path / "eight", 8)
    c1, c8 = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert c1.keys() == c8.keys() and abs(c1[6] - c1[1]) > 0.05
    np.testing.assert_allclose([c8[k] for k in sorted(c8)], [c1[k] for k in sorted(c1)], rtol=1e-4)
    # The experts really are split: expert axis over fsdp, expert hidden over tensor (program is memoised).
    prog = build_program(cfg8, shd.make_mesh(cfg8.mesh, jax.devices()[:8]))
    assert prog.state_shardings["params"]["blocks"]["mlp"]["gate"]["kernel"].spec == P(None, "fsdp", None,
                                                                                       "tensor")
    assert [x.spec for x in jax.tree.leaves(prog.state_shardings["model_state"])] == [P(None, "fsdp")]
    state = saved_state(tmp_path / "eight", 6)
    np.testing.assert_allclose(
        state["params"]["blocks"]["mlp"]["gate"]["kernel"],
        saved_state(tmp_path / "one", 6)["params"]["blocks"]["mlp"]["gate"]["kernel"],
        rtol=1e-3, atol=1e-5,
    )


def test_microbatching_is_exact_apart_from_the_balance_losses(tmp_path, data_dir):
    """Gradient accumulation is a memory knob: with MoE's balance and z losses off, 2 microbatches give the
    1-microbatch run to fp32 rounding. The balance losses multiply two batch means, so they are
    per-microbatch (as in Megatron-LM; experiments/trainer.py) and do change the run slightly."""
    off = ("trainer.steps=6", "model.moe_aux_loss_weight=0.0", "model.moe_z_loss_weight=0.0")
    runs = {}
    for m in (1, 2):
        run(cfg_for("tiny-moe", data_dir, *ONE, *off, f"trainer.microbatches={m}"), tmp_path / f"m{m}")
        runs[m] = losses(tmp_path / f"m{m}")
    np.testing.assert_allclose([runs[2][k] for k in sorted(runs[2])], [runs[1][k] for k in sorted(runs[1])],
                               rtol=1e-6)
    # The step's expert load (logged at the last step) is the fraction of all its tokens' assignments per
    # expert: each layer's row sums to 1, and 2 microbatches of 4 sequences give the load of the 8 together.
    loads = {m: [r["moe_expert_load"] for r in read_metrics(tmp_path / f"m{m}") if "moe_expert_load" in r]
             for m in (1, 2)}
    for m in (1, 2):
        assert len(loads[m]) == 1
        np.testing.assert_allclose(np.sum(loads[m][0], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(loads[2][0], loads[1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny-mor", ("model.mor_router_scale=1.0",)),  # expert choice: top-k ranks tokens against later ones
     ("tiny-moe", ("model.moe_dispatch=capacity", "model.moe_capacity_factor=0.25"))],  # batch-wide drops
)
def test_validation_loss_is_the_inference_mode_loss(tmp_path, data_dir, preset, overrides):
    """final_eval_loss scores the model as it is used (models.inference_mode, what KV-cache decoding
    computes), recomputed here from the saved parameters with model.apply; the training-mode forward on the
    same batch gives a different loss, so the check would fail if validation still used it."""
    from experiments.data import TokenDataset
    from models import build_model

    cfg = cfg_for(preset, data_dir, *ONE, *overrides, "trainer.eval_steps=2", "optimizer.learning_rate=0.01")
    s = run(cfg, tmp_path)
    c = cfg.model
    variables = saved_state(tmp_path, 12)
    variables = {"params": variables["params"], **variables.get("model_state", {})}
    ds = TokenDataset.open(data_dir)
    Be, L = cfg.eval_batch_size, cfg.data.seq_len
    batches = [ds.sequential_batch("val", i, Be, L) for i in range(2)]

    def mean_ce(model, **kw):
        out = []
        for b in batches:
            logits, _ = model.apply(variables, b[:, :-1], **kw)
            logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
            out.append(-np.take_along_axis(np.asarray(logp), b[:, 1:, None], -1).mean())
        return float(np.mean(out))

    if c.family == "mor":
        inference = mean_ce(build_model(c), causal_routing=True)
    else:
        inference = mean_ce(build_model(c.replace(moe_dispatch="dropless")))
    training_mode = mean_ce(build_model(c))
    assert abs(s["final_eval_loss"] - inference) < 1e-5 and s["eval_mode"] == "inference"
    assert abs(training_mode - inference) > 1e-3, (training_mode, inference)
    # A summary written before validation used the inference mode (no eval_mode, the training-mode loss) is
    # not taken as finished: the trainer re-evaluates the final checkpoint and rewrites it.
    from experiments.run_record import eval_is_current

    old = {k: v for k, v in s.items() if k != "eval_mode"} | {"final_eval_loss": training_mode}
    (tmp_path / "summary.json").write_text(json.dumps(old))
    assert not eval_is_current(old, c) and eval_is_current(old, get_preset("tiny").model)
    from experiments import executors, sweep

    (record,) = sweep.resolve([sweep.PlannedRun(name="r", kind="user", config=cfg.to_dict())])
    assert executors.finished_summary(tmp_path, record) is None  # the sweep hands it to the trainer
    logs = []
    s2 = train(cfg, tmp_path, devices=jax.devices()[:1], log=logs.append)
    assert any("predates inference-mode validation" in m for m in logs)
    assert s2["final_eval_loss"] == s["final_eval_loss"] and s2["eval_mode"] == "inference"
    assert json.loads((tmp_path / "summary.json").read_text())["final_eval_loss"] == s["final_eval_loss"]
    assert executors.finished_summary(tmp_path, record)["final_eval_loss"] == s["final_eval_loss"]
