"""loopsearch: search loop-block placement and loop counts of looped masked diffusion LMs under a fixed FLOP budget."""

from importlib.metadata import PackageNotFoundError, version

from .hookspecs import hookimpl

try:
    __version__ = version("loopsearch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__", "hookimpl"]
