"""The ``medimg`` command line: one command per pipeline stage.

Heavy libraries (torch, monai, mlflow, prefect) are imported inside the commands, so
``medimg --help`` stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from medimg.config import Params
    from medimg.dicom.synth import Progress

app = typer.Typer(
    help="medimg: DICOM CT/MR to validated, registered models, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameter file.")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )


def _load(params_file: Path) -> Params:
    from medimg.config import load_params
    from medimg.errors import MedImgError

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


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


@app.command()
def synth(
    params_file: Path = PARAMS_OPTION,
    out: Path | None = typer.Option(
        None, help="Write raw/, masks/, labels.csv, synth_truth.csv here instead of params.data."
    ),
) -> None:
    """Write the built-in synthetic DICOM cohort (demo and tests)."""
    from medimg import stages
    from medimg.errors import MedImgError

    params = _load(params_file)
    if out is not None:
        data = params.data.model_copy(
            update={
                "raw": out / "raw",
                "masks": out / "masks",
                "labels": out / "labels.csv",
                "synth_truth": out / "synth_truth.csv",
            }
        )
        params = params.model_copy(update={"data": data})
    try:
        with _progress("synth: series") as progress:
            counts = stages.synth(params, progress=progress)
    except MedImgError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    typer.echo(
        f"wrote {counts['series']} series ({counts['files']} files) for {counts['patients']} "
        f"patients, {counts['positives']} with lesions, to {params.data.raw}"
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
