"""What every ``medimg`` command shares: the params option, loading the params file, the
progress bar and turning a medimg error into a message and an exit code."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from medimg.config import Params
    from medimg.typing import Progress

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameter file.")


def _load(params_file: Path) -> Params:
    from medimg.config import Params, load_params
    from medimg.errors import MedImgError

    if params_file == Path("params.yaml") and not params_file.exists():
        logging.getLogger(__name__).info("no params.yaml here: using the defaults")
        return Params()
    try:
        return load_params(params_file)
    except MedImgError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


@contextmanager
def _progress(description: str) -> Iterator[Progress]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def _user_errors() -> Iterator[None]:
    """A medimg error ends the command with its message (it names file and fix), exit 1."""
    from medimg.errors import MedImgError

    try:
        yield
    except MedImgError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
