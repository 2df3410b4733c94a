"""Saves are atomic and durable (issue 15 item 2): whatever fails during a save (an exception mid-write,
Ctrl-C, a full disk, a failing rename), no file appears under the final name, an existing file is left as it
was, and no temporary file is left behind. The file and its folder are fsynced."""
import errno
import os
import types
from pathlib import Path

import pytest

from quant_core import artifact

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def calibration():
    from unets import tiny_unet

    with pytest.warns(artifact.MissingDigestWarning):
        return artifact.load_result(DATA / "fq_v010_tiny_sd1_w4a8.safetensors", tiny_unet("sd1", seed=0))


def _half_then(error):
    """A save_file that writes half a file and then fails with ``error``: a crash in the middle of the write."""
    def save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 4096)
        raise error
    return save_file


@pytest.mark.parametrize("error", [RuntimeError("injected failure"), KeyboardInterrupt(),
                                   MemoryError("injected")], ids=["exception", "KeyboardInterrupt", "MemoryError"])
def test_a_failure_mid_write_leaves_nothing(calibration, tmp_path, monkeypatch, error):
    monkeypatch.setattr(artifact, "save_file", _half_then(error))
    with pytest.raises(type(error)):
        artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_failure_mid_write_keeps_the_existing_file_when_overwriting(calibration, tmp_path, monkeypatch):
    path = artifact.save_result(calibration, tmp_path / "q.safetensors")
    before = Path(path).read_bytes()
    monkeypatch.setattr(artifact, "save_file", _half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        artifact.save_result(calibration, path, overwrite=True)
    assert Path(path).read_bytes() == before and os.listdir(tmp_path) == ["q.safetensors"]


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                 "message: \"No space left on device\" })")],
                         ids=["OSError", "safetensors-error"])
def test_disk_full_while_writing_is_reported_as_such(calibration, tmp_path, monkeypatch, raised):
    monkeypatch.setattr(artifact, "save_file", _half_then(raised))
    with pytest.raises(artifact.DiskFullError, match="disk full while writing .*nothing was saved") as caught:
        artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(calibration, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1000))
    with pytest.raises(artifact.DiskFullError, match=r"needs about 0\.\d MiB but 0\.0 MiB are free"):
        artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("steps", [("fsync",), ("link", "replace")], ids=["fsync", "rename"])
def test_a_failure_while_publishing_leaves_nothing(calibration, tmp_path, monkeypatch, steps):
    def fail(*_, **__):
        raise OSError(errno.EIO, "injected failure")
    for step in steps:  # a failing link alone is "links unsupported": the rename is the fallback
        monkeypatch.setattr(artifact.os, step, fail)
    with pytest.raises(OSError, match="injected"):
        artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert os.listdir(tmp_path) == []


def test_the_file_and_its_folder_are_fsynced_and_the_file_is_readable_by_others(calibration, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(artifact.os, "fsync", fsync)
    path = artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the temporary file's data, then the folder's entry
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.endswith(".tmp")
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_concurrent_save_of_the_same_name_is_not_overwritten(calibration, tmp_path, monkeypatch):
    """Another save (another server thread, another process) takes the name while this one writes: the
    name is taken atomically (a hard link refuses an existing name), so the other file survives."""
    target = tmp_path / "q.safetensors"
    real_save = artifact.save_file

    def racing_save(tensors, path, metadata=None):
        target.write_bytes(b"the other save's file")
        real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(artifact, "save_file", racing_save)
    with pytest.raises(FileExistsError, match="already exists"):
        artifact.save_result(calibration, target)
    assert target.read_bytes() == b"the other save's file" and os.listdir(tmp_path) == ["q.safetensors"]


def test_where_hard_links_are_unsupported_the_save_still_lands(calibration, tmp_path, monkeypatch):
    def no_links(*_):
        raise OSError(errno.EPERM, "links not supported here")
    monkeypatch.setattr(artifact.os, "link", no_links)
    path = artifact.save_result(calibration, tmp_path / "q.safetensors")
    assert artifact.load_result(path).plan == calibration.plan and os.listdir(tmp_path) == ["q.safetensors"]
