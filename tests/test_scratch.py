"""The NumPy recurrent nets: hand-written gradients against autograd and finite differences."""

import math

import numpy as np
import pytest
from helpers import run_cli

from fishcomp.scratch.charlm import train_charlm
from fishcomp.scratch.check import gradcheck
from fishcomp.scratch.rnn import clip_grad_norm, forward, init_params, loss_and_grads
from fishcomp.scratch.scan import scan


def test_scan_returns_every_state():
    assert scan(lambda total, x: total + x, 0, [1, 2, 3, 4]) == [1, 3, 6, 10]
    assert scan(lambda s, x: s, 5, []) == []


@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("steps,batch", [(1, 1), (5, 3), (12, 2)])
def test_gradients_equal_autograd_and_finite_differences(cell, steps, batch):
    report = gradcheck(cell, steps=steps, batch=batch, seed=steps * 10 + batch)
    assert set(report) == set(init_params(cell, 3, 2))
    for name, (autograd, finite) in report.items():
        assert autograd < 1e-8, (name, autograd)
        assert finite < 1e-5, (name, finite)


def test_clipping_bounds_the_gradient_norm():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(0, 10, (5, 5)), "b": rng.normal(0, 10, 5)}
    before = clip_grad_norm(grads, 1.0)
    after = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    assert before > 10 and after == pytest.approx(1.0)
    small = {"a": np.full(3, 0.1)}
    clip_grad_norm(small, 1.0)
    np.testing.assert_allclose(small["a"], 0.1)  # under the bound: untouched


def test_a_gru_whose_update_gate_keeps_the_old_state_does_not_change_it():
    params = init_params("gru", vocab=6, hidden=4, seed=1)
    params["bz"][:] = 60.0  # sigmoid(60) = 1: keep the old state whatever the input
    h0 = np.random.default_rng(2).normal(size=(3, 4))
    states, _ = forward("gru", params, np.random.default_rng(3).integers(0, 6, (7, 3)), h0)
    np.testing.assert_allclose(states, np.broadcast_to(h0, states.shape), atol=1e-12)
    params["bz"][:] = -60.0  # the opposite: the state is all candidate, so it moves
    states, _ = forward("gru", params, np.random.default_rng(3).integers(0, 6, (7, 3)), h0)
    assert np.abs(states[-1] - h0).max() > 0.1


def test_the_loss_is_the_mean_clipped_cross_entropy():
    params = init_params("rnn", vocab=5, hidden=3, seed=0)
    xs = np.array([[0, 1], [2, 3]])
    loss, _ = loss_and_grads("rnn", params, xs, xs)
    _, probs = forward("rnn", params, xs)
    expected = -np.mean(np.log(np.take_along_axis(probs, xs[..., None], axis=-1)))
    assert loss == pytest.approx(expected)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_a_few_hundred_steps_learn_a_repetitive_text(cell):
    text = "the fish is on the deck. the boat is on the sea. " * 40
    model, losses = train_charlm(text, cell=cell, hidden=48, seq=16, steps=250, batch=16, seed=0)
    uniform = math.log(len(model.chars))
    assert losses[0] == pytest.approx(uniform, abs=0.3)
    assert np.mean(losses[-20:]) < uniform / 3
    assert len(model.sample("the ", 40)) == 44


def test_the_cli_gradcheck_ends_with_the_max_error(capsys):
    code, stdout, _ = run_cli(["scratch", "gradcheck"], capsys)
    assert code == 0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("max_rel_error=") and float(last.split("=")[1]) < 1e-6
    assert sum("rnn" in line for line in stdout.splitlines()) == 5 and sum("gru" in line for line in stdout.splitlines()) == 11


def test_the_cli_trains_and_samples(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("abcabcabd " * 80)
    code, stdout, _ = run_cli(["scratch", "train", text, "--cell", "rnn", "--steps", "120", "--hidden", "24", "--seq", "12"], capsys)
    assert code == 0 and "rnn: loss" in stdout and "(uniform over 5 characters" in stdout
    code, _, stderr = run_cli(["scratch", "train", tmp_path / "none.txt"], capsys)
    assert code == 2 and "text file not found" in stderr
