"""Which study folders of the inbox the ``predict-inbox`` deployment takes, and its record."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from medimg.dicom.deid import Pseudonymizer
from medimg.errors import ConfigError
from medimg.inbox import InboxRecord, ready_studies
from medimg.pacs.local import COMPLETE

KEYS = Pseudonymizer(b"inbox-test-key")


def study(inbox: Path, name: str, files: int = 2) -> Path:
    folder = inbox / name
    folder.mkdir(parents=True)
    for n in range(files):
        (folder / f"{n}.dcm").write_bytes(b"x" * (n + 1))
    return folder


def test_a_folder_is_taken_when_marked_complete_or_quiet(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    marked = study(inbox, "marked")
    (marked / COMPLETE).touch()
    arriving = study(inbox, "arriving")
    quiet = study(inbox, "SMITH^JOHN")
    (inbox / "loose.dcm").write_bytes(b"x")  # in no study folder: left alone
    (inbox / "empty").mkdir()
    later = time.time() + 100
    # ctime cannot be set back, so "quiet" is judged from a later clock
    ready, waiting = ready_studies(inbox, KEYS, quiet_s=50)
    assert [s.folder for s in ready] == [marked] and waiting == 2
    ready, waiting = ready_studies(inbox, KEYS, quiet_s=50, now=later)
    assert sorted(s.folder for s in ready) == sorted([marked, arriving, quiet]) and waiting == 0
    assert all(len(s.key) == 16 and "SMITH" not in s.key for s in ready)
    # a write still in progress (the temporary of an atomic write) keeps it waiting
    (arriving / ".2.dcm.abc123.tmp").write_bytes(b"half")
    ready, waiting = ready_studies(inbox, KEYS, quiet_s=50, now=later)
    assert arriving not in [s.folder for s in ready] and waiting == 1


def test_the_record_knows_what_is_new_and_what_the_pacs_has_not_taken(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = study(inbox, "a")
    (folder / COMPLETE).touch()
    [first] = ready_studies(inbox, KEYS, quiet_s=0)[0]
    record = InboxRecord(tmp_path / "out" / "processed.json")
    assert record.is_new(first)
    record.put(first.key, {"fingerprint": first.fingerprint, "delivered": False})
    again = InboxRecord(tmp_path / "out" / "processed.json")  # read back from disk
    assert not again.is_new(first) and again.undelivered() == [first.key]
    assert "NOT DELIVERED" in (tmp_path / "out" / "index.html").read_text()
    (folder / COMPLETE).touch()  # the node marking it again changes nothing by itself
    assert not again.is_new(ready_studies(inbox, KEYS, quiet_s=0)[0][0])
    os.utime(folder / "0.dcm", ns=(1, 1))  # a file replaced: predict again
    assert again.is_new(ready_studies(inbox, KEYS, quiet_s=0)[0][0])


def test_a_damaged_record_names_itself_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "processed.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"processed\.json: .*move it aside"):
        InboxRecord(path)
    assert path.read_text() == "{not json"  # nothing overwritten
