"""read_xray against files with known pixel values, in every transfer syntax we support."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from covid_xray.errors import DicomError
from covid_xray.imaging import decoders
from covid_xray.imaging.dicom import MAX_PIXEL_BYTES, _decode_fast, read_patient_id, read_xray
from covid_xray.imaging.writer import LOSSY_SYNTAXES, write_dicom
from tests.conftest import REAL_DICOM

RNG = np.random.default_rng(0)


def random_stored(bits: int, shape=(40, 36)) -> np.ndarray:
    return RNG.integers(0, 2**bits, shape).astype(np.uint8 if bits <= 8 else np.uint16)


def smooth_stored(bits: int, shape=(64, 64)) -> np.ndarray:
    """A gentle gradient: what lossy JPEG keeps nearly intact."""
    y, x = np.mgrid[0 : 1 : shape[0] * 1j, 0 : 1 : shape[1] * 1j]
    image = 0.1 + 0.8 * (0.6 * x + 0.4 * y)
    return np.round(image * (2**bits - 1)).astype(np.uint8 if bits <= 8 else np.uint16)


@pytest.mark.parametrize(
    ("syntax", "bits"),
    [
        (ExplicitVRLittleEndian, 12),
        (ExplicitVRLittleEndian, 16),
        (ExplicitVRLittleEndian, 8),
        (RLELossless, 12),
        (RLELossless, 16),
        (JPEG2000Lossless, 12),
        (JPEG2000Lossless, 16),
        (JPEGLSLossless, 12),
        (JPEGLSLossless, 16),
        (JPEGLosslessSV1, 12),
        (JPEGLosslessSV1, 16),
    ],
    ids=lambda value: getattr(value, "keyword", value),
)
def test_lossless_syntaxes_decode_pixel_exact(tmp_path, syntax, bits):
    stored = random_stored(bits)
    write_dicom(tmp_path / "x.dcm", stored, syntax=syntax, bits_stored=bits)
    assert pydicom.dcmread(tmp_path / "x.dcm").file_meta.TransferSyntaxUID == syntax
    expected = (stored.astype(np.float64) / (2**bits - 1)).astype(np.float32)
    np.testing.assert_array_equal(read_xray(tmp_path / "x.dcm"), expected)


@pytest.mark.parametrize(("syntax", "bits"), [(JPEGBaseline8Bit, 8), (JPEGExtended12Bit, 12)],
                         ids=["baseline-8bit", "extended-12bit"])
def test_lossy_jpeg_decodes_close_to_written(tmp_path, syntax, bits):
    stored = smooth_stored(bits)
    write_dicom(tmp_path / "x.dcm", stored, syntax=syntax, bits_stored=bits)
    image = read_xray(tmp_path / "x.dcm")
    expected = stored / (2**bits - 1)
    assert image.shape == stored.shape
    assert np.abs(image - expected).max() < 0.02  # quality 95 on a smooth gradient


@pytest.mark.parametrize(
    ("syntax", "bits", "signed"),
    [(syntax, bits, False) for syntax in (JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1)
     for bits in (8, 12, 16)]
    + [(JPEG2000Lossless, 12, True), (JPEG2000Lossless, 16, True), (JPEGLSLossless, 12, True),
       (JPEGLossless, 12, False), (JPEGBaseline8Bit, 8, False), (JPEG2000, 12, False),
       (JPEG2000, 16, True), (JPEGLSNearLossless, 12, False)],
    ids=lambda value: getattr(value, "keyword", value),
)
def test_fast_decoder_gives_the_pixels_gdcm_gives(tmp_path, syntax, bits, signed):
    """Our imagecodecs plugin, which read_xray tries first, decodes what GDCM (pydicom's
    first choice) decodes, bit for bit, signed files included."""
    stored = random_stored(bits)
    if signed:
        stored = (stored.astype(np.int32) - 2 ** (bits - 1)).astype(np.int16)
    path = tmp_path / "x.dcm"
    write_dicom(path, stored, syntax=syntax, bits_stored=bits, signed=signed)
    fast = pixel_array(path, decoding_plugin=decoders.LABEL)
    np.testing.assert_array_equal(fast, pixel_array(path, decoding_plugin="gdcm"))
    assert fast.dtype == stored.dtype
    if syntax in LOSSY_SYNTAXES:
        assert not np.array_equal(fast, stored)  # lossy indeed: the test compares decoders
    else:  # lossless: the stored values themselves
        np.testing.assert_array_equal(fast, stored)
    assert _decode_fast(pydicom.dcmread(path), None) is not None  # what read_xray uses


def test_fast_decoder_reads_the_real_radiograph_as_gdcm_does():
    np.testing.assert_array_equal(pixel_array(REAL_DICOM, decoding_plugin=decoders.LABEL),
                                  pixel_array(REAL_DICOM, decoding_plugin="gdcm"))


def test_files_the_fast_decoder_declines_fall_back_to_pydicoms_plugins(tmp_path):
    stored = random_stored(11)  # below 2**11: the same values read signed or unsigned
    write_dicom(tmp_path / "x.dcm", stored, syntax=JPEGLosslessSV1, bits_stored=12)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    ds.PixelRepresentation = 1  # signed lossless JPEG: left to pydicom's plugins
    ds.save_as(tmp_path / "x.dcm")
    assert "covid_xray" in get_decoder(JPEGLosslessSV1).available_plugins
    assert _decode_fast(pydicom.dcmread(tmp_path / "x.dcm"), None) is None
    expected = (stored.astype(np.float64) + 2048) / 4095  # the signed 12-bit range
    np.testing.assert_allclose(read_xray(tmp_path / "x.dcm", apply_voi_lut=False), expected,
                               atol=1e-6)


def test_monochrome1_equals_inverted_monochrome2_twin(tmp_path):
    stored = random_stored(12)
    write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", 4095 - stored, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_xray(tmp_path / "m1.dcm"), read_xray(tmp_path / "m2.dcm"))


def test_rescale_slope_intercept_then_window(tmp_path):
    stored = random_stored(12)
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4001.0
    write_dicom(tmp_path / "x.dcm", stored, rescale=(slope, intercept), window=(center, width))
    values = stored * slope + intercept
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1).astype(np.float32)
    np.testing.assert_allclose(read_xray(tmp_path / "x.dcm"), expected, atol=1e-6)

    # Without the window the full rescaled range maps to [0, 1]: the stored fraction again.
    unwindowed = read_xray(tmp_path / "x.dcm", apply_voi_lut=False)
    np.testing.assert_allclose(unwindowed, stored / 4095, atol=1e-6)

    # The window lives in rescaled units: another slope must give another image.
    write_dicom(tmp_path / "y.dcm", stored, rescale=(1.0, intercept), window=(center, width))
    assert not np.allclose(read_xray(tmp_path / "y.dcm"), expected, atol=1e-3)


def test_signed_pixels_use_their_range(tmp_path):
    stored = np.array([[-2048, 0], [1024, 2047]], dtype=np.int16)
    write_dicom(tmp_path / "x.dcm", stored, bits_stored=16, signed=True)
    expected = (stored.astype(np.float64) + 32768) / 65535
    np.testing.assert_allclose(read_xray(tmp_path / "x.dcm"), expected, atol=1e-6)


def test_multiframe_uses_first_frame_and_warns(tmp_path):
    frames = np.stack([random_stored(12), random_stored(12)])
    write_dicom(tmp_path / "x.dcm", frames, syntax=RLELossless)
    with pytest.warns(UserWarning, match="2 frames, using the first"):
        image = read_xray(tmp_path / "x.dcm")
    np.testing.assert_array_equal(image, (frames[0] / 4095).astype(np.float32))


def test_real_radiograph_decodes_with_sane_statistics():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean real file must not warn
        image = read_xray(REAL_DICOM)
    assert image.shape == (1024, 1024)
    assert image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    assert 0.3 < image.mean() < 0.8  # a chest film: neither blank nor saturated
    assert image.std() > 0.1
    # Bone bright: the lung fields (upper centre-left/right) are darker than the spine column.
    assert image[300:600, 200:400].mean() < image[300:900, 480:544].mean()


def test_not_a_dicom_names_the_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DicomError, match=r"notes\.dcm: not a DICOM file"):
        read_xray(path)


def test_missing_file(tmp_path):
    with pytest.raises(DicomError, match="file not found"):
        read_xray(tmp_path / "absent.dcm")


def test_no_pixel_data(tmp_path):
    write_dicom(tmp_path / "x.dcm", random_stored(12))
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(DicomError, match=r"x\.dcm: DICOM has no pixel data"):
        read_xray(tmp_path / "x.dcm")


def test_unsupported_transfer_syntax(tmp_path):
    write_dicom(tmp_path / "x.dcm", random_stored(8), syntax=JPEGBaseline8Bit, bits_stored=8)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2 video
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(DicomError, match=r"x\.dcm: unsupported transfer syntax MPEG2"):
        read_xray(tmp_path / "x.dcm")


def test_colour_image(tmp_path):
    write_dicom(tmp_path / "x.dcm", random_stored(8), bits_stored=8)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Columns = 12  # 40 x 36 bytes = 40 x 12 x 3
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(DicomError, match=r"x\.dcm: colour image \(RGB, 3 samples"):
        read_xray(tmp_path / "x.dcm")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless],
                         ids=["native", "j2k"])
def test_truncated_file(tmp_path, syntax):
    write_dicom(tmp_path / "x.dcm", random_stored(12, (64, 64)), syntax=syntax)
    data = (tmp_path / "x.dcm").read_bytes()
    (tmp_path / "x.dcm").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DicomError, match=r"x\.dcm: .*(truncated|corrupt)"):
        read_xray(tmp_path / "x.dcm")


def test_threads_reading_at_once_get_their_solo_answers_and_leave_warnings_alone(tmp_path):
    """Truncation was told by catching pydicom's "End of file" warning per call, and
    catch_warnings swaps the process's warning machinery: under threads one film's warning
    landed in another call's list (the good film refused as truncated, the cut one read as
    having no pixel data), and the swap could outlive every call. Now it is decided from the
    file, and the result writer and the node's listener no longer swap filters either."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from covid_xray.model.dicom_results import read_source
    from covid_xray.pacs.listener import read_uids

    write_dicom(tmp_path / "good.dcm", random_stored(12, (64, 64)), syntax=JPEG2000Lossless)
    data = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) * 2 // 3])

    def answer(name: str) -> str:
        try:
            image = read_xray(tmp_path / name)
        except DicomError as error:
            return str(error)
        read_uids(data)
        read_source(io.BytesIO(data))
        return f"read {image.shape}"

    solo = {name: answer(name) for name in ("good.dcm", "cut.dcm")}
    assert solo["good.dcm"] == "read (64, 64)"
    assert solo["cut.dcm"] == (f"{tmp_path / 'cut.dcm'}: truncated DICOM (the file ends "
                               "inside its pixel data)")
    filters, show = list(warnings.filters), warnings.showwarning
    names = ["good.dcm", "cut.dcm"] * 200
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(answer, names)) == [solo[name] for name in names]
    assert warnings.filters == filters and warnings.showwarning is show


def test_corrupt_codestream_is_one_line_naming_every_decoder_tried(tmp_path):
    write_dicom(tmp_path / "x.dcm", random_stored(12, (64, 64)), syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    data = bytearray(ds.PixelData)
    data[40:-40] = bytes(len(data) - 80)  # the whole length, zeros inside: no file-level sign
    ds.PixelData = bytes(data)
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(DicomError) as raised:
        read_xray(tmp_path / "x.dcm")
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'x.dcm'}: cannot decode JPEG 2000 Image Compression "
                              "(Lossless Only) pixel data, truncated or corrupt (")
    assert "\n" not in message
    for decoder in get_decoder(JPEG2000Lossless).available_plugins:
        assert f"{decoder}: " in message


@pytest.mark.parametrize("modality", ["MR", "CT", "US"])
def test_other_modalities_are_refused_by_name(tmp_path, modality):
    write_dicom(tmp_path / "x.dcm", random_stored(12), modality=modality)
    with pytest.raises(DicomError, match=rf"x\.dcm: modality {modality} is not a radiograph"):
        read_xray(tmp_path / "x.dcm")


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", ""])
def test_radiographs_and_files_without_modality_are_read(tmp_path, modality):
    stored = random_stored(12)
    write_dicom(tmp_path / "x.dcm", stored, modality=modality)
    np.testing.assert_array_equal(read_xray(tmp_path / "x.dcm"), (stored / 4095).astype(np.float32))


def test_patient_id_comes_from_the_header_alone(tmp_path):
    write_dicom(tmp_path / "x.dcm", random_stored(12), patient_id=" 0042 ")
    assert read_patient_id(tmp_path / "x.dcm") == "0042"
    write_dicom(tmp_path / "blank.dcm", random_stored(12))
    assert read_patient_id(tmp_path / "blank.dcm") == ""
    # A header that cannot be read is an error, not "no patient": the cache must not
    # remember it as one (tests/test_cache.py checks it is read again next time).
    (tmp_path / "junk.dcm").write_bytes(b"junk" * 10)
    with pytest.raises(DicomError, match=r"junk\.dcm: cannot read the header \(InvalidDicomError"):
        read_patient_id(tmp_path / "junk.dcm")
    # The pixels are never read: a file cut off inside its pixel data still gives its patient.
    whole = (tmp_path / "x.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - 100])
    assert read_patient_id(tmp_path / "cut.dcm") == "0042"


def with_header(source, target, **fields) -> None:
    """`source` saved as `target` with header fields set as given, valid or not (hostile
    files come with text where numbers belong)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(source)
    for keyword, value in fields.items():
        tag = tag_for_keyword(keyword)
        if keyword == "SpecificCharacterSet":  # how pydicom writes the text that follows
            ds.SpecificCharacterSet = value
        elif isinstance(value, str | bytes):  # stored as given (text as UTF-8), unchecked
            raw = value.encode() if isinstance(value, str) else value
            raw = raw.ljust(len(raw) + len(raw) % 2)
            ds[tag] = RawDataElement(pydicom.tag.Tag(tag), dictionary_VR(tag), len(raw), raw,
                                     0, False, True)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)


@pytest.mark.parametrize(("fields", "message"), [
    ({"WindowCenter": "abc", "WindowWidth": "400"}, "malformed DICOM header"),
    ({"RescaleSlope": "abc", "RescaleIntercept": "0"}, "malformed DICOM header"),
    ({"VOILUTSequence": pydicom.Sequence([])}, "malformed DICOM header"),
    ({"BitsStored": 0}, "'Bits Stored' value of '0' is invalid"),
    ({"RescaleSlope": "0", "RescaleIntercept": "0"}, "blank image (every pixel is 0 after rescale)"),
    ({"RescaleSlope": "nan", "RescaleIntercept": "0"}, "non-finite pixel values"),
])
def test_a_malformed_header_is_that_files_dicom_error(tmp_path, fields, message):
    """Every header field may be malformed: the file gets a DicomError naming it (its error
    row), never a ValueError or IndexError that would take a whole batch down."""
    write_dicom(tmp_path / "good.dcm", random_stored(12), window=(2000, 3000))
    with_header(tmp_path / "good.dcm", tmp_path / "bad.dcm", **fields)
    with pytest.raises(DicomError) as caught:
        read_xray(tmp_path / "bad.dcm")
    assert str(caught.value).startswith(f"{tmp_path / 'bad.dcm'}: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_blank_film_is_refused(tmp_path):
    write_dicom(tmp_path / "blank.dcm", np.full((40, 36), 1234, dtype=np.uint16))
    with pytest.raises(DicomError, match=r"blank\.dcm: blank image \(every pixel is 1234 after "
                                         r"rescale\); nothing to read"):
        read_xray(tmp_path / "blank.dcm", apply_voi_lut=False)
    # A window that saturates every pixel leaves nothing to read either.
    write_dicom(tmp_path / "dark.dcm", random_stored(12), window=(9000, 10))
    with pytest.raises(DicomError, match=r"dark\.dcm: blank image \(every pixel is 0 after "
                                         r"rescale and window\)"):
        read_xray(tmp_path / "dark.dcm")


def test_a_symlink_loop_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "a.dcm").symlink_to(tmp_path / "b.dcm")
    (tmp_path / "b.dcm").symlink_to(tmp_path / "a.dcm")
    with pytest.raises(DicomError, match=r"a\.dcm: cannot open \(Too many levels of symbolic"):
        read_xray(tmp_path / "a.dcm")


# Peak memory of this process image: VmHWM, not getrusage's ru_maxrss, which a child started
# by fork + exec inherits from the parent it was forked from (pytest's, here).
BOMB_CHECK = """
import sys
from covid_xray.imaging.dicom import read_xray
from covid_xray.errors import DicomError
try:
    read_xray(sys.argv[1])
    print("decoded")
except DicomError as error:
    print(error)
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) // 1024)
"""


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """A few KB of RLE whose header claims 60000 x 60000 pixels would unpack to ~7 GB; it is
    refused from the header, and the process never grows past 1 GB (measured in a fresh
    interpreter: its peak resident memory)."""
    import subprocess
    import sys

    write_dicom(tmp_path / "small.dcm", np.zeros((64, 64), dtype=np.uint16) + 7,
                syntax=RLELossless)
    with_header(tmp_path / "small.dcm", tmp_path / "bomb.dcm", Rows=60000, Columns=60000)
    assert (tmp_path / "bomb.dcm").stat().st_size < 20_000
    result = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(tmp_path / "bomb.dcm")],
                            capture_output=True, text=True, timeout=300)
    message, peak_mb = result.stdout.strip().splitlines()
    assert message == (f"{tmp_path / 'bomb.dcm'}: header claims 60000 x 60000 pixels x 1 "
                       f"frame(s) (7200 MB), over the {MAX_PIXEL_BYTES // 10**6} MB cap for one "
                       "film; refused before decoding")
    assert int(peak_mb) < 1024, f"peak memory {peak_mb} MB"
