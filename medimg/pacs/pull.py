"""``medimg pacs pull``: the studies of a query, from the PACS into a folder.

Incremental (the instances a study already has on disk are not fetched again) and
resumable (every file is written atomically, so an interrupted pull leaves only complete
files, and the next one fetches the rest). Each study is retried on network errors; the
others go on when one fails, and the summary says which failed (by study key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medimg.config import PacsParams
from medimg.dicom.deid import Pseudonymizer
from medimg.errors import PacsError
from medimg.pacs.client import Pacs, opened, retried
from medimg.pacs.local import Layout
from medimg.pacs.query import Query
from medimg.typing import Progress

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    key: str  # the study's pseudonymous key (its folder)
    instances: int = 0  # in the study, as the PACS lists it
    fetched: int = 0
    present: int = 0  # on disk before this pull
    error: str = ""  # why it failed, after its retries


@dataclass
class PullSummary:
    server: str
    studies: list[StudyResult] = field(default_factory=list)

    @property
    def failed(self) -> list[StudyResult]:
        return [s for s in self.studies if s.error]

    def as_dict(self) -> dict[str, object]:
        return {
            "server": self.server,
            "studies": len(self.studies),
            "instances_fetched": sum(s.fetched for s in self.studies),
            "instances_present": sum(s.present for s in self.studies),
            "failed": {s.key: s.error for s in self.failed},
        }


def pull_study(pacs: Pacs, layout: Layout, study_uid: str) -> StudyResult:
    """Fetch what the study lacks on disk; raises PacsError on a network failure."""
    result = StudyResult(key=layout.study_key(study_uid))
    refs = pacs.instances(study_uid)
    have = layout.present(study_uid)
    wanted = [r for r in refs if layout.path(study_uid, r.sop_uid).name not in have]
    result.instances, result.present = len(refs), len(refs) - len(wanted)

    def write(sop_uid: str, data: bytes) -> None:
        layout.write(study_uid, sop_uid, data)

    result.fetched = pacs.fetch(study_uid, wanted, write)
    if result.fetched < len(wanted):
        raise PacsError(
            f"{pacs.server} sent {result.fetched} of the {len(wanted)} instances asked for "
            f"of study {result.key}"
        )
    return result


def with_retries(cfg: PacsParams, key: str, attempt: Callable[[], StudyResult]) -> StudyResult:
    """``attempt`` up to 1 + ``cfg.retries`` times; the last error goes in the result."""
    result, error = retried(cfg, attempt, f"study {key}: ")
    if result is not None:
        return result
    log.error("study %s not pulled: %s", key, error)
    return StudyResult(key=key, error=error)


def pull(
    cfg: PacsParams,
    query: Query,
    out: Path,
    keys: Pseudonymizer,
    progress: Progress | None = None,
    pacs: Pacs | None = None,
) -> PullSummary:
    """Every study matching ``query`` into ``out/<study key>/``; ``cfg.concurrency``
    studies at once.

    Raises:
        PacsError: the query itself failed (nothing was written then).
    """
    with opened(cfg, pacs) as client:
        return _pull(cfg, client, query, Layout(out, keys), progress)


def _pull(
    cfg: PacsParams, pacs: Pacs, query: Query, layout: Layout, progress: Progress | None
) -> PullSummary:
    studies = pacs.find_studies(query)
    log.info("%s: %d studies match the query", pacs.server, len(studies))
    summary = PullSummary(server=pacs.server)
    done = 0
    if progress:
        progress(0, len(studies))

    def one(uid: str) -> StudyResult:
        key = layout.study_key(uid)
        return with_retries(cfg, key, lambda: pull_study(pacs, layout, uid))

    with ThreadPoolExecutor(cfg.concurrency) as workers:
        for result in workers.map(one, studies):
            summary.studies.append(result)
            done += 1
            if progress:
                progress(done, len(studies))
    log.info("pulled %s", summary.as_dict())
    return summary
