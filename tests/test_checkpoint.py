"""The checkpointer around orbax: a Ctrl-C while a save starts does not cut it, and what a killed save left
behind is cleaned up by the next run."""

from __future__ import annotations

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoint import Checkpointer


@pytest.mark.parametrize("async_save", [True, False])
def test_ctrl_c_during_a_save_is_raised_after_it(tmp_path, async_save):
    """SIGINT that lands inside orbax's save used to interrupt it midway (its background threads then wrote
    on while the interpreter exited, with tracebacks and a temporary directory left). Now the save
    completes and the KeyboardInterrupt follows."""
    ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=async_save)
    inner = ckpt._mngr.save

    def save_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once to this (main) thread's handler
        return inner(*args, **kwargs)

    ckpt._mngr.save = save_hit_by_ctrl_c
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(3, state, {"note": "x"})
    ckpt.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    again = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    assert again.latest_step() == 3
    restored, meta = again.restore(3, {"w": jnp.zeros((2, 3))})
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"note": "x"}
    again.close()


def test_a_killed_saves_temporary_directory_is_removed_on_the_next_start(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    ckpt.save(1, {"w": jnp.ones(3)}, {})
    ckpt.close()
    torn = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1700000000000000"
    (torn / "state").mkdir(parents=True)
    again = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    assert again.latest_step() == 1
    # orbax removes temporary directories in the background from its start, finished before the next save
    again.save(2, {"w": jnp.zeros(3)}, {})
    again.close()
    assert not torn.exists() and (tmp_path / "ck" / "2").is_dir()
