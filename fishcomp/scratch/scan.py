"""The scan the lesson builds recurrent nets on: fold a step over a sequence, keeping every state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

State = TypeVar("State")
Item = TypeVar("Item")


def scan(step: Callable[[State, Item], State], init: State, xs: Iterable[Item]) -> list[State]:
    """[step(init, x0), step(step(init, x0), x1), ...]: each state after each item (not `init`)."""
    states, state = [], init
    for x in xs:
        state = step(state, x)
        states.append(state)
    return states
