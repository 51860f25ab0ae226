"""``medimg pacs``: pull studies from a PACS, listen for studies, push results back.

The PACS's address and AE titles come from ``params.yaml`` (``pacs``), its credentials
from ``$MEDIMG_PACS_USER`` and ``$MEDIMG_PACS_PASSWORD`` or the netrc-style file
``pacs.credentials``: never from the command line, where the shell's history keeps them.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from medimg.cli_base import PARAMS_OPTION, _load, _progress, _user_errors

pacs_app = typer.Typer(help="Studies from a PACS and results back (DICOMweb or DIMSE).")


@pacs_app.command()
def pull(
    patient_id: str = typer.Option("", help="PatientID to match."),
    study_date: str = typer.Option("", help="StudyDate: YYYYMMDD or YYYYMMDD-YYYYMMDD."),
    modality: str = typer.Option("", help="ModalitiesInStudy, e.g. CT."),
    description: str = typer.Option("", help="StudyDescription; * and ? are wildcards."),
    accessions: Path | None = typer.Option(None, help="File of accession numbers, one a line."),
    out: Path | None = typer.Option(None, help="Folder to fill (default data.raw)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Retrieve the matching studies (QIDO-RS + WADO-RS, or C-FIND + C-GET/C-MOVE), only
    the instances not already there, each file written atomically."""
    from medimg import stages
    from medimg.pacs.query import Query, read_accessions

    params = _load(params_file)
    with _user_errors():
        query = Query(
            patient_id=patient_id,
            study_date=study_date,
            modality=modality,
            description=description,
            accessions=read_accessions(accessions) if accessions else (),
        )
        with _progress("pacs pull: studies") as progress:
            summary = stages.pacs_pull(params, query, out, progress=progress)
    s = summary.as_dict()
    typer.echo(
        f"{s['studies']} studies from {s['server']}: {s['instances_fetched']} instances "
        f"fetched, {s['instances_present']} already there"
    )
    if summary.failed:
        for study in summary.failed:
            typer.secho(f"study {study.key}: {study.error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@pacs_app.command()
def listen(
    inbox: Path | None = typer.Option(None, help="Folder to fill (default orchestration.inbox)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Run a DICOM storage node (C-STORE SCP) on pacs.listen until interrupted; each study
    is written to the inbox and marked complete after pacs.listen.quiet_s."""
    from medimg import stages
    from medimg.io import project_path
    from medimg.pacs.listen import StorageNode

    params = _load(params_file)
    target = project_path(Path("."), inbox or params.orchestration.inbox)
    with _user_errors():
        node = StorageNode(params.pacs.listen, target, stages.pacs_keys(params))
        node.start()
    cfg = params.pacs.listen
    typer.echo(f"storage node {cfg.ae_title} on {cfg.host}:{cfg.port}, into {target}; Ctrl-C ends")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    typer.echo(f"{node.received} instances received")


@pacs_app.command()
def push(
    files: list[Path] = typer.Argument(..., help="DICOM files or folders of them to send."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Send DICOM objects (a prediction's SEG, an SR) to the PACS (STOW-RS or C-STORE)."""
    from medimg.pacs.push import push as send

    params = _load(params_file)
    found = sorted(
        f for p in files for f in ([p] if p.is_file() else p.rglob("*.dcm")) if f.is_file()
    )
    with _user_errors():
        delivery = send(params.pacs, found)
    if not delivery.delivered:
        typer.secho(f"not delivered, kept on disk: {delivery.error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"{delivery.files} objects delivered to {delivery.server}")
