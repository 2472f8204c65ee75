"""The project's exception types; the CLI turns each into one line and a non-zero exit."""


class MMUError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(MMUError):
    """An option, config file or command-line override is wrong."""


class DataError(MMUError):
    """A data set, file, field or image is missing or malformed."""


class ModelError(MMUError):
    """A model directory, family or checkpoint cannot be used."""
