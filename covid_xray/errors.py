"""The one error type users see.

Library code raises `UserError` for anything the user can fix (a bad file, a missing folder, a
malformed CSV). Entry points catch it and print its message as a single line, then exit non-zero:
no traceback for mistakes that are not bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""


class DicomError(UserError):
    """A DICOM file that cannot be turned into an image, or that the input gate refuses; the
    message names the file, `reason` is a stable code for the output's `reason` column
    (imaging/gate.py lists them)."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (an MlflowException's `message`, without its
    code), at most `limit` characters; "" when it has none. Messages from other libraries
    run to many lines (a server's HTML page, a Java stack): a user's line quotes this."""
    text = str(getattr(error, "message", error)).strip()
    return text.splitlines()[0].strip()[:limit] if text else ""


class RunStopped(Exception):
    """Ends a run on purpose (an Optuna pruning decision): its MLflow run is KILLED, not
    FAILED."""
