from .. import _placeholder_classes

Omniglot = _placeholder_classes(__name__, ["Omniglot"])["Omniglot"]
