"""raykd's error types, in a module that imports nothing of raykd: the registries, models and
losses raise them, and the config (which validates names through those registries) re-exports
them, so no import runs back from a registry to the config."""


class ConfigError(ValueError):
    """Bad user input. ``str(err)`` is one line: ``field: what is wrong; what is allowed``."""


class TrainingError(RuntimeError):
    """A training run failed on the cluster; the message names the run and the cause."""
