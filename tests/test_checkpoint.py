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


@pytest.mark.parametrize("handler", [signal.SIG_IGN, signal.SIG_DFL], ids=["SIG_IGN", "SIG_DFL"])
def test_ctrl_c_during_a_save_follows_a_non_python_handler(tmp_path, handler):
    """The deferred SIGINT honours the handler it replaced when that is not a Python callable: ignored
    (SIG_IGN) stays ignored, the default action (SIG_DFL) still interrupts, and either is put back."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
        inner = ckpt._mngr.save

        def save_hit_by_ctrl_c(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            return inner(*args, **kwargs)

        ckpt._mngr.save = save_hit_by_ctrl_c
        if handler is signal.SIG_IGN:
            try:
                ckpt.save(1, {"w": jnp.ones(3)}, {})
            except KeyboardInterrupt:  # caught here: escaping, it would abort the whole pytest session
                pytest.fail("a Ctrl-C that was being ignored interrupted the save")
        else:
            with pytest.raises(KeyboardInterrupt):
                ckpt.save(1, {"w": jnp.ones(3)}, {})
        assert signal.getsignal(signal.SIGINT) == handler
        ckpt.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    again = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    assert again.latest_step() == 1  # the save itself completed
    again.close()


def test_keeps_the_newest_keep_steps(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert ckpt.restore_meta(3) == {"step": 3}
    ckpt.close()


def test_a_sigint_handler_installed_outside_python_is_left_in_place(tmp_path, monkeypatch):
    """getsignal() is None for a handler a C host installed: Python cannot put it back once replaced
    (signal.signal(SIGINT, None) is a TypeError, which broke every save), so the save leaves it alone."""
    import experiments.checkpoint as ck

    replaced = []
    monkeypatch.setattr(ck.signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(ck.signal, "signal", lambda signum, handler: replaced.append(handler))
    ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    ckpt.save(1, {"w": jnp.ones(3)}, {})
    ckpt.close()
    assert replaced == []
    monkeypatch.undo()
    again = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    assert again.latest_step() == 1
    again.close()
