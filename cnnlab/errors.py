"""The one exception type users see: a clear message, no traceback."""


class ConfigError(ValueError):
    """Bad input found before (or instead of) doing work.

    The message names the bad value and what is allowed. The command line
    prints it as `error: <message>` and exits with status 2.
    """


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that is not finite). The MLflow run is marked FAILED,
    the last good checkpoint is kept, and the command line prints one `error:` line (exit 1)."""
