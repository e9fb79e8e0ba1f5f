"""User-facing errors.

A :class:`SpotpipeError` carries one line that names the context (config key, file, action,
rank) and what is allowed. The CLI prints it without a traceback and exits non-zero.
"""


class SpotpipeError(Exception):
    """An error caused by input or environment that the user can fix; printed as one line."""


class ConfigError(SpotpipeError):
    """A bad configuration value: the message names the key and the allowed range."""
