"""Placeholder datasets: learn2learn 0.2.0 subclasses ImageFolder at import time."""

from .folder import ImageFolder, default_loader
from .omniglot import Omniglot

__all__ = ["ImageFolder", "Omniglot", "default_loader"]
