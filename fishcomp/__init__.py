"""fishcomp: raw competition photos to a validated Kaggle submission.

The Python API (`fishcomp.run`, `train`, `precompute`, `ensemble`, `submit`, `build`, `dag`, `runs`,
`diff`, `leaderboard`, `predict`) is in
fishcomp/api.py; it is loaded on first use, so `import fishcomp` stays light.
"""

from fishcomp.version import __version__

_API = ("run", "train", "precompute", "ensemble", "submit", "build", "dag", "runs", "diff", "leaderboard", "predict")


def __getattr__(name: str):
    if name in _API:
        from fishcomp import api

        return getattr(api, name)
    raise AttributeError(f"module 'fishcomp' has no attribute {name!r}")


__all__ = ["__version__", *_API]
