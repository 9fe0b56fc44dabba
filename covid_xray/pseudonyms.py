"""Keyed pseudonyms: how a patient is named anywhere outside the DICOM file itself.

A DICOM PatientID is an identifier: it never leaves this machine, and it is not kept at rest
either (the header memo in the cache holds its pseudonym only). What the manifests, the cache
and the overlap checks hold instead is an HMAC of it under a secret key that stays on this
machine (or is shared by a team through COVID_XRAY_PSEUDONYM_KEY): equal patients get equal
names, and nobody without the key can reverse or recompute one. A base module: the imaging
layer's cache and the data layer's splits both name patients this way.

The key belongs to the user, not to a cache: a cache is disposable (deleted to free disk or
to decode afresh), and a model's patient check needs the key its training used for as long
as the model lives. A PatientID that names no one (an anonymiser's placeholder, or one value
on implausibly many studies) gets no pseudonym: a study carrying it is a patient of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Sequence
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


def key_file() -> Path:
    """The user's key file: $XDG_CONFIG_HOME/covid-xray/pseudonym.key (~/.config when unset;
    a relative XDG_CONFIG_HOME is ignored, as the XDG spec says)."""
    configured = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(configured) if os.path.isabs(configured) else Path.home() / ".config"
    return base / "covid-xray" / PSEUDONYM_KEY_FILE


def key_source() -> str:
    """Where `pseudonym_key` takes the key from, for messages (never the key itself)."""
    return f"${PSEUDONYM_KEY_VARIABLE}" if os.environ.get(PSEUDONYM_KEY_VARIABLE) \
        else str(key_file())


def pseudonym_key(adopt_from: str | os.PathLike | None = None) -> bytes:
    """The secret pseudonyms are keyed with: $COVID_XRAY_PSEUDONYM_KEY when set, else the
    user's key file (`key_file`), made once (32 random bytes as hex, mode 0600). Before it
    exists, a key an earlier version kept in the folder `adopt_from` (a cache, a node's
    state_dir) becomes the user's key, with a line saying so: that user's pseudonyms stay
    theirs. It never leaves this machine: not logged, not a param, not in the manifest."""
    from_environment = os.environ.get(PSEUDONYM_KEY_VARIABLE, "")
    if from_environment:
        if len(from_environment) < PSEUDONYM_KEY_MIN_LENGTH:
            raise UserError(f"{PSEUDONYM_KEY_VARIABLE} has {len(from_environment)} characters; "
                            f"a pseudonym key needs at least {PSEUDONYM_KEY_MIN_LENGTH} (make "
                            "one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
                            ") and the same one on every machine")
        return from_environment.encode()
    path = key_file()
    if not path.exists():
        old = Path(adopt_from) / PSEUDONYM_KEY_FILE if adopt_from is not None else None
        old_key = _read_key(old) if old is not None and old.is_file() else ""
        if _install_key(path, old_key or secrets.token_hex(32)):
            print(f"adopted the pseudonym key of {old} as {path}: every cache and run of this "
                  "user now uses it (the cache's copy is no longer read)" if old_key else
                  f"created the pseudonym key {path} (mode 0600): it keys the patient "
                  "pseudonyms in logged manifests; keep it private, back it up, and set "
                  f"{PSEUDONYM_KEY_VARIABLE} to share one key between machines")
    key = _read_key(path)
    if not key:
        raise UserError(f"{path}: the pseudonym key file is empty; restore it from a backup "
                        f"(models trained under it need it), or set {PSEUDONYM_KEY_VARIABLE}")
    return key.encode()


def _read_key(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise UserError(f"{path}: cannot read the pseudonym key ({error.strerror or error}); "
                        f"fix its permissions, or set {PSEUDONYM_KEY_VARIABLE}") from None


def _install_key(path: Path, key: str) -> bool:
    """Write `key` to `path` unless it exists (mode 0600); whether this call wrote it.
    Written whole under a temporary name, then linked into place: a reader never sees half a
    key, and when two processes race, the first link wins and both use it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        raise UserError(f"cannot make the pseudonym key {path} ({error.strerror or error}); set "
                        f"XDG_CONFIG_HOME to a folder this user can write, or set "
                        f"{PSEUDONYM_KEY_VARIABLE}") from None
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()


def cached_key_fingerprints(folder: str | os.PathLike) -> dict[str, Path]:
    """Fingerprint -> file of a key an earlier version kept in `folder` (a cache): what a
    refusal points to when the user's key is not the one a model needs."""
    path = Path(folder) / PSEUDONYM_KEY_FILE
    key = _read_key(path) if path.is_file() else ""
    return {key_fingerprint(key.encode()): path} if key else {}


# -- PatientIDs that name no one ----------------------------------------------------------

# What anonymisers write where a PatientID was (compared upper-cased, stripped); a value made
# of one repeated character (0, 000000, XXXX, ----, ***) is one too.
PLACEHOLDER_IDS = frozenset({"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "UNKNOWN", "NONE",
                             "NULL", "NA", "N/A", "NO ID", "NOID", "REMOVED", "DELETED",
                             "PATIENT", "ANONYMOUS^PATIENT"})
# A patient is imaged about daily at most: a stay of weeks gives tens of studies. More studies
# than this under one PatientID in one set is no patient but a code (a site's, a batch's).
MAX_STUDIES_PER_PATIENT = 50
# Nor is one person a fifth of a set of more than a few studies.
MAX_PATIENT_SHARE, SHARE_FROM_STUDIES = 0.2, 5
IMPLAUSIBLE_RULE = (f"more than {MAX_STUDIES_PER_PATIENT} studies, or more than "
                    f"{MAX_PATIENT_SHARE:.0%} of the set and more than {SHARE_FROM_STUDIES}")


def is_placeholder_id(patient_id: str) -> bool:
    """Whether a PatientID is an anonymiser's placeholder (or blank): no patient's name."""
    text = patient_id.strip().upper()
    return not text or len(set(text)) == 1 or text in PLACEHOLDER_IDS


def patient_pseudonym(patient_id: str, key: bytes) -> str:
    """The pseudonym a patient is matched by: "" for a placeholder, which names no one."""
    return "" if is_placeholder_id(patient_id) else pseudonym(patient_id, key)


def implausible_patients(patients: Sequence[str]) -> dict[str, int]:
    """Pseudonym -> study count of each one that names implausibly many of a set's studies
    (`IMPLAUSIBLE_RULE`, one entry of `patients` per study): a placeholder no list knows."""
    counts = Counter(patient for patient in patients if patient)
    total = len(patients)
    return {patient: count for patient, count in counts.items()
            if count > MAX_STUDIES_PER_PATIENT
            or (count > SHARE_FROM_STUDIES and count > MAX_PATIENT_SHARE * total)}
