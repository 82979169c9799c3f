"""The downstream evaluator restores and applies the model state (MoE's aux-loss-free router bias), not only
the parameters: a checkpointed MoE-with-bias run evaluates, with the bias it was saved with."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim
from experiments import evaluate as ev
from experiments.checkpoint import Checkpointer
from experiments.presets import get_preset
from experiments.trainer import CHECKPOINT_DIR, CONFIG_FILE
from models import build_model


def _tiny_moe_with_bias():
    return get_preset("tiny-moe").override([
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32",
        "model.vocab_size=16", "model.moe_d_ff=16", "model.moe_bias_update_rate=0.01",
        "model.moe_router=sigmoid", "data.synthetic.vocab_size=16", "data.seq_len=32", "mesh.data=1",
    ])


def test_evaluate_run_restores_and_applies_router_bias(tmp_path):
    cfg = _tiny_moe_with_bias()
    model = build_model(cfg.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 32)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                          nn.meta.unbox(shapes["params"]))
    # a large bias on the last expert: it is then every token's choice, which changes the output
    model_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype).at[..., -1].set(5.0),
                               nn.meta.unbox(shapes["moe_state"]))
    model_state = {"moe_state": model_state}
    tx, _ = optim.build_optimizer(cfg.optimizer, params, nn.get_partition_spec(shapes["params"]),
                                  cfg.total_steps)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    ckpt = Checkpointer(tmp_path / CHECKPOINT_DIR, keep=1, async_save=False)
    ckpt.save(3, {"params": params, "opt_state": jax.jit(tx.init)(params), "model_state": model_state}, {})
    ckpt.close()

    loaded_cfg, variables, step = ev.load_variables(tmp_path)
    assert step == 3 and loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, variables, {"params": params, **model_state})
    assert ev.load_params(tmp_path)[1].keys() == params.keys()

    apply = jax.jit(ev.model_apply_fn(cfg.model))  # eager flax MoE dispatches op by op: slower
    with pytest.raises(ValueError, match="moe_state"):  # what the evaluator used to do: params only
        apply(params, tokens)
    logits = np.asarray(apply(variables, tokens))
    unbiased = {"params": params, "moe_state": jax.tree.map(jnp.zeros_like, model_state["moe_state"])}
    assert np.abs(logits - np.asarray(apply(unbiased, tokens))).max() > 1e-4  # the bias is really applied

    out = ev.evaluate_run(tmp_path, names=["mc-k4-perturb"], write=False)
    assert out["step"] == 3 and 0.0 <= out["tasks"]["mc-k4-perturb"]["accuracy"] <= 1.0


@pytest.mark.parametrize("preset, overrides", [
    ("tiny-mor", ["model.mor_router=expert_choice"]),
    ("tiny-moe", ["model.moe_dispatch=capacity", "model.moe_capacity_factor=1.0"]),
])
def test_scoring_does_not_depend_on_padding(preset, overrides):
    """The evaluator pads every sequence of a battery to one length. In their training modes expert-choice
    MoR (top-k over the sequence) and capacity-dispatch MoE (slots per sequence) let padding and later
    tokens change a token's logits -- a task's score then depended on which other tasks shared its batch. The
    evaluator applies the inference modes (causal routing, dropless dispatch), as the KV-cache decoder does:
    a prefix's logits are the same whatever follows it."""
    cfg = get_preset(preset).override([
        "model.d_model=16", "model.n_heads=2", "model.max_seq_len=32", "model.vocab_size=16",
        "data.synthetic.vocab_size=16", "data.seq_len=32", "mesh.data=1", *overrides]).model
    model = build_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 32)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x, nn.meta.unbox(variables))
    apply = jax.jit(ev.model_apply_fn(cfg))
    full = np.asarray(apply(variables, tokens))
    padded = np.asarray(apply(variables, tokens.at[:, 12:].set(0)))  # same 12-token prefix, other tail
    np.testing.assert_allclose(padded[:, :12], full[:, :12], rtol=1e-5, atol=1e-5)
    assert np.abs(padded[:, 12:] - full[:, 12:]).max() > 1e-3  # the tails really differ


def test_token_choice_mor_scores_do_not_depend_on_the_other_tasks():
    """MoR token choice gives step r floor(capacity_r * L) slots, L the padded length -- the longest item of
    the battery. The evaluator pads such a model to its window for every task (eval_pad_length), so a task
    scores the same alone and next to a longer one (padded to the battery instead, 190 of these 200 items'
    log-probs move)."""
    from experiments.tasks import default_battery

    cfg = get_preset("tiny-mor").override([
        "model.d_model=16", "model.n_heads=2", "model.max_seq_len=32", "model.vocab_size=16",
        "model.mor_router=token_choice", "data.synthetic.vocab_size=16", "data.synthetic.successors=[4, 2]",
        "data.seq_len=32", "mesh.data=1"])
    assert ev.eval_pad_length(cfg.model) == 32
    model = build_model(cfg.model)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32)))
    variables = jax.tree.map(lambda x: x * 3.0 if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
    short, long = default_battery(cfg.data.synthetic, 0, names=["mc-k1-unigram", "mc-k8-unigram"])
    alone = ev.evaluate_params(cfg, variables, [short])["mc-k1-unigram"]
    together = ev.evaluate_params(cfg, variables, [short, long])["mc-k1-unigram"]
    np.testing.assert_array_equal(alone["items"]["logprob_correct"], together["items"]["logprob_correct"])
    assert alone["accuracy"] == together["accuracy"]
