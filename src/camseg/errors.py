"""User-facing errors: one clear line naming the file, the field and the fix."""


class CamsegError(Exception):
    """An error caused by the user's input or configuration.

    The command-line entry points print its message as one line (no traceback) and
    exit with status 2.
    """


class DatasetError(CamsegError):
    """A dataset root that does not follow the camseg folder format."""


class ManifestError(CamsegError):
    """A pseudo-label manifest that is missing, malformed or does not match its inputs."""


class ConfigError(CamsegError):
    """A configuration value that cannot work."""
