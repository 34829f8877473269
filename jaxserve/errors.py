"""Typed errors raised at jaxserve's public boundaries.

Expected failures (bad config, bad checkpoint, bad request) derive from JaxserveError,
so the CLI can print one clear line and exit non-zero instead of a traceback.
"""


class JaxserveError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(JaxserveError, ValueError):
    """A deployment config file or value is wrong."""


class DeploymentError(ConfigError):
    """The processes of a deployment disagree (config, process count). Every process finds
    the same fault at the same point, so each leaves at once: the distributed runtime's
    shutdown would wait for processes that are leaving too."""


class CheckpointError(JaxserveError, ValueError):
    """A checkpoint is missing, truncated, unsupported or disagrees with the config."""


class InvalidRequestError(JaxserveError, ValueError):
    """A request is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
