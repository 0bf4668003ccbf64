from .. import _placeholder_classes, _unavailable_function

ImageFolder = _placeholder_classes(__name__, ["ImageFolder"])["ImageFolder"]
default_loader = _unavailable_function(__name__, "default_loader")
