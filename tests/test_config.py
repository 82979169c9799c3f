"""Config: presets, typed overrides, strict round-trip, validation, workdir config mismatch."""

from __future__ import annotations

import json

import pytest

from experiments.config import ConfigError, ExperimentConfig, config_diff
from experiments.presets import PRESETS, get_preset
from experiments.trainer import check_and_save_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = get_preset(name).validate()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ExperimentConfig.from_dict(d) == cfg


def test_gpu_presets_use_bf16_compute():
    for name in ("gpt2-124m", "350m"):
        cfg = get_preset(name)
        assert cfg.model.compute_dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert get_preset("gpt2-124m").model.param_counts()["non_embedding"] == pytest.approx(85e6, rel=0.01)


def test_overrides_parse_each_type():
    cfg = get_preset("tiny").override(
        [
            "trainer.steps=1e3",  # integral float -> int
            "optimizer.learning_rate=2e-3",
            "optimizer.grad_clip_norm=none",
            "trainer.progress=false",
            "model.n_kv_heads=2",
            "optimizer.name=muon",
            "data.path=/some/dir",
            "data.synthetic.successors=[3, 2]",
            "trainer.peak_flops=1e15",
            "seed=7",
            'mesh.rules=[["batch", ["data", "fsdp"]], ["embed", null]]',
        ]
    )
    assert cfg.trainer.steps == 1000 and isinstance(cfg.trainer.steps, int)
    assert cfg.optimizer.learning_rate == 2e-3 and cfg.optimizer.grad_clip_norm is None
    assert cfg.trainer.progress is False and cfg.model.n_kv_heads == 2 and cfg.optimizer.name == "muon"
    assert cfg.data.path == "/some/dir" and cfg.data.synthetic.successors == (3, 2)
    assert cfg.trainer.peak_flops == 1e15 and cfg.seed == 7
    assert cfg.mesh.rules == (("batch", ("data", "fsdp")), ("embed", None))
    # Untouched fields keep the preset's values.
    assert cfg.model.d_model == get_preset("tiny").model.d_model


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.stepz=3", r"unknown field 'stepz'.*valid fields of TrainerConfig: steps: int \| None"),
        ("modle.d_model=3", r"unknown field 'modle'.*valid fields of ExperimentConfig: model"),
        ("trainer.steps=ten", r"trainer.steps='ten': wrong type, expected int \| None"),
        ("trainer.steps=1.5", r"trainer.steps='1.5': wrong type"),
        ("trainer.steps=true", r"trainer.steps='true': wrong type, expected int \| None"),  # bool is an int
        ("trainer.progress=maybe", r"trainer.progress='maybe': wrong type, expected bool"),
        ("optimizer.learning_rate=fast", r"optimizer.learning_rate='fast': wrong type"),
        ("model.d_model.x=3", r"'d_model' is a int, not a section"),
        ("trainer.steps", r"must look like section.field=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("tiny").override([override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*'gpt2-124m'"):
        get_preset("huge")


def test_from_dict_rejects_unknown_and_mistyped_fields():
    d = get_preset("tiny").to_dict()
    d["trainer"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['bogus'\] in trainer"):
        ExperimentConfig.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["model"]["n_layers"] = "2"
    with pytest.raises(ConfigError, match="model.n_layers: expected an int"):
        ExperimentConfig.from_dict(d)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("model", "n_layers", True, r"model.n_layers: expected an int, got True"),
        ("optimizer", "learning_rate", True, r"optimizer.learning_rate: expected a number, got True"),
        # a fixed-length tuple entry of the wrong length is named (it raised zip's bare ValueError)
        ("mesh", "rules", [["batch"]], r"mesh.rules\[0\]: expected 2 entries, got \['batch'\]"),
    ],
)
def test_from_dict_rejects_bools_as_numbers_and_short_tuples(section, key, value, message):
    d = get_preset("tiny").to_dict()
    d[section][key] = value
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(d)


def test_validate_accepts_boundary_values():
    tiny = get_preset("tiny")
    assert (tiny.data.seq_len, tiny.trainer.steps, tiny.data.batch_size) == (64, 300, 16)
    # exactly one window per split, and a warmup as long as the run, are allowed
    tiny.override(["data.n_train_tokens=65", "data.n_val_tokens=65", "optimizer.warmup_steps=300"]).validate()
    # the synthetic source's vocabulary is checked only when the data is synthetic
    tiny.override(["data.path=/some/dir", "data.synthetic.vocab_size=1000"]).validate()


def test_eval_batch_size_defaults_to_one_microbatch():
    cfg = get_preset("tiny").override(["trainer.microbatches=4"]).validate()
    assert cfg.trainer.eval_batch_size is None and cfg.eval_batch_size == 16 // 4
    assert cfg.override(["trainer.eval_batch_size=3"]).eval_batch_size == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.steps=300", "trainer.tokens=1000"], "set exactly one of trainer.steps / trainer.tokens"),
        (["trainer.microbatches=3"], "microbatches=3 must be >= 1 and divide data.batch_size=16"),
        (["data.seq_len=1000"], "data.seq_len=1000 exceeds model.max_seq_len"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
        (['mesh.rules=[["embed", "model"]]'], "unknown mesh axes"),
        # a misspelt logical axis matched nothing: every parameter silently lost its FSDP sharding
        (['mesh.rules=[["embd", "fsdp"]]'], r"unknown logical axis 'embd'"),
        (['mesh.rules=[["batch", ["data", "data"]]]'], r"names a mesh axis twice"),  # crashed inside JAX
        (["model.n_heads=3"], "model: invalid ModelConfig"),
        (["optimizer.warmup_steps=100000"], "warmup_steps=100000 exceeds the run length"),
        (["data.synthetic.vocab_size=1000"], "data.synthetic.vocab_size=1000 exceeds model.vocab_size"),
        # NaN / inf (JSON overrides accept them; a NaN zipf exponent made data preparation loop forever)
        (["data.synthetic.zipf_exponent=NaN"], r"zipf_exponent must be finite and >= 0, got nan"),
        (["data.synthetic.dirichlet_alpha=NaN"], r"dirichlet_alpha must be finite and > 0, got nan"),
        (["data.synthetic.weights=[NaN, 1.0]"], r"data.synthetic.weights\[0\]=nan must be finite"),
        (["model.init_std=Infinity"], r"init_std=inf must be a positive \(finite\) number"),
        (["model.rope_theta=NaN"], r"rope_theta=nan must be a positive \(finite\) number"),
        (["trainer.peak_flops=NaN"], r"trainer.peak_flops=nan must be finite"),
        (["seed=-1"], r"seed=-1 must be >= 0"),
        (["optimizer.schedule=wsd", "optimizer.decay_fraction=0.0"], r"optimizer: WSD cool-down of 0 step"),
        # a bad optimizer field is named once (the schedule check re-ran the optimizer's validation)
        (["optimizer.learning_rate=-1"],
         r"^invalid experiment config:\n  - optimizer: optimizer.learning_rate must be > 0, got -1.0$"),
        # a validation split shorter than one window was found only after the whole run had trained
        (["data.n_val_tokens=10"], r"data.n_val_tokens=10 is shorter than one window \(data.seq_len \+ 1"),
        # one token short of a window (seq_len 64 needs 65), and the train split is checked too
        (["data.n_train_tokens=64"], r"data.n_train_tokens=64 is shorter than one window \(.* = 65 tokens"),
        (["data.batch_size=0"], r"data.batch_size=0 must be >= 1"),
        (["trainer.steps=null", "trainer.tokens=0"], r"trainer.tokens=0 must be >= 1"),
        (["trainer.microbatches=0"], r"trainer.microbatches=0 must be >= 1 and divide data.batch_size=16"),
        (["trainer.log_every=0"], r"trainer.log_every must be >= 1"),
        (["trainer.eval_steps=0"], r"trainer.eval_steps=0 must be >= 1"),
        (["trainer.eval_batch_size=0"], r"trainer.eval_batch_size=0 must be >= 1"),
        (["trainer.keep_checkpoints=0"], r"trainer.keep_checkpoints=0 must be >= 1"),
        (["trainer.peak_flops=0"], r"trainer.peak_flops=0.0 must be positive or None"),
        (["mesh.fsdp=0"], r"mesh sizes \(data=-1, fsdp=0, tensor=1\) must be positive"),
    ],
)
def test_validate_reports_problems(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("tiny").override(overrides).validate()


def test_tokens_sets_run_length_in_whole_steps():
    cfg = get_preset("tiny").override(["trainer.steps=null", "trainer.tokens=100000"]).validate()
    assert cfg.total_steps == -(-100000 // cfg.tokens_per_step) == 98


def test_workdir_refuses_a_different_config(tmp_path):
    cfg = get_preset("tiny")
    check_and_save_config(cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    # Execution-only settings (mesh, progress bar, checkpoint cadence) may change between sessions.
    check_and_save_config(cfg.override(["mesh.data=1", "trainer.progress=false"]), tmp_path)
    # no progress yet (nothing checkpointed): a fixed config simply replaces the saved one
    check_and_save_config(cfg.override(["optimizer.learning_rate=0.1"]), tmp_path)
    check_and_save_config(cfg, tmp_path)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=r"(?s)different config.*optimizer.learning_rate: saved 0.003 != now 0.1"
    ):
        check_and_save_config(cfg.override(["optimizer.learning_rate=0.1"]), tmp_path)


def test_config_diff():
    a = get_preset("tiny").to_dict()
    b = get_preset("tiny").override(["model.d_model=32", "seed=1"]).to_dict()
    assert config_diff(a, b) == ["model.d_model", "seed"]


def test_overriding_steps_or_tokens_clears_the_other():
    by_tokens = get_preset("muon-mla-moe-30m")  # a token-budgeted preset
    assert by_tokens.trainer.tokens is not None and by_tokens.trainer.steps is None
    cfg = by_tokens.override(["trainer.steps=7", "optimizer.warmup_steps=1"])
    assert cfg.trainer.steps == 7 and cfg.trainer.tokens is None
    cfg.validate()
    back = cfg.override(["trainer.tokens=1000"])
    assert back.trainer.tokens == 1000 and back.trainer.steps is None
    # setting one to null clears nothing: the other still sets the run length
    kept = by_tokens.override(["trainer.steps=null"])
    assert kept.trainer.tokens == by_tokens.trainer.tokens and kept.trainer.steps is None
    # both given explicitly: nothing is cleared, and validation names the conflict
    both = by_tokens.override(["trainer.steps=7", "trainer.tokens=1000"])
    with pytest.raises(ConfigError, match="exactly one of trainer.steps / trainer.tokens"):
        both.validate()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.d_modl=64"], "config error: unknown field 'd_modl'"),
        (["--set", "optimizer.name=sgd"], "optimizer.name='sgd' is unknown"),
        (["--set", "data.path=/nonexistent-tokens"], "data error: missing metadata file"),
    ],
)
def test_train_cli_names_bad_input_without_a_traceback(tmp_path, capsys, args, message):
    from experiments.train import main

    assert main(["--workdir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_zero_steps_is_a_config_error_not_a_type_error():
    # (t.steps or t.tokens) >= 1 read steps=0 as None >= 1 and raised TypeError past the CLI's error handling
    with pytest.raises(ConfigError, match=r"trainer.steps=0 must be >= 1"):
        get_preset("tiny").override(["trainer.steps=0"]).validate()
