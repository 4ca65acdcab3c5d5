"""losslab: design, check and compare the loss functions used to fine-tune LLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("losslab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
