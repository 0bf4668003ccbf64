"""Import-only stand-in for torchvision, installed into the benchmark peers venv only.

learn2learn 0.2.0 imports torchvision at import time (``import learn2learn`` pulls in
``learn2learn.vision``), but PyPI's torchvision wheels do not load beside this project's
CPU torch 2.13.0 wheel ("operator torchvision::nms does not exist"). The benchmarks use
only learn2learn's MAML and its generic task-sampling data API, never its vision
datasets, so this package provides just the names learn2learn 0.2.0 touches while it is
imported. Using any of them raises, so nothing silently runs on fake image code.
"""

__version__ = "0.0.0+fewshot.stub"
IS_FEWSHOT_STUB = True


_WHY = (
    "is a placeholder: the fewshot peers venv installs a torchvision stub because PyPI's "
    "torchvision does not load beside the CPU torch wheel (see benchmarks/setup_peers.sh)"
)


class _Unavailable:
    """Base of every placeholder: importable and subclassable (learn2learn subclasses
    ImageFolder), but constructing one raises."""

    _stub_name = "?"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{self._stub_name} {_WHY}")


def _unavailable_function(module_name, name):
    def function(*args, **kwargs):
        raise RuntimeError(f"{module_name}.{name} {_WHY}")

    function.__name__ = function.__qualname__ = name
    function.__module__ = module_name
    return function


def _placeholder_classes(module_name, names):
    return {
        name: type(
            name,
            (_Unavailable,),
            {
                "__module__": module_name,
                "__qualname__": name,
                "_stub_name": f"{module_name}.{name}",
            },
        )
        for name in names
    }


from . import datasets, transforms  # noqa: E402  (placeholders above must exist first)

__all__ = ["datasets", "transforms"]
