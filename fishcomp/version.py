"""The installed package's version (part of every cache key)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fishcomp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
