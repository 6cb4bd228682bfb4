"""Are the hand-written gradients right? Against PyTorch autograd (float64) and finite differences."""

from __future__ import annotations

import numpy as np

from fishcomp.scratch.rnn import (
    EPS,
    forward,
    init_params,
    loss_and_grads,
    loss_from_probs,
)


def torch_loss(cell: str, params: dict, xs: np.ndarray, targets: np.ndarray):
    """The same network written with torch operations, for autograd to differentiate."""
    import torch

    weights = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    vocab, hidden = params["Wy"].shape[1], params["Wy"].shape[0]
    inputs = torch.nn.functional.one_hot(torch.from_numpy(xs), vocab).double()
    h = torch.zeros(xs.shape[1], hidden, dtype=torch.float64)
    losses = []
    for t in range(xs.shape[0]):
        x = inputs[t]
        if cell == "rnn":
            h = torch.tanh(x @ weights["Wx"] + h @ weights["Wh"] + weights["bh"])
        else:
            r = torch.sigmoid(x @ weights["Wxr"] + h @ weights["Whr"] + weights["br"])
            z = torch.sigmoid(x @ weights["Wxz"] + h @ weights["Whz"] + weights["bz"])
            c = torch.tanh(x @ weights["Wxh"] + (r * h) @ weights["Whh"] + weights["bh"])
            h = (1 - z) * c + z * h
        probs = torch.softmax(h @ weights["Wy"] + weights["by"], dim=-1)
        picked = probs.gather(1, torch.from_numpy(targets[t])[:, None])[:, 0]
        losses.append(-torch.log(picked.clamp(EPS, 1 - EPS)))
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss.detach()), {k: w.grad.numpy() for k, w in weights.items()}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a| + |b|, tiny), elementwise: scale-free, 0 for identical arrays."""
    return float((np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)).max())


def finite_difference(cell: str, params: dict, xs, targets, name: str, index: tuple, step: float = 1e-5) -> float:
    original = params[name][index]
    params[name][index] = original + step
    plus = loss_from_probs(forward(cell, params, xs)[1], targets)
    params[name][index] = original - step
    minus = loss_from_probs(forward(cell, params, xs)[1], targets)
    params[name][index] = original
    return (plus - minus) / (2 * step)


def gradcheck(cell: str, vocab: int = 11, hidden: int = 7, steps: int = 6, batch: int = 4, seed: int = 0, samples: int = 5) -> dict:
    """Every parameter's max relative error against autograd, and against central differences on
    `samples` random entries of each. Returns {name: (autograd error, finite-difference error)}."""
    rng = np.random.default_rng(seed)
    params = init_params(cell, vocab, hidden, seed=seed)
    for name in params:  # non-trivial values everywhere (biases too), so every path is exercised
        params[name] = params[name] + rng.normal(0, 0.3, params[name].shape)
    xs = rng.integers(0, vocab, (steps, batch))
    targets = rng.integers(0, vocab, (steps, batch))
    loss, grads = loss_and_grads(cell, params, xs, targets)
    torch_value, torch_grads = torch_loss(cell, params, xs, targets)
    if abs(loss - torch_value) > 1e-10 * max(1.0, abs(loss)):
        raise AssertionError(f"forward passes differ: {loss} vs {torch_value}")
    report = {}
    for name, grad in grads.items():
        picks = [tuple(rng.integers(0, size) for size in grad.shape) for _ in range(samples)]
        numeric = np.array([finite_difference(cell, params, xs, targets, name, i) for i in picks])
        analytic = np.array([grad[i] for i in picks])
        # Finite differences carry ~1e-9 absolute noise, so they are judged against that floor.
        fd_error = float((np.abs(numeric - analytic) / np.maximum(np.abs(numeric) + np.abs(analytic), 1e-6)).max())
        report[name] = (relative_error(grad, torch_grads[name]), fd_error)
    return report
