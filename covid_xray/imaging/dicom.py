"""One DICOM file -> one float32 image in [0, 1], bone bright (MONOCHROME2).

The order follows the DICOM grayscale pipeline (PS3.4 N.2): stored values -> modality LUT
(rescale slope/intercept) -> VOI LUT or window -> presentation (MONOCHROME1 is inverted).
Decoding is pydicom's. It first asks our imagecodecs plugin (decoders.py: the same
pixels, faster), then every installed plugin (GDCM, pylibjpeg, Pillow) in turn, so RLE, JPEG
Baseline/Extended/Lossless, JPEG-LS and JPEG 2000 all work.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from os import PathLike
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from covid_xray.errors import DicomError, first_line
from covid_xray.imaging import decoders, quiet  # noqa: F401 (quiet: its filters, once)
from covid_xray.imaging.gate import check

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Projection radiography: computed (CR), digital (DX) and the retired RG. A file without a
# Modality tag is accepted too (old exports drop it). BodyPartExamined is not checked: SIIM
# writes CHEST, TORAX, PECHO, THORAX or nothing.
RADIOGRAPHY = ("CR", "DX", "RG")
# The most pixel data a header may claim (Rows x Columns x frames x bytes per sample): 100
# megapixels at 16 bits. The largest chest detectors give about 4300 x 4300 (37 MB); a header
# claiming more is refused before any pixel is decoded, so a few KB of RLE that would unpack
# to gigabytes (a decompression bomb) costs nothing.
MAX_PIXEL_BYTES = 200_000_000

decoders.register()


# What a result keeps of the source film's header: the UIDs results are keyed by in DICOM.
UID_FIELDS = {"study_instance_uid": "StudyInstanceUID",
              "series_instance_uid": "SeriesInstanceUID", "sop_instance_uid": "SOPInstanceUID"}
# Beside them in a film's `uids`: who the film shows, as a digest of the patient fields. It
# only tells two patients apart (films of one study naming different patients get no study
# answer); it is never written out.
PATIENT_KEY = "patient"
PATIENT_FIELDS = ("PatientID", "PatientName", "PatientBirthDate")


@dataclass(frozen=True)
class Film:
    """A decoded film and what its header says about it."""

    image: np.ndarray  # 2-D float32 in [0, 1], bone bright
    uids: dict[str, str]  # UID_FIELDS' keys -> the header's values ("" when missing)
    flags: tuple[str, ...] = ()  # the gate's notes on a film it let through (view_unknown)


def read_film(path: str | PathLike | BinaryIO, *, apply_voi_lut: bool = True,
              gate: bool = False) -> Film:
    """`read_xray`, plus the film's UIDs, with `gate` the input gate first (imaging/gate.py:
    lateral views and other body parts refused with their reason codes, before decoding)."""
    name = path if isinstance(path, str | PathLike) else getattr(path, "name", "<stream>")
    ds = _checked(path, name)
    uids = {key: _text(ds, keyword) for key, keyword in UID_FIELDS.items()}
    uids[PATIENT_KEY] = hashlib.blake2b("\x00".join(_text(ds, keyword) for keyword in
                                                    PATIENT_FIELDS).encode(),
                                        digest_size=8).hexdigest()
    try:
        flags = check(_text(ds, "ViewPosition"), _text(ds, "BodyPartExamined"), name) \
            if gate else ()
        return Film(_image(ds, name, apply_voi_lut), uids, flags)
    except DicomError as error:
        error.uids = uids  # a refused film still belongs to its study
        raise


def read_xray(path: str | PathLike | BinaryIO, *, apply_voi_lut: bool = True) -> np.ndarray:
    """Decode `path` (or an open binary file; its `name` is used in errors) into a 2-D float32
    array in [0, 1] where bone is bright.

    With `apply_voi_lut` the file's VOI LUT or first window is applied (what the modality meant
    a reader to see); without it, or when the file has none, the full range the stored bits
    can hold is mapped to [0, 1], so the values keep their absolute meaning across images.

    Whatever is wrong with the file (any header field may be malformed) is a `DicomError`
    naming it, never another exception: one bad file must be that file's error row.
    """
    # What error messages call the input: the path as given, or an open file's name.
    name = path if isinstance(path, str | PathLike) else getattr(path, "name", "<stream>")
    return _image(_checked(path, name), name, apply_voi_lut)


def _checked(path: str | PathLike | BinaryIO, name: object) -> pydicom.Dataset:
    """`_read_dataset`, with anything it raises besides a DicomError (a malformed tag while
    checking modality or colour) worded as one."""
    try:
        return _read_dataset(path, name)
    except DicomError:
        raise
    except Exception as error:
        raise DicomError(f"{name}: malformed DICOM header ({_one_line(error)})") from None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """A header field as stripped text; "" when missing or malformed."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:
        return ""


def _image(ds: pydicom.Dataset, name: object, apply_voi_lut: bool) -> np.ndarray:
    """The film of a dataset `_read_dataset` accepted (see `read_xray`)."""
    try:
        _refuse_oversized(ds, name)
        image = _grayscale(_decode_first_frame(ds, name), ds, apply_voi_lut, name)
    except DicomError:
        raise
    except Exception as error:  # a text WindowCenter, an empty VOILUTSequence, ...
        raise DicomError(f"{name}: malformed DICOM header ({_one_line(error)})") from None
    if not np.isfinite(image).all():
        raise DicomError(f"{name}: malformed DICOM header (its rescale or window gives "
                         "non-finite pixel values)")
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    if image.min() == image.max():
        raise DicomError(f"{name}: blank image (every pixel is {float(image.flat[0]):g} after "
                         "rescale and window); nothing to read")
    return image


def _grayscale(pixels: np.ndarray, ds: pydicom.Dataset, apply_voi_lut: bool,
               name: object) -> np.ndarray:
    """Stored values -> float64 in about [0, 1], bone bright (PS3.4 N.2), unclipped."""
    modality = apply_modality_lut(pixels, ds)
    values = modality.astype(np.float64)
    if values.min() == values.max():  # a blank film, or RescaleSlope 0: nothing to see
        raise DicomError(f"{name}: blank image (every pixel is {values.flat[0]:g} after "
                         "rescale); nothing to read")
    if apply_voi_lut and "VOILUTSequence" in ds:
        image = _apply_voi_lut_sequence(modality, ds)
    elif apply_voi_lut and "WindowCenter" in ds and "WindowWidth" in ds:
        image = _apply_window(values, ds)
    else:
        low, high = _modality_range(ds)
        image = (values - low) / (high - low)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image  # MONOCHROME1 shows low values bright: flip so bone is bright
    return image


def _refuse_oversized(ds: pydicom.Dataset, name: object) -> None:
    """Refuse a header that claims more pixel data than MAX_PIXEL_BYTES, before decoding."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bytes_per_sample = (int(ds.BitsAllocated) + 7) // 8
    claimed = int(ds.Rows) * int(ds.Columns) * frames * bytes_per_sample * int(
        ds.get("SamplesPerPixel", 1) or 1)
    if claimed > MAX_PIXEL_BYTES:
        raise DicomError(f"{name}: header claims {ds.Rows} x {ds.Columns} pixels x {frames} "
                         f"frame(s) ({claimed / 1e6:.0f} MB), over the {MAX_PIXEL_BYTES / 1e6:.0f}"
                         " MB cap for one film; refused before decoding")


def error_line(name: object, error: BaseException) -> str:
    """The one-line error row of a file: a DicomError's own message (it names the file), or
    any other exception named after the file. Every per-file error path words it so."""
    if isinstance(error, DicomError):
        return str(error)
    return f"{name}: cannot read ({_one_line(error)})"


def _one_line(error: BaseException) -> str:
    """An exception as one short line: its type and first line of text."""
    text = first_line(error, 200)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# Read from every header once (with the PatientID that groups studies by patient) and kept
# in the cache's memo: the subgroup tables of every evaluation come from them.
HEADER_FIELDS = ("PatientID", "PatientSex", "PatientAge", "ViewPosition", "Manufacturer",
                 "BodyPartExamined")


def read_header(path: str | PathLike) -> dict[str, str]:
    """HEADER_FIELDS from the header alone, without touching the pixel data, each stripped
    ("" when missing, blank or malformed). A file whose header cannot be read at all raises
    `DicomError`: the caller must not take a failed read for "no patient" and remember it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
    except Exception as error:  # I/O errors, garbage
        raise DicomError(f"{path}: cannot read the header ({_one_line(error)})") from None
    # One malformed tag is that field missing, not the file unreadable.
    return {name: _text(ds, name) for name in HEADER_FIELDS}


def read_patient_id(path: str | PathLike) -> str:
    """PatientID (0010,0020) from the header alone; "" when the tag is missing or blank."""
    return read_header(path)["PatientID"]


def _read_dataset(path: str | PathLike | BinaryIO, name: object) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise DicomError(f"{name}: file not found") from None
    except InvalidDicomError:
        raise DicomError(f"{name}: not a DICOM file (no 'DICM' marker)") from None
    except OSError as error:  # a symlink loop, a folder named .dcm, an I/O error
        raise DicomError(f"{name}: cannot open ({error.strerror or _one_line(error)})") from None
    except Exception as error:  # pydicom raises many types for a cut-off or garbled file
        raise DicomError(f"{name}: unreadable DICOM, truncated or corrupt ({error})") from None
    if "PixelData" not in ds:
        # pydicom only warns when a file ends inside an element, and drops it: cut inside
        # encapsulated (compressed) pixel data, a film would read as "no pixel data".
        if _holds_pixel_data_tag(path):
            raise DicomError(f"{name}: truncated DICOM (the file ends inside its pixel data)")
        raise DicomError(f"{name}: DICOM has no pixel data (not an image)")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPHY:
        raise DicomError(f"{name}: modality {modality} is not a radiograph (CR, DX); this "
                         "model reads chest X-rays only", reason="modality")
    photometric = ds.get("PhotometricInterpretation", "")
    if ds.get("SamplesPerPixel", 1) != 1 or photometric not in GRAYSCALE:
        raise DicomError(
            f"{name}: colour image ({photometric or 'no PhotometricInterpretation'}, "
            f"{ds.get('SamplesPerPixel', '?')} samples per pixel); chest X-rays must be "
            "grayscale", reason="photometric")
    return ds


def _holds_pixel_data_tag(path: str | PathLike | BinaryIO) -> bool:
    """Whether the file's bytes hold the Pixel Data tag (7FE0,0010), little or big endian:
    decided from the file itself, since a warning caught per call is caught for every thread
    (catch_warnings swaps the process's filters: one film's warning lands in another's list)."""
    if hasattr(path, "seek"):
        path.seek(0)
        data = path.read()
    else:
        with open(path, "rb") as file:
            data = file.read()
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _decode_first_frame(ds: pydicom.Dataset, name: object) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError, TypeError):
        decoder = None
    if decoder is None or not decoder.is_available:
        raise DicomError(f"{name}: unsupported transfer syntax "
                         f"{getattr(syntax, 'name', syntax)} ({syntax})")

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        warnings.warn(f"{name}: {frames} frames, using the first", stacklevel=3)
    # index=0 decodes only the first frame instead of the whole cine loop.
    first = 0 if frames > 1 else None
    pixels = _decode_fast(ds, first) if syntax in decoders.SYNTAXES else None
    if pixels is None:
        try:
            ds.pixel_array_options(index=first)  # every plugin pydicom has, in its order
            pixels = ds.pixel_array
        except Exception as error:
            # pydicom lists each plugin's failure on a line of its own: keep it to one line.
            lines = [line.strip() for line in str(error).splitlines()]
            why = "; ".join(line for line in lines if line and not line.startswith("Unable to"))
            raise DicomError(f"{name}: cannot decode {syntax.name} pixel data, truncated or "
                             f"corrupt ({why})") from None
    if pixels.ndim != 2:
        raise DicomError(f"{name}: expected a 2-D image, got pixel array of shape {pixels.shape}")
    return pixels


def _decode_fast(ds: pydicom.Dataset, first: int | None) -> np.ndarray | None:
    """The pixels from our imagecodecs plugin, or None when it declines the file or fails on
    it: pydicom's own plugins then try, and word the error of a file none can read."""
    try:
        ds.pixel_array_options(index=first, decoding_plugin=decoders.LABEL)
        return ds.pixel_array
    except Exception:
        return None


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The values the stored bits can take, after the modality LUT."""
    bits = int(ds.BitsStored)
    if ds.PixelRepresentation == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    if "ModalityLUTSequence" in ds:
        lut = ds.ModalityLUTSequence[0]
        return 0.0, float(2 ** int(lut.LUTDescriptor[2]) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    low, high = low * slope + intercept, high * slope + intercept
    return (min(low, high), max(low, high))


def _apply_window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The first window (PS3.3 C.11.2.1.2), straight to [0, 1]."""
    center = float(_first(ds.WindowCenter))
    width = float(_first(ds.WindowWidth))
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return (values - center) / width + 0.5
    width = max(width, 1.0)  # LINEAR requires width >= 1
    return (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5


def _apply_voi_lut_sequence(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """A VOI LUT table lookup; its output bits give the range."""
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    return apply_voi(values, ds).astype(np.float64) / (2**bits - 1)


def _first(value: object) -> object:
    """Window tags may hold several values; the first is the default view."""
    return value[0] if isinstance(value, pydicom.multival.MultiValue) else value
