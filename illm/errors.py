"""Errors meant for users: each carries a one-line message naming what is wrong."""


class IllmError(Exception):
    """A problem with user input (a file, a key, a value). Entry points print it as one line."""


class ConfigError(IllmError):
    """An experiment config has an unknown key, a wrong type or a bad value."""


class FormatError(IllmError):
    """A compressed file is not a valid .illm file (bad magic, truncated, CRC mismatch...)."""


class WeightsMismatchError(IllmError):
    """A compressed file was made with other weights than the ones given for decoding."""


class MissingWeightsError(IllmError):
    """Pretrained backbone weights (LPIPS, Inception, ...) are not available offline."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (torch's are often paragraphs), else its type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
