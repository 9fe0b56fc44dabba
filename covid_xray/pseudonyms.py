"""Keyed pseudonyms: how a patient is named anywhere outside the DICOM file itself.

A DICOM PatientID is an identifier: it never leaves this machine, and it is not kept at rest
either (the header memo in the cache holds its pseudonym only). What the manifests, the cache
and the overlap checks hold instead is an HMAC of it under a secret key that stays on this
machine (or is shared by a team through COVID_XRAY_PSEUDONYM_KEY): equal patients get equal
names, and nobody without the key can reverse or recompute one. A base module: the imaging
layer's cache and the data layer's splits both name patients this way.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from covid_xray.errors import UserError


def pseudonym(patient_id: str, key: bytes) -> str:
    """A keyed one-way name for a DICOM PatientID ("" stays ""): HMAC-SHA256 under `key`,
    64 bits of it. Manifests are logged to the tracking server, and a reviewer must be able
    to check the grouping (equal pseudonyms, equal patient) without the identifiers.

    Keyed, because record numbers are few and guessable: an unkeyed hash of every number a
    hospital could issue is a lookup table that reverses them all in seconds."""
    if not patient_id:
        return ""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


PSEUDONYM_KEY_VARIABLE = "COVID_XRAY_PSEUDONYM_KEY"
PSEUDONYM_KEY_FILE = "pseudonym.key"
# A shorter key can be guessed, and with it every pseudonym reversed (record numbers are few).
PSEUDONYM_KEY_MIN_LENGTH = 32


def key_fingerprint(key: bytes) -> str:
    """A name for a key that does not reveal it (a key's HMAC of a fixed text): recorded
    beside what was pseudonymised with it, so another key is noticed, never mixed."""
    return hmac.new(key, b"covid-xray pseudonym key fingerprint", hashlib.sha256).hexdigest()[:16]


def pseudonym_key(cache_dir: str | os.PathLike) -> bytes:
    """The secret pseudonyms are keyed with: $COVID_XRAY_PSEUDONYM_KEY when set, else the key
    file in the cache folder, created once (32 random bytes as hex, mode 0600). It never
    leaves this machine: not logged, not a param, not in the manifest."""
    from_environment = os.environ.get(PSEUDONYM_KEY_VARIABLE, "")
    if from_environment:
        if len(from_environment) < PSEUDONYM_KEY_MIN_LENGTH:
            raise UserError(f"{PSEUDONYM_KEY_VARIABLE} has {len(from_environment)} characters; "
                            f"a pseudonym key needs at least {PSEUDONYM_KEY_MIN_LENGTH} (make "
                            "one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
                            ") and the same one on every machine")
        return from_environment.encode()
    path = Path(cache_dir) / PSEUDONYM_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a temporary name, then linked into place: a reader never sees
        # half a key, and when two processes race, the first link wins and both use it.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
        try:
            os.link(temporary, path)
            print(f"created the pseudonym key {path} (mode 0600): it keys the patient "
                  "pseudonyms in logged manifests; keep it private, back it up, and set "
                  f"{PSEUDONYM_KEY_VARIABLE} to share one key between machines")
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    key = path.read_text().strip()
    if not key:
        raise UserError(f"{path}: the pseudonym key file is empty; delete it to make a new "
                        f"one, or set {PSEUDONYM_KEY_VARIABLE}")
    return key.encode()
