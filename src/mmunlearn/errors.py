"""The project's exception types; the CLI turns each into one line and a non-zero exit."""


class MMUError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(MMUError):
    """An option, config file or command-line override is wrong."""


class DataError(MMUError):
    """A data set, file, field or image is missing or malformed."""


class ModelError(MMUError):
    """A model directory, family or checkpoint cannot be used."""


class NonFiniteError(MMUError):
    """A loss or gradient norm became NaN or infinite; the run stops before anything is saved."""


class RunInterrupted(MMUError):
    """SIGTERM or Ctrl-C during training: a checkpoint was written and ``--resume`` continues from it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class CheckpointMismatch(ConfigError):
    """``--resume`` found a checkpoint made with other options or data; it is kept, nothing else is done."""
