"""Typed errors raised at the door, each naming the offending file, field, line or tensor.

Every error lalm raises on bad *input* derives from `LalmError`, so callers (the CLI,
the server, the trainer) can turn it into a one-line message, a 4xx or a skipped
example without catching unrelated bugs.
"""


class LalmError(ValueError):
    """Base class for problems with user input (files, messages, configs, requests)."""


class AudioError(LalmError):
    """Audio that cannot be read, is empty, or is not audio at all."""


class ChatFormatError(LalmError):
    """A conversation that does not follow the message format (roles, parts, audio counts)."""


class ConfigError(LalmError):
    """A config file or option that is unknown, missing or malformed."""


class CheckpointError(LalmError):
    """A checkpoint folder with missing, unexpected or misshapen tensors."""


class ContextLengthError(LalmError):
    """A prompt longer than the model's context."""
