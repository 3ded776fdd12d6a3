"""Errors a user can fix, for callers that catch them without importing the modules raising them.

``vit-accel`` (cli.py) imports the checkpoint readers and the data pipeline only when a command
needs them; their errors derive from ``InputError`` here, so the CLI catches them by class and
prints one line. ``ConfigError`` (re-exported by config.py) lives here too, so modules that
config.py itself calls (the schedule checks) raise it without importing config.py.
No imports: Python 3.8 compatible, cheap for the CLI to load.
"""


class ConfigError(ValueError):
    """A recipe that cannot run, with a message that says what to change."""


class InputError(Exception):
    """A file or dataset that cannot be used (a checkpoint, a shard); the message says what to change."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing and what to do."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file size limit, I/O error); the previous
    complete checkpoint is untouched."""
