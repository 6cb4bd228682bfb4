"""A character-level language model trained with the hand-written passes of `rnn.py`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fishcomp.scratch.rnn import (
    Adam,
    clip_grad_norm,
    forward,
    init_params,
    loss_and_grads,
)


@dataclass
class CharModel:
    cell: str
    params: dict
    chars: list[str]

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        return np.array([index[c] for c in text if c in index], dtype=np.int64)

    def sample(self, prompt: str, length: int, temperature: float = 0.7, seed: int = 0) -> str:
        """Feed the prompt, then draw one character at a time from the softened output."""
        rng = np.random.default_rng(seed)
        codes = list(self.encode(prompt)) or [0]
        hidden = self.params["Wy"].shape[0]
        h = np.zeros((1, hidden))
        out = []
        for step in range(len(codes) - 1 + length):
            states, probs = forward(self.cell, self.params, np.array([[codes[step]]]), h)
            h = states[-1]
            if step >= len(codes) - 1:
                logits = np.log(np.clip(probs[-1, 0], 1e-12, 1)) / temperature
                p = np.exp(logits - logits.max())
                choice = int(rng.choice(len(p), p=p / p.sum()))
                codes.append(choice)
                out.append(self.chars[choice])
        return prompt + "".join(out)


def train_charlm(
    text: str, cell: str = "gru", hidden: int = 128, seq: int = 32, steps: int = 500, batch: int = 32,
    lr: float = 3e-3, clip: float = 5.0, seed: int = 0, on_step=None,
) -> tuple[CharModel, list[float]]:
    """Random windows of `seq` characters, predicting each next one; Adam on clipped gradients."""
    chars = sorted(set(text))
    if len(text) < seq + 2 or len(chars) < 2:
        raise ValueError(f"the text needs more than {seq + 1} characters and at least 2 distinct ones")
    model = CharModel(cell, init_params(cell, len(chars), hidden, seed=seed), chars)
    data = model.encode(text)
    rng = np.random.default_rng(seed)
    optimiser = Adam(model.params, lr=lr)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        windows = np.stack([data[s : s + seq + 1] for s in starts], axis=1)  # (seq + 1, batch)
        loss, grads = loss_and_grads(cell, model.params, windows[:-1], windows[1:])
        clip_grad_norm(grads, clip)
        optimiser.step(model.params, grads)
        losses.append(loss)
        if on_step:
            on_step(step, loss)
    return model, losses
