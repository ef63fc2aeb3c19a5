"""The one exception type users see; the CLI turns it into a one-line message and exit code 2."""

__all__ = ["OnnxqError"]


class OnnxqError(ValueError):
    """Bad input or settings: the message says what was expected and what was found."""
