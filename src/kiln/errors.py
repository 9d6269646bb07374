"""Errors a user can cause and fix. Each message is one line: the problem, the value, the fix.

The CLI prints the message and exits with code 2; the server maps these to 4xx responses.
"""


class KilnError(Exception):
    """Base class: a mistake in the input that the user can correct."""

    exit_code = 2


class ModelNotFoundError(KilnError):
    """The model path or name does not exist."""


class ModelFormatError(KilnError):
    """The model files are missing, truncated, corrupt or of an unknown layout."""


class UnsupportedArchitectureError(KilnError):
    """The model's architecture is not one kiln's graph implements."""


class ContextLengthError(KilnError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class InvalidParameterError(KilnError):
    """A generation or command parameter is out of its allowed range (`param`: its name, when one field is wrong)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DataNotFoundError(KilnError):
    """An evaluation or calibration data file is not where kiln looks for it."""


class DataFormatError(KilnError):
    """A data file has a malformed line or record."""


class EndpointError(KilnError):
    """A server that `kiln eval --api` scores through cannot be reached, refuses the request, or does not return
    what the task needs (prompt log-probabilities)."""


class Interrupted(KilnError):
    """Ctrl-C during long work that can be resumed; the message says how."""

    exit_code = 130
