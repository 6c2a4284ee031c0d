"""The errors fisher-scale raises on purpose, and the exit code each means on the command line.

Bad input (a config key, a data file's line, a path, an address, a damaged checkpoint) is found before work
starts wherever it can be, and is reported as one line that names what to change: exit 2. Work that started
and failed (a training run, every trial of a study) exits 1 with its message; its traceback is the one the
failing process printed. Anything else is a bug: exit 1 with the traceback, printed once.
"""

from __future__ import annotations

#: exit codes of ``fisher-scale``
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class FisherScaleError(Exception):
    """The base of the errors fisher-scale raises on purpose."""


class InputError(FisherScaleError, ValueError):
    """Bad input; the message names the key, file:line or path and what was expected."""


class MissingInput(InputError, FileNotFoundError):
    """A file or folder that the input names does not exist."""


class MissingPackage(InputError, ImportError):
    """The input needs a Python package that is not installed; the message holds the install command."""


class DamagedCheckpoint(InputError):
    """A checkpoint whose files do not match its manifest (truncated, or written only in part)."""


class RunFailed(FisherScaleError, RuntimeError):
    """Work that started and failed: a training run, or every trial of a study."""


class NonFiniteError(RunFailed, FloatingPointError):
    """A NaN or infinite loss or gradient with ``train.skip_nonfinite`` off."""


class Interrupted(FisherScaleError):
    """The user stopped the work (Ctrl+C); what was saved can be resumed."""


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for ``error``."""
    if isinstance(error, InputError):
        return EXIT_BAD_INPUT
    if isinstance(error, Interrupted | KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED
