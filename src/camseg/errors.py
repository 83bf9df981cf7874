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


class CoverageStop(CamsegError):
    """Stage 2 stopped the run: its pseudo-masks leave a class uncovered (report.md says why)."""


class DatasetProblems(DatasetError):
    """Every problem found in one dataset root (up to a cap), so all are fixed in one go.

    ``str()`` is one line: the problem itself when there is one, else the count and the
    first few; ``problems`` holds the collected messages, ``total`` counts all of them.
    """

    def __init__(self, root: object, problems: list[str], total: int, shown: int = 2) -> None:
        self.root = root
        self.problems = list(problems)
        self.total = total
        super().__init__(self.summary(shown))

    def summary(self, shown: int = 2) -> str:
        if self.total == 1 and self.problems:
            return self.problems[0]
        head = self.problems[:shown]
        more = self.total - len(head)
        tail = f"; ... and {more} more" if more else ""
        return (
            f"{self.root}: {self.total} problems: {'; '.join(head)}{tail} "
            f"(camseg-data check {self.root} lists them)"
        )
