"""Writing DICOMs: the test fixtures, the synthetic demo data and the example request stored
with every model. Any pixel array, in any of the transfer syntaxes the reader handles (pydicom
writes native and RLE; imagecodecs encodes JPEG 2000, JPEG-LS and the JPEG family)."""

from __future__ import annotations

from os import PathLike

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
# What write_dicom encodes with loss (and marks so, as PS3.3 C.7.6.1.1.5 asks).
LOSSY_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless)


def write_dicom(
    path: str | PathLike,
    stored: np.ndarray,
    *,
    syntax: UID = ExplicitVRLittleEndian,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    signed: bool = False,
    patient_id: str = "",
    modality: str = "CR",
    header: dict[str, str] | None = None,
) -> None:
    """Write `stored` (the stored pixel values, 2-D or frames x rows x cols) as a CR DICOM.

    `rescale` is (slope, intercept); `window` is (center, width) in rescaled units.
    Lossless syntaxes give back exactly `stored`; Baseline and Extended are lossy JPEG.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = patient_id
    for keyword, value in (header or {}).items():  # PatientSex, PatientAge, ViewPosition...
        setattr(ds, keyword, value)

    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (f"{v:g}" for v in rescale)
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in window)

    _set_pixels(ds, stored, syntax, signed)
    ds.save_as(path, enforce_file_format=True)


def _set_pixels(ds: Dataset, stored: np.ndarray, syntax: UID, signed: bool) -> None:
    """`stored` into `ds`'s Pixel Data, encoded in `syntax` (the image attributes set)."""
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}
    stored = np.ascontiguousarray(stored, dtype=dtype[(ds.BitsAllocated, signed)])
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    elif syntax == RLELossless:
        ds.compress(syntax, stored)  # pydicom's own numpy RLE encoder
    else:
        # pydicom cannot write the JPEG family and its JPEG 2000 encoder refuses images under
        # 32 px; imagecodecs (libjpeg-turbo, CharLS, OpenJPEG) writes all of them.
        ds.PixelData = encapsulate([_encode_jpeg(frame, syntax, ds.BitsStored) for frame in
                                    stored.reshape(-1, *stored.shape[-2:])])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax in LOSSY_SYNTAXES:  # readers must be able to tell
            ds.LossyImageCompression = "01"


def _encode_jpeg(frame: np.ndarray, syntax: UID, bits_stored: int) -> bytes:
    if syntax in (JPEG2000Lossless, JPEG2000):
        levels = max(1, min(6, int(np.log2(min(frame.shape))) - 1))  # small images, fewer levels
        lossless = syntax == JPEG2000Lossless  # else the 9/7 wavelet, at quality level 50
        return imagecodecs.jpeg2k_encode(frame, codecformat="J2K", reversible=lossless,
                                         level=None if lossless else 50,
                                         bitspersample=bits_stored, resolutions=levels)
    if syntax in (JPEGLSLossless, JPEGLSNearLossless):
        if frame.dtype.kind == "i":  # JPEG-LS has no sign: it carries the two's complement bits
            frame = frame.view(np.uint16)
        # near-lossless: every sample within 3 of the original
        return imagecodecs.jpegls_encode(frame, level=0 if syntax == JPEGLSLossless else 3)
    if syntax in (JPEGLosslessSV1, JPEGLossless):
        # Process 14 allows predictors 1-7; SV1 is the one with predictor 1.
        return imagecodecs.jpeg8_encode(frame, lossless=True,
                                        predictor=1 if syntax == JPEGLosslessSV1 else 7,
                                        bitspersample=bits_stored)
    if syntax == JPEGBaseline8Bit:
        return imagecodecs.jpeg8_encode(frame, level=95)
    if syntax == JPEGExtended12Bit:
        return imagecodecs.jpeg8_encode(frame, level=95, bitspersample=12)
    raise ValueError(f"no encoder for {syntax.name}")
