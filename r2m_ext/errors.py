"""The one user-facing error type. Its message is a single line naming the file and tensor."""


class R2MError(ValueError):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""
