"""Task helpers every flow uses: retries on I/O only, nothing persisted."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O failures (storage, network file systems), not bad data."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


def io_task(name: str, **options: Any) -> Any:
    """``@task`` for I/O steps: retried with back-off on OSError only, nothing persisted."""
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=[5, 30],
        retry_condition_fn=retry_on_io,
        cache_policy=NONE,
        persist_result=False,
        **options,
    )
