"""fishcomp: raw competition photos to a validated Kaggle submission."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fishcomp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
