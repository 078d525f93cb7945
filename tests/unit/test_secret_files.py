"""Secrets on this host's disk (secret_files.py): 0600, never written through a planted link, a stale file of
our own replaced; and the redaction of a child's output lines."""
from __future__ import annotations

import os

import pytest

from sglang_fleet import secret_files


def test_written_0600_and_a_stale_file_of_ours_is_replaced(tmp_path):
    path = tmp_path / "k"
    path.write_text("old")
    path.chmod(0o644)
    secret_files.write_private(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    assert secret_files.read_private(path) == "new"
    secret_files.remove(path)
    secret_files.remove(path)  # gone already: fine
    assert secret_files.read_private(path) is None


def test_never_written_through_a_link(tmp_path):
    target, link = tmp_path / "target", tmp_path / "k"
    target.write_text("precious")
    link.symlink_to(target)
    secret_files.write_private(link, "key")  # the link (ours) is replaced by a file; the target is untouched
    assert target.read_text() == "precious" and not link.is_symlink() and link.read_text() == "key"


@pytest.mark.skipif(os.getuid() != 0, reason="needs to create a file owned by somebody else")
def test_a_file_of_somebody_else_is_not_taken_over(tmp_path):
    path = tmp_path / "k"
    path.write_text("theirs")
    os.chown(path, 12345, 12345)
    with pytest.raises(OSError, match="belongs to uid 12345"):
        secret_files.write_private(path, "key")
    assert path.read_text() == "theirs"


def test_redactor_hides_every_secret_and_passes_other_text():
    redact = secret_files.redactor(["abc", None, "abcdef", ""])
    assert redact("api_key='abcdef' admin='abc' other") == "api_key='***' admin='***' other"
    assert secret_files.redactor([])("abc") == "abc"
