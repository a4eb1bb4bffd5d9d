"""lorakit's exceptions: each message names the problem and the fix."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on bad input."""


class ConfigError(LorakitError, ValueError):
    """A `LoraConfig` or recipe value is invalid."""


class TargetError(LorakitError, ValueError):
    """Target modules matched nothing, or matched a module lorakit cannot adapt."""


class AdapterStateError(LorakitError, RuntimeError):
    """An adapter operation does not fit the model's current state (unknown/duplicate name, merged...)."""


class AdapterError(LorakitError, ValueError):
    """An adapter file or folder cannot be read, or does not fit the model."""


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss, unreadable or incompatible checkpoint...)."""
