"""The decode-once cache: reuse, invalidation, atomic writes, concurrent builders."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covid_xray.errors import UserError
from covid_xray.files import atomic_write
from covid_xray.imaging.cache import CacheParams, ImageCache, load_entry
from covid_xray.imaging.preprocess import load_square
from covid_xray.pseudonyms import pseudonym, pseudonym_key
from tests.conftest import ROOT


def dicoms(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("train/*/*/*.dcm"))


def test_cache_is_reused_and_invalidated_by_parameters(tiny_dataset, tmp_path):
    paths = dicoms(tiny_dataset)[:12]
    cache = ImageCache(tmp_path, CacheParams(img_size=32))
    entries, stats = cache.build(paths, progress=False)
    assert (stats.decoded, stats.reused) == (12, 0)
    for path, entry in zip(paths, entries, strict=True):
        np.testing.assert_array_equal(load_entry(entry), load_square(path, 32))

    again, stats = ImageCache(tmp_path, CacheParams(img_size=32)).build(paths, progress=False)
    assert (stats.decoded, stats.reused) == (0, 12)
    assert again == entries

    _, stats = ImageCache(tmp_path, CacheParams(img_size=24)).build(paths, progress=False)
    assert stats.decoded == 12
    _, stats = ImageCache(tmp_path, CacheParams(32, apply_voi_lut=False)).build(
        paths, progress=False)
    assert stats.decoded == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digests", "size24-voi1-v1", "size32-voi0-v1", "size32-voi1-v1"]


def test_cache_key_follows_content_not_path(tiny_dataset, tmp_path):
    source = dicoms(tiny_dataset)[0]
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(source.read_bytes())
    cache = ImageCache(tmp_path / "cache", CacheParams(img_size=16))
    assert cache.entry_path(copy) == cache.entry_path(source)
    _, stats = cache.build([source, copy], progress=False)
    assert stats.decoded == 2  # both missing when listed; one entry results
    assert len(list((tmp_path / "cache" / "size16-voi1-v1").rglob("*.npy"))) == 1
    # Changing the file's bytes changes its key.
    other = dicoms(tiny_dataset)[1]
    copy.write_bytes(other.read_bytes())
    assert cache.entry_path(copy) == cache.entry_path(other)


def test_parallel_build_equals_serial(tiny_dataset, tmp_path):
    paths = dicoms(tiny_dataset)[:10]
    serial, _ = ImageCache(tmp_path / "a", CacheParams(img_size=20)).build(paths, progress=False)
    parallel, stats = ImageCache(tmp_path / "b", CacheParams(img_size=20)).build(
        paths, num_workers=2, progress=False)
    assert stats.decoded == 10
    for one, two in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(load_entry(one), load_entry(two))


def test_interrupted_write_leaves_nothing(tmp_path):
    def write_half_then_die(file):
        file.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    target = tmp_path / "ab" / "entry.npy"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write_half_then_die)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_bad_files_are_reported_and_the_rest_cached(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all" * 10)
    paths = [*dicoms(tiny_dataset)[:3], bad]
    cache = ImageCache(tmp_path / "cache", CacheParams(img_size=16))
    entries, stats = cache.build(paths, num_workers=2, progress=False)
    assert len(entries) == 4 and stats.decoded == 4
    assert stats.unreadable == {str(bad): f"{bad}: not a DICOM file (no 'DICM' marker)"}
    assert (tmp_path / "cache" / "unreadable.txt").read_text() == (
        f"{bad}\t{bad}: not a DICOM file (no 'DICM' marker)\n")
    _, stats = cache.build(paths[:3], progress=False)
    assert stats.reused == 3


def test_an_unwritable_cache_is_one_line(tiny_dataset, tmp_path):
    """Root ignores file permissions, so the build runs as `nobody` against a folder it may
    read but not write, as when cache_dir is another user's folder. The interpreter lives under
    /root, which nobody cannot enter: the child warms up as root, then drops to nobody."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    shared = Path(tempfile.mkdtemp(prefix="covid-xray-readonly-"))
    try:
        source = dicoms(tiny_dataset)[0]
        shutil.copy(source, shared / "film.dcm")
        (shared / "cache").mkdir()
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # readable by all, writable by root
        script = textwrap.dedent(f"""
            import os, pwd, tempfile
            from covid_xray.imaging.cache import CacheParams, ImageCache
            from covid_xray.cli import user_errors_as_one_line
            film = {str(shared / "film.dcm")!r}
            ImageCache(tempfile.mkdtemp(), CacheParams(16)).build([film], progress=False)
            nobody = pwd.getpwnam("nobody")
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            user_errors_as_one_line(lambda: ImageCache({str(shared / "cache")!r},
                CacheParams(16)).build([film], progress=False))()
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: cannot write the image cache in {shared / 'cache'} (Permission denied: "
            f"{shared / 'cache' / 'digests'}); set cache_dir to a writable folder with free space"]
        assert list((shared / "cache").rglob("*")) == []  # nothing partial left
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dataset, tmp_path, monkeypatch):
    """ENOSPC mid-write: the temporary file goes, the error names the folder."""
    import errno

    import covid_xray.imaging.cache as cache_module

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    cache = ImageCache(tmp_path / "cache", CacheParams(img_size=16))
    monkeypatch.setattr(cache_module.np, "save", full)
    with pytest.raises(UserError, match=r"cannot write the image cache in .*No space left"):
        cache.build(dicoms(tiny_dataset)[:2], progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list(
        (tmp_path / "cache").rglob("*.tmp"))


def test_two_processes_share_one_cache_dir(tiny_dataset, tmp_path):
    """Two builders race over the same files; every entry ends complete and no temp is left."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from covid_xray.imaging.cache import CacheParams, ImageCache
        paths = sorted(Path({str(tiny_dataset)!r}).glob("train/*/*/*.dcm"))
        ImageCache({str(tmp_path)!r}, CacheParams(img_size=40)).build(paths, progress=False)
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT) for _ in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    paths = dicoms(tiny_dataset)
    entries, stats = ImageCache(tmp_path, CacheParams(img_size=40)).build(paths, progress=False)
    assert stats.reused == len(paths)
    for path, entry in zip(paths, entries, strict=True):
        np.testing.assert_array_equal(load_entry(entry), load_square(path, 40))
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_patient_id_read_is_not_remembered(tiny_dataset, tmp_path, monkeypatch):
    """One transient I/O error while reading a header must not make that study its own
    patient for good: the failure is counted, and the next read asks the file again."""
    import errno

    import covid_xray.imaging.dicom as dicom_module

    paths = dicoms(tiny_dataset)[:3]
    cache = ImageCache(tmp_path / "cache", CacheParams(img_size=16))
    key = pseudonym_key(tmp_path / "cache")
    truth = [pseudonym(dicom_module.read_patient_id(path), key) for path in paths]
    assert all(truth)
    real_read = dicom_module.pydicom.dcmread

    def flaky(path, *args, **kwargs):  # the disk fails once, on the second file
        if Path(path) == paths[1]:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dicom_module.pydicom, "dcmread", flaky)
    ids, failures = cache.patients(paths, progress=False)
    assert (ids, failures) == ([truth[0], "", truth[2]], 1)
    monkeypatch.setattr(dicom_module.pydicom, "dcmread", real_read)
    assert cache.patients(paths, progress=False) == (truth, 0)
