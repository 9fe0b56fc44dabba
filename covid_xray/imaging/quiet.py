"""The warnings this project silences, once for the process when imported, never per call.

pydicom and highdicom warn about a malformed value by quoting it ("Invalid value for VR PN:
'Doe^Jane'", highdicom's single-component person name): a patient's name or id in the log of
a server that runs for months. Each value we use is checked where it is used (a result drops
an invalid one), and a file that ends inside an element is refused as truncated, in its own
words (imaging/dicom.py), so these warnings, and only these, are silenced.

Once, not per call: `warnings.catch_warnings` saves and restores the process's whole filter
list, so threads entering and leaving it out of turn (a served model answers many calls at
once) can leave the process ignoring every warning, or one call catching another's.
"""

from __future__ import annotations

import warnings

QUOTING_VALUES = (r"Invalid value for VR ",
                  r'The string ".*" is unlikely to represent the intended person name',
                  r"End of file reached before delimiter")
for message in QUOTING_VALUES:
    warnings.filterwarnings("ignore", message=message, category=UserWarning)
