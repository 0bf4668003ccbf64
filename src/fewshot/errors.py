"""User-facing errors: one line that says what is wrong and what to do.

The command line prints these without a traceback; everything else is a bug and keeps its traceback.
"""


class FewshotError(Exception):
    """Base class for errors caused by the user's input, data or files."""


class DataError(FewshotError):
    """The data folder, an archive or an image is missing, corrupt or too small for the request."""


class ConfigError(FewshotError):
    """A size, rate or name given by the user is invalid."""


class CheckpointError(FewshotError):
    """A run folder is missing its checkpoint or does not match this model or version."""


def require_positive(**values: float) -> None:
    """Raise ConfigError naming the first value that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}.")
