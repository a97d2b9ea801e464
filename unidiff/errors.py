"""User-facing errors.

Anything a user can get wrong (a config key, a data folder, a checkpoint, a CLI argument) raises
:class:`UnidiffError` with a one-line message naming the bad thing. The CLI turns it into
``unidiff: error: <message>`` on stderr and exit code 2, with no traceback.
"""


class UnidiffError(Exception):
    """A problem with the user's input; the message names the bad key, file or value."""


class ConfigError(UnidiffError, ValueError):
    """A config file, key or value is wrong."""


class DataError(UnidiffError, ValueError):
    """A dataset, folder or file is missing or malformed."""


class CheckpointError(UnidiffError, FileNotFoundError):
    """A run folder or checkpoint is missing or unreadable."""
