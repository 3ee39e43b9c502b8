"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2."""


class MlxRftError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
