"""Errors meant for users: each carries a one-line message naming what is wrong."""

# Exit statuses of the training scripts (and of every `illm` program for the first one).
EXIT_ERROR = 1  # bad input or config, or a diverged run: the same command fails again
EXIT_LOST_PEER = 69  # a collective failed or timed out: another process or machine stopped
EXIT_WRITE_FAILED = 74  # a checkpoint, event file or config.toml could not be written (disk full?)
EXIT_STOPPED = 75  # SIGTERM or SIGUSR1: stopped after writing a checkpoint; the same command resumes


class IllmError(Exception):
    """A problem with user input (a file, a key, a value). Entry points print it as one line."""

    exit_code = EXIT_ERROR
    kind = "error"  # the word after the program's name: `<program>: error: ...`


class ConfigError(IllmError):
    """An experiment config has an unknown key, a wrong type or a bad value."""


class FormatError(IllmError):
    """A compressed file is not a valid .illm file (bad magic, truncated, CRC mismatch...)."""


class WeightsMismatchError(IllmError):
    """A compressed file was made with other weights than the ones given for decoding."""


class MissingWeightsError(IllmError):
    """Pretrained backbone weights (LPIPS, Inception, ...) are not available offline."""


class LostPeerError(IllmError):
    """A collective operation failed: another training process or machine is gone."""

    exit_code = EXIT_LOST_PEER


class WriteFailedError(IllmError):
    """A file of the run (checkpoint, event file, config.toml) could not be written."""

    exit_code = EXIT_WRITE_FAILED


class RunStopped(IllmError):
    """Not a failure: the run was asked to stop (preemption) and wrote a checkpoint first."""

    exit_code = EXIT_STOPPED
    kind = "stopped"


def one_line(error: BaseException) -> str:
    """The first line of an error's message (torch's are often paragraphs), else its type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
