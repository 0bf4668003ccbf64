"""User-facing errors: one line that says what is wrong and what to do.

The command line prints these without a traceback; everything else is a bug and keeps its traceback.

A message speaks the library's words: it names a parameter as `name`, or `name=value`, in
backquotes. The command line shows each as its option (`fewshot.cli.in_flags`: --name,
--name value, and --no-name for `name=False`), so one message serves both.
"""


class FewshotError(Exception):
    """Base class for errors caused by the user's input, data or files."""

    exit_code = 2
    prefix = "error"


class DataError(FewshotError):
    """The data folder, an archive or an image is missing, corrupt or too small for the request."""


class ConfigError(FewshotError):
    """A size, rate or name given by the user is invalid."""


class CheckpointError(FewshotError):
    """A run folder is missing its checkpoint or does not match this model or version."""


class DivergenceError(FewshotError):
    """The loss or a gradient stopped being finite during meta-training."""


class NothingToDo(FewshotError):
    """A request that leaves nothing to do, such as resuming a finished run; not a failure."""

    exit_code = 0
    prefix = "note"


class RunStopped(FewshotError):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint; not a failure."""

    exit_code = 130
    prefix = "stopped"


def require_positive(**values: float) -> None:
    """Raise ConfigError naming every value that is not > 0."""
    bad = [
        f"`{name}` must be positive, got {value}."
        for name, value in values.items()
        if not value > 0
    ]
    if bad:
        raise ConfigError(" ".join(bad))
