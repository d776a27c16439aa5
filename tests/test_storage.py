"""contracts/storage.py on local paths: whole-file writes and what they leave behind."""

import os
import stat

from contracts import storage


def test_local_writes_are_whole_and_readable_as_a_plain_open_would_leave_them(tmp_path):
    previous = os.umask(0o022)
    try:
        target = tmp_path / "a" / "b.gif"
        storage.write_bytes(target, b"GIF89a")
        copy = tmp_path / "c" / "copy.gif"
        storage.upload(str(target), copy)
    finally:
        os.umask(previous)
    assert target.read_bytes() == copy.read_bytes() == b"GIF89a"
    # Temporary files are created 0600; what a user gets is what open() gives under the process's umask.
    expected = 0o666 & ~storage._UMASK
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(copy.stat().st_mode) == expected
    assert not [p for p in tmp_path.rglob(".tmp-*")], "no temporary file is left behind"
