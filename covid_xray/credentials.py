"""How every layer shows a URL that may carry a password (an Optuna storage, a DICOMweb
destination, a tracking server): the password masked, `//user:***@host`, in whatever is
logged, printed or kept as an MLflow param or tag."""

from __future__ import annotations

import re

# user:password@ after a scheme's "//" (the password may hold spaces: docs/team-server.md's
# does); a user alone is not a secret and stays readable
PASSWORD_IN_URL = re.compile(r"//([^/@:\s]*):[^/@]*@")


def hide_password(text: str) -> str:
    """`text` with the password of every URL in it masked."""
    return PASSWORD_IN_URL.sub(r"//\1:***@", text)
