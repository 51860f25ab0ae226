"""The parts of medimg pacs that need no server: credentials, queries, the local layout,
the storage node's completion rule and the params (the server tests:
tests/integration/test_pacs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medimg.config import ListenParams, PacsParams
from medimg.dicom.deid import Pseudonymizer
from medimg.errors import ConfigError
from medimg.pacs.credentials import credentials_for, host_of
from medimg.pacs.listen import COMPLETE, StorageNode, complete_studies
from medimg.pacs.local import Layout
from medimg.pacs.query import Query, read_accessions

KEYS = Pseudonymizer(b"unit-test-key")


def _netrc(path: Path, mode: int = 0o600) -> Path:
    path.write_text("machine pacs.example login alice password s3cret-value\n")
    path.chmod(mode)
    return path


def test_credentials_from_the_environment_win_and_are_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _netrc(tmp_path / "netrc")
    creds = credentials_for("pacs.example", file)
    assert creds is not None and (creds.user, creds.password) == ("alice", "s3cret-value")
    assert "s3cret-value" not in repr(creds) and "s3cret-value" not in str(creds)
    monkeypatch.setenv("MEDIMG_PACS_USER", "bob")
    monkeypatch.setenv("MEDIMG_PACS_PASSWORD", "other")
    assert credentials_for("pacs.example", file).user == "bob"  # type: ignore[union-attr]


def test_a_netrc_readable_by_others_is_refused(tmp_path: Path) -> None:
    file = _netrc(tmp_path / "netrc", 0o644)
    with pytest.raises(ConfigError, match="readable by other users; run: chmod 600") as e:
        credentials_for("pacs.example", file)
    assert "s3cret" not in str(e.value)
    assert credentials_for("elsewhere", _netrc(tmp_path / "ok")) is None
    assert credentials_for("pacs.example", tmp_path / "missing") is None
    assert host_of("https://pacs.example:8443/dicom-web") == "pacs.example"


def test_queries_become_matching_keys() -> None:
    assert Query().matches() == [{}]
    q = Query(modality="CT", study_date="20240101-", accessions=("A1", "A2"))
    assert q.matches() == [
        {"ModalitiesInStudy": "CT", "StudyDate": "20240101-", "AccessionNumber": "A1"},
        {"ModalitiesInStudy": "CT", "StudyDate": "20240101-", "AccessionNumber": "A2"},
    ]
    with pytest.raises(ConfigError, match="YYYYMMDD"):
        Query(study_date="2024-01-01")


def test_accession_files(tmp_path: Path) -> None:
    f = tmp_path / "acc.txt"
    f.write_text("# wanted\nA1\n\nA2  # second\nA1\n")
    assert read_accessions(f) == ("A1", "A2")
    f.write_text("# none\n")
    with pytest.raises(ConfigError, match="no accession number"):
        read_accessions(f)


def test_the_layout_names_files_by_keys_and_writes_atomically(tmp_path: Path) -> None:
    layout = Layout(tmp_path, KEYS)
    path = layout.write("1.2.3", "1.2.3.4", b"data")
    assert path == tmp_path / KEYS.key("study", "1.2.3") / f"{KEYS.key('sop', '1.2.3.4')}.dcm"
    assert "1.2.3" not in str(path.relative_to(tmp_path))
    (path.parent / f".{path.name}.x1.tmp").write_bytes(b"half")  # a killed write
    assert layout.present("1.2.3") == {path.name}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_study_is_complete_after_its_quiet_time(tmp_path: Path) -> None:
    node = StorageNode(ListenParams(quiet_s=5.0), tmp_path, KEYS)
    node.layout.write("1.2.3", "1.2.3.4", b"x")
    key = KEYS.key("study", "1.2.3")
    node.last[key] = 100.0
    assert node.complete_quiet(now=104.0) == []
    assert node.complete_quiet(now=105.0) == [key]
    assert complete_studies(tmp_path) == [tmp_path / key]
    assert (tmp_path / key / COMPLETE).is_file()


def test_pacs_params_refuse_credentials_in_the_url_and_bad_ae_titles() -> None:
    with pytest.raises(ValueError, match="must not hold credentials"):
        PacsParams(url="https://user:pw@pacs.example/dicom-web")
    with pytest.raises(ValueError, match="AE title"):
        PacsParams(called_ae=" PACS")
    with pytest.raises(ValueError):
        PacsParams(called_ae="A" * 17)
    assert PacsParams(url="https://pacs.example/dicom-web/").url == "https://pacs.example/dicom-web"
