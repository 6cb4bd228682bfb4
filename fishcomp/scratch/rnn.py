"""A vanilla RNN and a GRU over one-hot characters, with backpropagation through time by hand.

Shapes: `xs` (T, B) character indices, one-hot inside; hidden state (B, H); output logits (B, V).

    RNN:  h_t = tanh(x_t Wx + h_{t-1} Wh + bh)
    GRU:  r_t = sigmoid(x_t Wxr + h_{t-1} Whr + br)            reset gate
          z_t = sigmoid(x_t Wxz + h_{t-1} Whz + bz)            update gate (1 keeps the old state)
          c_t = tanh(x_t Wxh + (r_t * h_{t-1}) Whh + bh)       candidate state
          h_t = (1 - z_t) * c_t + z_t * h_{t-1}
    both: p_t = softmax(h_t Wy + by), loss = mean over t and b of -log(clip(p_t[target], eps, 1 - eps))

The backward pass undoes each operation in reverse: softmax and cross-entropy together give
p - onehot; a matrix product's gradient is the other factor transposed; tanh' = 1 - tanh^2;
sigmoid' = s (1 - s); and the state's gradient flows back through time, summed over its uses.
"""

from __future__ import annotations

import numpy as np

from fishcomp.scratch.scan import scan

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] in the loss (no log(0))
CELLS = ("rnn", "gru")


def glorot(rng: np.random.Generator, fan_in: int, fan_out: int, dtype=np.float64) -> np.ndarray:
    """Glorot/Xavier uniform: variance 2 / (fan_in + fan_out) keeps activations from exploding or dying."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(dtype)


def init_params(cell: str, vocab: int, hidden: int, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    rng = np.random.default_rng(seed)
    params = {"Wy": glorot(rng, hidden, vocab, dtype), "by": np.zeros(vocab, dtype)}
    gates = ("h",) if cell == "rnn" else ("r", "z", "h")
    for gate in gates:
        suffix = "" if cell == "rnn" else gate
        params[f"Wx{suffix}"] = glorot(rng, vocab, hidden, dtype)
        # The recurrent matrix starts as the identity in the lesson's RNN (a state that persists);
        # Glorot for the GRU, whose gates learn persistence themselves.
        params[f"Wh{suffix}"] = np.eye(hidden, dtype=dtype) if cell == "rnn" else glorot(rng, hidden, hidden, dtype)
        params[f"b{gate}"] = np.zeros(hidden, dtype)
    return params


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _gates(cell: str, params: dict, h: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every intermediate of one step from (h_{t-1}, x_t): used forward, and recomputed backward."""
    if cell == "rnn":
        return {"h": np.tanh(x @ params["Wx"] + h @ params["Wh"] + params["bh"])}
    r = sigmoid(x @ params["Wxr"] + h @ params["Whr"] + params["br"])
    z = sigmoid(x @ params["Wxz"] + h @ params["Whz"] + params["bz"])
    c = np.tanh(x @ params["Wxh"] + (r * h) @ params["Whh"] + params["bh"])
    return {"r": r, "z": z, "c": c, "h": (1 - z) * c + z * h}


def one_hot(indices: np.ndarray, vocab: int, dtype=np.float64) -> np.ndarray:
    out = np.zeros(indices.shape + (vocab,), dtype=dtype)
    np.put_along_axis(out, indices[..., None], 1.0, axis=-1)
    return out


def forward(cell: str, params: dict, xs: np.ndarray, h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """States (T, B, H) via `scan`, and output probabilities (T, B, V)."""
    vocab, hidden = params["Wy"].shape[1], params["Wy"].shape[0]
    inputs = one_hot(xs, vocab, params["Wy"].dtype)
    h0 = np.zeros((xs.shape[1], hidden), params["Wy"].dtype) if h0 is None else h0
    states = np.stack(scan(lambda h, x: _gates(cell, params, h, x)["h"], h0, inputs))
    return states, softmax(states @ params["Wy"] + params["by"])


def loss_from_probs(probs: np.ndarray, targets: np.ndarray) -> float:
    picked = np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
    return float(-np.log(np.clip(picked, EPS, 1 - EPS)).mean())


def loss_and_grads(cell: str, params: dict, xs: np.ndarray, targets: np.ndarray, h0: np.ndarray | None = None):
    """Mean clipped cross-entropy and the gradient of every parameter, by backpropagation through time."""
    steps, batch = xs.shape
    vocab, hidden = params["Wy"].shape[1], params["Wy"].shape[0]
    inputs = one_hot(xs, vocab, params["Wy"].dtype)
    h0 = np.zeros((batch, hidden), params["Wy"].dtype) if h0 is None else h0
    states, probs = forward(cell, params, xs, h0)
    loss = loss_from_probs(probs, targets)

    # Softmax + cross-entropy: d loss / d logits = (p - onehot) / N, except where the clip was active
    # (there the loss is constant in the logits).
    picked = np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
    active = ((picked > EPS) & (picked < 1 - EPS)).astype(probs.dtype)
    dlogits = (probs - one_hot(targets, vocab, probs.dtype)) * (active / (steps * batch))[..., None]

    grads = {name: np.zeros_like(value) for name, value in params.items()}
    grads["Wy"] = np.einsum("tbh,tbv->hv", states, dlogits)
    grads["by"] = dlogits.sum(axis=(0, 1))
    dh_next = np.zeros((batch, hidden), params["Wy"].dtype)
    for t in reversed(range(steps)):
        h_prev = states[t - 1] if t > 0 else h0
        x = inputs[t]
        dh = dlogits[t] @ params["Wy"].T + dh_next  # from the output, and from the future
        g = _gates(cell, params, h_prev, x)
        if cell == "rnn":
            da = dh * (1 - g["h"] ** 2)  # undo tanh
            grads["Wx"] += x.T @ da
            grads["Wh"] += h_prev.T @ da
            grads["bh"] += da.sum(axis=0)
            dh_next = da @ params["Wh"].T
            continue
        r, z, c = g["r"], g["z"], g["c"]
        dc = dh * (1 - z)
        dz = dh * (h_prev - c)
        dh_prev = dh * z
        dc_pre = dc * (1 - c**2)
        grads["Wxh"] += x.T @ dc_pre
        grads["Whh"] += (r * h_prev).T @ dc_pre
        grads["bh"] += dc_pre.sum(axis=0)
        drh = dc_pre @ params["Whh"].T
        dr = drh * h_prev
        dh_prev += drh * r
        dz_pre = dz * z * (1 - z)
        dr_pre = dr * r * (1 - r)
        grads["Wxz"] += x.T @ dz_pre
        grads["Whz"] += h_prev.T @ dz_pre
        grads["bz"] += dz_pre.sum(axis=0)
        grads["Wxr"] += x.T @ dr_pre
        grads["Whr"] += h_prev.T @ dr_pre
        grads["br"] += dr_pre.sum(axis=0)
        dh_prev += dz_pre @ params["Whz"].T + dr_pre @ params["Whr"].T
        dh_next = dh_prev
    return loss, grads


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most `max_norm` (against exploding
    gradients through long sequences). Returns the norm before clipping."""
    norm = float(np.sqrt(sum(float((g**2).sum()) for g in grads.values())))
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


class Adam:
    """Adam with bias correction, written out."""

    def __init__(self, params: dict, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        b1, b2 = self.betas
        for name in params:
            self.m[name] = b1 * self.m[name] + (1 - b1) * grads[name]
            self.v[name] = b2 * self.v[name] + (1 - b2) * grads[name] ** 2
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            params[name] -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
