"""The errors users see, and the one place that turns an error into its `error:` line and exit
status: bad input is status 2, a run that could not go on is status 1, and neither prints a
traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

BAD_INPUT = 2  # nothing was trained; fix the input and run again
FAILED = 1  # training stopped; the last good checkpoint is kept


class ConfigError(ValueError):
    """Bad input found before (or instead of) doing work.

    The message names the bad value and what is allowed. The command line
    prints it as `error: <message>` and exits with status 2.
    """


class RunInUse(ConfigError):
    """Another process trains in this run directory now (the same command, started twice): this
    one stops before touching the run (status 2); the other goes on undisturbed."""


class CodeChanged(ConfigError):
    """The run this command would continue began under other code or packages (run.resume=auto):
    this one stops before touching it (status 2); in a sweep, no FAILED run is recorded for it."""


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that is not finite). The MLflow run is marked FAILED,
    the last good checkpoint is kept, and the command line prints one `error:` line (exit 1)."""


class Interrupted(BaseException):
    """A signal stopped the job: SIGTERM (a scheduler's preemption, `kill`) or SIGINT (Ctrl-C).
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it.
    The command line prints one `error:` line and exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str | None = None):
        import signal

        self.signum = signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


def exit_status(error: BaseException) -> int:
    if isinstance(error, Interrupted):
        return 128 + error.signum
    return FAILED if isinstance(error, TrainingError) else BAD_INPUT


def fail(error: BaseException | str, status: int | None = None) -> int:
    """Print `error: <one line>` on stderr; return the exit status (given, or the error's own)."""
    text = error if isinstance(error, str) else error_text(error)
    print(f"error: {printable(text)}", file=sys.stderr)
    return status if status is not None else exit_status(error) if isinstance(error, BaseException) else FAILED


# C0 and C1 control characters (newline, escape, ...): a value that holds one would break the one
# line in two, or reach the terminal as a command (an ANSI escape sequence recolouring or clearing it).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LONGEST_VALUE = 200  # characters of one echoed value (a run without spaces) kept in an error line
_LONG_RUN = re.compile(rf"\S{{{LONGEST_VALUE + 1},}}")


def printable(text: str) -> str:
    """One printable line: control characters escaped as Python writes them (`\\n`, `\\x1b`),
    and a run of more than LONGEST_VALUE characters without a space (an echoed value) cut, with
    a note of its length."""
    escaped = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return _LONG_RUN.sub(lambda m: f"{m.group()[:LONGEST_VALUE]}... (cut: {len(m.group())} characters)", escaped)


def error_text(error: BaseException) -> str:
    """One line for a bad-input error: ConfigError's own, Hydra's and OmegaConf's multi-line
    messages folded, with the allowed values named where Hydra knows them."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    def fold(text: str) -> str:
        return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())

    if isinstance(error, OverrideParseException):
        lexer = re.match(r"LexerNoViableAltException: .*\n( *)\^", error.message, re.DOTALL)
        if lexer:  # Hydra echoes the whole override and a caret under the character it stopped at
            at = len(lexer.group(1)) - len("LexerNoViableAltException: ")
            char = error.override[at] if 0 <= at < len(error.override) else "?"
            return (f"cannot parse the override '{error.override}': character {at} ({char!r}) is not "
                    f"allowed unquoted; quote the value (key='...') or see "
                    f"https://hydra.cc/docs/1.2/advanced/override_grammar/basic")
        return f"cannot parse the override '{error.override}': {fold(error.message)}"
    if isinstance(error, MissingConfigException) and error.options:
        group = str(error.missing_cfg_file).rpartition("/")[0]
        return (f"Could not find '{error.missing_cfg_file}'; available options in '{group}': "
                f"{', '.join(error.options)}")
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(error).startswith("Could not override"):
        full_key = str(cause.full_key or "")
        parent = cause.parent_node
        if full_key and isinstance(parent, Mapping) and "not in struct" in str(cause):
            group, _, leaf = full_key.rpartition(".")
            where = f"{group} has no key '{leaf}'" if group else f"there is no top-level key '{leaf}'"
            keys = sorted(str(k) for k in parent.keys() if k != "hydra")  # Hydra's own, not cnnlab's
            return f"Could not override '{full_key}': {where}; allowed: {', '.join(keys)}"
    if isinstance(error, OmegaConfBaseException) and str(error).strip():
        # OmegaConf appends "full_key: ..." and "object_type=..." lines; name the key once.
        where = f" (at {error.full_key})" if getattr(error, "full_key", None) else ""
        return f"{str(error).strip().splitlines()[0]}{where}"
    return fold(str(error))
