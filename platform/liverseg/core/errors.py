"""liverseg's errors: one base class, one subclass per area. Each message is one line naming the file,
field, URI or version and what is wrong, so the CLI prints it as is (`except LiversegError`).

Each area also keeps its builtin base (ValueError for bad input, RuntimeError for a failed operation),
so callers that caught those before still do.
"""

from __future__ import annotations


class LiversegError(Exception):
    """Base of every error liverseg raises on purpose; the message is one line."""


class ConfigError(LiversegError, ValueError):
    """A config file, profile or override is invalid; the message names the key."""


class InputError(LiversegError, ValueError):
    """A NIfTI file (or a request body) is unusable; the message names the file and the reason."""


class TooLarge(InputError):
    """An input whose decoding or processing would pass a size limit (decompressed bytes, slices); the
    server answers 413 to it, other `InputError`s are 400. `limit` names the limit (`max_slices`, ...)."""

    def __init__(self, msg: str, limit: str = ""):
        super().__init__(msg)
        self.limit = limit


class PredictError(LiversegError, ValueError):
    """Inputs or outputs of a predict run are unusable (missing, an input as output, two inputs to one
    name, an existing file without --overwrite, not writable); names the path."""


class StoreError(LiversegError, RuntimeError):
    """The slice store is missing, of another format, or a case cannot be read; names the case."""


class ModelError(LiversegError, ValueError):
    """A model cannot be built or loaded: unknown encoder, unusable weights, unknown spec format,
    a digest that does not match its registry version; lists the valid choices where there are some."""


class TrainError(LiversegError, RuntimeError):
    """Training cannot start or did not finish."""


class TrackingError(LiversegError, RuntimeError):
    """The tracking store cannot be reached or written; names the URI."""


class AuthError(TrackingError):
    """The tracking server refused the login (401): names the server and the user."""


class RegistryError(LiversegError, RuntimeError):
    """A registry operation cannot proceed."""


class TeamError(LiversegError, RuntimeError):
    """An account operation on the tracking server cannot proceed (missing admin login, user exists)."""


class PermissionRefused(TeamError):
    """The tracking server refuses (or would refuse) this user this action: who, what, which permission."""


def one_line(exc: BaseException) -> str:
    """'TypeName: first line of the message' (just the type when there is no message): how a foreign
    exception is named in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
