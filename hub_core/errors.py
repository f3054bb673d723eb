"""User-facing errors.

Every error a user can cause derives from :class:`AdapterHubError`; the CLI prints its message on
one line and exits non-zero, the server maps it to a gRPC status. Messages name the thing, the
value and the fix.
"""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base of every expected error (bad input, missing thing, refused operation)."""

    exit_code = 2


class ConfigError(AdapterHubError, ValueError):
    """A method config, training option or CLI value is invalid."""


class DataError(AdapterHubError, ValueError):
    """A training data file is malformed (names file, line and reason)."""


class PluginError(AdapterHubError):
    """A plugin could not be found, imported or registered."""


class NotMergeable(AdapterHubError):
    """The method cannot fold its adapter into the base weights (prefix, prompt, ...)."""


class MergeError(AdapterHubError):
    """A merge was refused (non-finite result, nothing to unmerge, ...)."""


class BaseModelError(AdapterHubError):
    """A base model cannot be found, loaded or quantized."""


class BaseMismatch(AdapterHubError):
    """An adapter was trained on another base model (names both fingerprints)."""


class NotFound(AdapterHubError, LookupError):
    """A task, version, tag or file does not exist."""


class InvalidReference(AdapterHubError, ValueError):
    """A registry reference or name is malformed."""


class IntegrityError(AdapterHubError):
    """Stored bytes no longer match their recorded hash, or a file type is refused."""


class LimitExceeded(AdapterHubError, ValueError):
    """A request exceeds a configured limit (tokens, adapters, sizes)."""


class Overloaded(AdapterHubError):
    """The server queue is full; retry later."""
