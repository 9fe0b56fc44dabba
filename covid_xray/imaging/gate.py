"""The input gate: which films this model may be asked about, with a stable reason code for
each refusal (the `reason` column of predict's CSV and of the served model's reply).

Codes: `modality` (not CR, DX or RG), `photometric` (not MONOCHROME1/2), both checked by every
read (imaging/dicom.py); `view` (a lateral or other non-frontal ViewPosition) and `body_part`
(BodyPartExamined present and not the chest), checked here before any pixel is decoded;
`unreadable` for a file that cannot be decoded at all. A frontal film whose ViewPosition is
missing passes, flagged `view_unknown`: SIIM's exports often drop it.

Training leaves out what the gate would refuse (data/studies.py: `passes_gate`, from the
cached headers): a model is not trained on films it would refuse to answer about. SIIM names
the chest in several languages and forms (`CHEST_WORDS`).
"""

from __future__ import annotations

from covid_xray.errors import DicomError

REASONS = ("modality", "photometric", "view", "body_part", "unreadable")
FRONTAL_VIEWS = ("AP", "PA")  # ViewPosition values starting so are frontal (AP SUPINE too)
# BodyPartExamined naming the chest, as SIIM's sites write it (English, Spanish, Latin,
# German, French), alone or inside a longer value ("PORT CHEST", "2- TORAX").
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "PECHO", "BRUST", "POITRINE", "LUNG")


def check(view_position: str, body_part_examined: str, name: object) -> tuple[str, ...]:
    """Refuse (DicomError with its reason) a film this model cannot read, from its header's
    ViewPosition and BodyPartExamined; the flags of one it lets through."""
    view = view_position.strip().upper()
    if view and not view.startswith(FRONTAL_VIEWS):
        raise DicomError(f"{name}: view {view} is not frontal (AP or PA); this model reads "
                         "frontal chest films only", reason="view")
    body_part = body_part_examined.strip().upper()
    if body_part and not any(word in body_part for word in CHEST_WORDS):
        raise DicomError(f"{name}: body part {body_part} is not the chest; this model reads "
                         "chest films only", reason="body_part")
    return () if view else ("view_unknown",)
