"""Errors a user can cause. The CLI prints them as one line and exits with code 2 (no traceback)."""


class OmniError(Exception):
    """Bad input from the user: a missing file, a wrong config key, an out-of-range value.

    The message names what was wrong and the valid choices; `omni` prints it and exits 2.
    """


class ConfigError(OmniError, ValueError):
    """A config key, type or value that is not accepted."""


class VocabMismatchError(OmniError):
    """Ids, data or a checkpoint made with another tokenizer bundle."""


class DecodeError(OmniError, ValueError):
    """A malformed id sequence met in strict decoding."""
