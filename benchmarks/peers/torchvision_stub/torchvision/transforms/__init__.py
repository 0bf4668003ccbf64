"""Placeholder transforms: the names learn2learn 0.2.0 imports or references."""

from .. import _placeholder_classes

_NAMES = (
    "ColorJitter",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "Resize",
    "ToPILImage",
    "ToTensor",
)

globals().update(_placeholder_classes(__name__, _NAMES))
__all__ = list(_NAMES)
