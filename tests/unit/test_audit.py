"""`make audit`'s verdict: incomplete is never clean, one advisory counts once, accepted
advisories pass only by an id or alias the project reviewed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "audit.py"


@pytest.fixture(scope="module")
def audit():
    spec = importlib.util.spec_from_file_location("medimg_audit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean(name: str, version: str = "1.0") -> dict:
    return {"name": name, "version": version, "vulns": []}


def vuln(id_: str, *aliases: str, fixed: tuple[str, ...] = ()) -> dict:
    return {"id": id_, "aliases": list(aliases), "fix_versions": list(fixed)}


def test_every_package_checked_and_clean_passes(audit) -> None:
    out, err, status = audit.verdict([clean("numpy"), clean("torch", "2.13.0")], {})
    assert status == 0 and err == []
    assert out[-1].startswith("audited 2 of 2 installed distributions: 0 known")


def test_one_advisory_under_two_ids_counts_once_and_fails(audit) -> None:
    dep = {
        "name": "somepkg",
        "version": "5.6.3",
        "vulns": [vuln("GHSA-aaaa", "CVE-1", "PYSEC-9"), vuln("PYSEC-9", "CVE-1", "GHSA-aaaa")],
    }
    out, _, status = audit.verdict([dep, clean("numpy")], {})
    assert status == 1
    assert [line for line in out if line.startswith("VULNERABLE")] == [
        "VULNERABLE: CVE-1 = GHSA-aaaa = PYSEC-9: somepkg 5.6.3 (fixed in: none released)"
    ]
    assert "1 known vulnerabilities, 0 of them reviewed and accepted above, 1 open" in out[-1]


def test_a_reviewed_advisory_passes_by_its_alias_and_says_why(audit) -> None:
    dep = {"name": "diskcache", "version": "5.6.3", "vulns": [vuln("GHSA-w8", "CVE-2025-1")]}
    other = {"name": "web", "version": "2.0", "vulns": [vuln("GHSA-zz", fixed=("2.1",))]}
    out, _, status = audit.verdict([dep], {"CVE-2025-1": "reviewed: not reachable"})
    assert status == 0
    assert out[:2] == [
        "accepted: CVE-2025-1 = GHSA-w8: diskcache 5.6.3 (fixed in: none released)",
        "  reviewed: not reachable",
    ]
    _, _, status = audit.verdict([dep, other], {"CVE-2025-1": "reviewed: not reachable"})
    assert status == 1  # an accepted advisory does not cover another one


def test_what_could_not_be_looked_up_makes_the_audit_incomplete(audit) -> None:
    missed = {
        "name": "torch",
        "version": "2.13.0",
        "skip_reason": "not the latest release, which is all PyPI's project JSON covers: (2.15.0)",
    }
    out, err, status = audit.verdict([clean("numpy"), missed], {})
    assert status == 2
    assert out[-1].startswith("audited 1 of 2 installed distributions")
    assert any("torch 2.13.0 (latest 2.15.0)" in line for line in err)
    assert err[-1].startswith("audit INCOMPLETE")
    bad = {"name": "web", "version": "2.0", "vulns": [vuln("GHSA-zz")]}
    assert audit.verdict([bad, missed], {})[2] == 1  # a known vulnerability outranks it
