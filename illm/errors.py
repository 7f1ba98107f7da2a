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
