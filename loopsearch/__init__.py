"""loopsearch: search loop-block placement and loop counts of looped masked diffusion LMs under a fixed FLOP budget."""

from importlib.metadata import PackageNotFoundError, version

from .hookspecs import hookimpl

try:
    __version__ = version("loopsearch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__", "hookimpl", "load_trial"]


def __getattr__(name: str):
    """``loopsearch.load_trial`` (loopsearch/api.py), imported on first use: plugins import this
    package for ``hookimpl`` and must not pay for storage and Optuna."""
    if name == "load_trial":
        import importlib

        return importlib.import_module(".api", __name__).load_trial
    raise AttributeError(f"module 'loopsearch' has no attribute {name!r}")
