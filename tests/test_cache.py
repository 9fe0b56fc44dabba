"""The decode-once cache: reuse, invalidation, atomic writes, concurrent builders."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covid_xray.cache import CacheParams, ImageCache, load_entry
from covid_xray.errors import UserError
from covid_xray.files import atomic_write
from covid_xray.preprocess import load_square
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
    with pytest.raises(UserError, match=r"1 of 4 DICOMs could not be read .*bad\.dcm: not a DICOM"):
        cache.build(paths, progress=False)
    _, stats = cache.build(paths[:3], progress=False)
    assert stats.reused == 3


def test_two_processes_share_one_cache_dir(tiny_dataset, tmp_path):
    """Two builders race over the same files; every entry ends complete and no temp is left."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from covid_xray.cache import CacheParams, ImageCache
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
