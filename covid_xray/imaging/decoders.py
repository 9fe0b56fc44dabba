"""A pydicom decoding plugin backed by imagecodecs: the same pixels, in less time.

pydicom tries GDCM first for every compressed syntax. imagecodecs wraps newer builds of the
same kind of libraries (libjpeg-turbo 3, CharLS 2, OpenJPEG 2.5) and decodes a 2048 px film
bit for bit as GDCM does (tests/test_dicom.py checks every syntax and depth), in less time
(`python bench/decoders.py`, 2 cores: JPEG baseline 14 ms vs 44, JPEG lossless 19 vs 80,
JPEG-LS 65 vs 115, JPEG 2000 239 vs 294 and less CPU). Lossy 12-bit JPEG stays with pydicom
(GDCM cannot read it; libjpeg-turbo's inverse DCT rounds otherwise than pylibjpeg's, which
reads it now, so the pixels would change).

`imaging/dicom.py` asks for this plugin first and falls back to pydicom's own order when it declines
(signed JPEG, colour) or fails, so a file that decoded before still decodes.
"""

from __future__ import annotations

import os

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "covid_xray"  # the plugin's name in pydicom (its own names: gdcm, pylibjpeg, pillow)

_LIBJPEG = (uid.JPEGBaseline8Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)
_CHARLS = (uid.JPEGLSLossless, uid.JPEGLSNearLossless)
_OPENJPEG = (uid.JPEG2000Lossless, uid.JPEG2000)
SYNTAXES = (*_LIBJPEG, *_CHARLS, *_OPENJPEG)

# pydicom's plugin interface (see its "Pixel Data Decoder Plugins" guide).
DECODER_DEPENDENCIES = {syntax: ("numpy", "imagecodecs") for syntax in SYNTAXES}


# Threads for one JPEG 2000 decode. 0 means every core this process may use (the fastest
# single file), until a decoding worker, one of several that fill the cores, asks for one.
_threads = 0


def available_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def decode_on_one_thread() -> None:
    """For worker processes: each decodes one file while the others fill the other cores."""
    global _threads
    _threads = 1


def is_available(syntax: str) -> bool:
    return syntax in SYNTAXES


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One grayscale frame, in the container pydicom's runner expects (8 or 16 bits, the
    codestream's own signedness: the runner then corrects it as it does for GDCM)."""
    syntax = runner.transfer_syntax
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("colour: left to pydicom's plugins")
    if syntax in _LIBJPEG:
        if runner.pixel_representation:
            raise NotImplementedError("signed JPEG: left to pydicom's plugins")
        pixels = imagecodecs.jpeg8_decode(src)
    elif syntax in _CHARLS:
        pixels = imagecodecs.jpegls_decode(src)
    else:
        pixels = imagecodecs.jpeg2k_decode(src, numthreads=_threads or available_cores())
    if pixels.ndim != 2 or pixels.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded shape {pixels.shape}, the header says "
                         f"{(runner.rows, runner.columns)}")
    if pixels.dtype.itemsize not in (1, 2):
        raise ValueError(f"decoded {pixels.dtype} samples; expected 8 or 16 bits")
    # The container follows the decoded samples, as pydicom's GDCM plugin sets it.
    runner.set_option("bits_allocated", 8 * pixels.dtype.itemsize)
    if syntax in _CHARLS:
        runner.set_option("planar_configuration", 0)
    return np.ascontiguousarray(pixels).tobytes()


def register() -> None:
    """Make this plugin available to pydicom's decoders (once per process)."""
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        if LABEL not in decoder.available_plugins:
            decoder.add_plugin(LABEL, (__name__, "decode_frame"))
