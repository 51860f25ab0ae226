"""``make audit``: pip-audit over every installed distribution, and an honest verdict.

pip-audit on the environment skips what it cannot look up (a ``+cpu`` torch build has a
local version PyPI never published) and still prints "No known vulnerabilities found",
however many it skipped; where PyPI's advisory endpoint is unreachable it skips them all.
So this audits each installed distribution's public version (``torch==2.13.0`` for
``2.13.0+cpu``) from a pinned requirements list, no dependency resolution, and reports how
many were really checked.

Where pip-audit could not look a distribution up, the project's JSON on PyPI
(``/pypi/<name>/json``) is asked instead: its ``vulnerabilities`` are those of the latest
release, so it settles the question only when the installed version is that release; the
others stay "not checked".

Exit status: 0 every distribution checked and none vulnerable, except advisories reviewed
and accepted in ``ACCEPTED`` (printed, with the reason); 1 known vulnerabilities (each
printed with its fix versions); 2 the audit is incomplete (the ones not checked are named,
with the reason): not a pass.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

SELF = "medimg"  # editable, not published: nothing to look up

# Reviewed advisories with no fixed release, each with why it does not reach medimg's users;
# an advisory is matched by any of its ids and aliases. Keep this list short and dated.
ACCEPTED = {
    "CVE-2025-69872": (
        "2026-11-30: diskcache <= 5.6.3 unpickles its cache files; dvc-data keeps such a "
        "cache under the project's .dvc/tmp. Exploiting it needs write access to the "
        "project folder, which already allows changing the code DVC runs. No fix released."
    ),
}


def installed() -> dict[str, str]:
    """Canonical name -> public version of every distribution in this environment."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()  # PEP 503
        if name and name != SELF:
            found[name] = dist.version.split("+")[0]
    return found


def latest_release_check(dep: dict) -> dict:
    """``dep`` settled from PyPI's project JSON when it is the latest release, else as was."""
    url = f"https://pypi.org/pypi/{dep['name']}/json"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            project = json.load(response)
    except (OSError, ValueError) as e:
        return {**dep, "skip_reason": f"{dep['skip_reason']}; project JSON: {e}"}
    latest = project.get("info", {}).get("version")
    if latest != dep["version"] or "vulnerabilities" not in project:
        reason = f"not the latest release, which is all PyPI's project JSON covers: ({latest})"
        return {**dep, "skip_reason": reason}
    vulns = [
        {"id": v.get("id"), "aliases": v.get("aliases") or [], "fix_versions": v.get("fixed_in")}
        for v in project["vulnerabilities"]
        if not v.get("withdrawn")
    ]
    return {"name": dep["name"], "version": dep["version"], "vulns": vulns, "via": "project"}


def main() -> int:
    pins = installed()
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pip_audit", "--progress-spinner", "off"),
                *("--format", "json", "--no-deps", "--disable-pip", "--requirement", str(req)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(done.stderr.strip() or done.stdout.strip(), file=sys.stderr)
        print("audit failed: pip-audit gave no report", file=sys.stderr)
        return 2
    deps = report.get("dependencies", [])
    for dep in deps:  # the version pip-audit's reason quotes is the one it looked for
        if dep.get("skip_reason") and "version" not in dep:
            dep["version"] = pins.get(dep["name"], "")
    missed = [d for d in deps if d.get("skip_reason")]
    if missed:
        with ThreadPoolExecutor(8) as pool:
            answers = pool.map(latest_release_check, missed)
            settled = dict(zip([d["name"] for d in missed], answers, strict=True))
        deps = [settled.get(d["name"], d) if d.get("skip_reason") else d for d in deps]
    out, err, status = verdict(deps, ACCEPTED)
    print("\n".join(out))
    if err:
        print("\n".join(err), file=sys.stderr)
    return status


def verdict(deps: list[dict], accepted: dict[str, str]) -> tuple[list[str], list[str], int]:
    """(report lines, lines about what was not checked, exit status) for pip-audit's
    dependency records: one line per advisory however many ids and aliases name it."""
    out: list[str] = []
    err: list[str] = []
    skipped = [d for d in deps if d.get("skip_reason")]
    via_project = sum(d.get("via") == "project" for d in deps)
    found: dict[str, list[str]] = {}  # one advisory (its ids and aliases) -> distributions
    ids_of: dict[str, frozenset[str]] = {}
    for dep in deps:
        for vuln in dep.get("vulns") or []:
            ids = frozenset([vuln["id"], *(vuln.get("aliases") or [])])
            key = next((k for k, known in ids_of.items() if known & ids), vuln["id"])
            ids_of[key] = ids_of.get(key, frozenset()) | ids
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none released"
            line = f"{dep['name']} {dep['version']} (fixed in: {fixes})"
            if line not in found.setdefault(key, []):
                found[key].append(line)
    open_ = 0
    for key, where in found.items():
        reason = next((accepted[i] for i in sorted(ids_of[key]) if i in accepted), None)
        open_ += reason is None
        label = "accepted" if reason else "VULNERABLE"
        out.append(f"{label}: {' = '.join(sorted(ids_of[key]))}: {'; '.join(where)}")
        if reason:
            out.append(f"  {reason}")
    checked = len(deps) - len(skipped)
    source = (
        f" ({via_project} from PyPI's latest-release data: pip-audit's lookup failed)"
        if via_project
        else ""
    )
    out.append(
        f"audited {checked} of {len(deps)} installed distributions{source}: {len(found)} known"
        f" vulnerabilities, {len(found) - open_} of them reviewed and accepted above,"
        f" {open_} open"
    )
    if skipped:
        reasons: dict[str, list[str]] = {}
        for dep in skipped:
            reason = dep["skip_reason"].split(": ")[0]  # without what it names after the colon
            latest = re.search(r": \((.+)\)$", dep["skip_reason"])
            seen = f" (latest {latest.group(1)})" if latest else ""
            reasons.setdefault(reason, []).append(f"{dep['name']} {dep.get('version', '')}{seen}")
        for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
            err.append(f"  not checked ({len(names)}): {reason}: {shown}")
        err.append(
            "audit INCOMPLETE: the distributions above were not looked up, so this is no "
            "clean bill of health. pip-audit needs PyPI's JSON API (pypi.org/pypi/<name>/"
            "<version>/json) or OSV (--vulnerability-service osv); run it where either is "
            "reachable."
        )
    return out, err, 1 if open_ else 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
