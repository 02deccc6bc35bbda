"""The one exception type users see."""

from __future__ import annotations


class E4SRecError(Exception):
    """A user-facing error.

    The message is one line that says what is wrong, where (file, line, column or field) and how to
    fix it. The CLI prints it without a traceback and exits non-zero; stages raise it before their
    output folder is put in place, so a failed stage leaves no partial artifact behind.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Stopped(BaseException):
    """SIGTERM arrived: raised where the process is, like Ctrl-C's KeyboardInterrupt, so that a
    stage's staged output is deleted on the way out instead of left as a partial folder."""
