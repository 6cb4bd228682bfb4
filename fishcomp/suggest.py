"""Close matches for a mistyped name, for error messages ("did you mean ...?")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], limit: int = 3) -> str:
    """`; did you mean a, b?` for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=limit, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""
