"""The ``medimg`` command line: one command per pipeline stage.

Heavy libraries (torch, monai, mlflow, prefect) are imported inside the commands, so
``medimg --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from medimg.cli_base import PARAMS_OPTION, _load, _progress, _user_errors
from medimg.cli_pacs import pacs_app

app = typer.Typer(
    help="medimg: DICOM CT/MR to validated, registered models, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


@app.command()
def synth(
    params_file: Path = PARAMS_OPTION,
    out: Path | None = typer.Option(
        None, help="Write raw/, masks/, labels.csv, synth_truth.csv here instead of params.data."
    ),
    force: bool = typer.Option(False, help="Rewrite the cohort even if it is up to date."),
) -> None:
    """Write the built-in synthetic DICOM cohort (demo and tests)."""
    from medimg import stages

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
    with _user_errors(), _progress("synth: series") as progress:
        counts = stages.synth(params, progress=progress, force=force)
    typer.echo(
        f"wrote {counts['series']} series ({counts['files']} files) for {counts['patients']} "
        f"patients, {counts['positives']} with lesions, to {params.data.raw}"
    )


@app.command()
def ingest(
    input_dir: Path | None = typer.Argument(None, help="DICOM folder (default: data.raw)."),
    output_dir: Path | None = typer.Argument(None, help="Output folder (default: data.interim)."),
    labels: Path | None = typer.Option(None, help="labels.csv (default: data.labels)."),
    masks: Path | None = typer.Option(None, help="Folder of masks (default: data.masks)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Ingest a DICOM folder: series, geometry checks, QC, de-identified volumes, manifest."""
    from medimg import stages

    params = _load(params_file)
    update = {
        k: v
        for k, v in {
            "raw": input_dir,
            "interim": output_dir,
            "labels": labels,
            "masks": masks,
        }.items()
        if v is not None
    }
    params = params.model_copy(update={"data": params.data.model_copy(update=update)})
    with _user_errors(), _progress("ingest: series") as progress:
        summary = stages.ingest(params, progress=progress)
    typer.echo(
        f"{summary['n_stacks']} volumes ({summary['n_processed']} new, {summary['n_reused']} "
        f"unchanged, {summary['n_flagged']} flagged), {summary['n_quarantined_files']} files "
        f"quarantined; see {params.data.interim}/qc.html"
    )


@app.command()
def preprocess(params_file: Path = PARAMS_OPTION) -> None:
    """Preprocess ingested volumes with MONAI and write patient-level splits."""
    from medimg import stages

    params = _load(params_file)
    with _user_errors(), _progress("preprocess: volumes") as progress:
        qc = stages.preprocess(params, progress=progress)
    parts = ", ".join(
        f"{name}: {s['patients']} patients ({s['positive_patients']} positive)"
        for name, s in qc["splits"].items()
    )
    typer.echo(f"{qc['n_volumes']} volumes preprocessed; splits {parts}")


TASK_OPTION = typer.Option(..., "--task", "-t", help="classify or segment.")


@app.command()
def train(
    task: str = TASK_OPTION,
    fold: int | None = typer.Option(
        None, help="The validation fold (default train.fold); with train.folds: one of them."
    ),
    resume: bool = typer.Option(False, help="Continue from the model folder's checkpoint.pt."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Fine-tune a pretrained ResNet (classify) or ResNet-encoder U-Net (segment); with
    train.folds set, one model per fold (all of them unless --fold is given)."""
    from medimg import stages
    from medimg.tasks import get_task

    params = _load(params_file)
    folds = params.cv_folds()
    todo = [fold] if folds is None or fold is not None else folds
    metric = get_task(task).val_metric_title
    for k in todo:
        with _user_errors():
            result = stages.train(params, task, resume=resume, fold=k)
        where = params.data.models / task
        if folds is not None and k is not None:
            from medimg.cv import fold_dir

            where = fold_dir(where, k)
        typer.echo(
            f"{task}: best validation {metric} {result.best_metric:.3f} at epoch "
            f"{result.best_epoch} of {result.epochs_run}; weights in {where}/model.pt"
        )


@app.command()
def evaluate(task: str = TASK_OPTION, params_file: Path = PARAMS_OPTION) -> None:
    """Evaluate on held-out test patients: metrics with 95 % CIs, plots."""
    from medimg import stages

    params = _load(params_file)
    with _user_errors():
        result = stages.evaluate(params, task)
    from medimg.report import metric_rows

    parts = [("", result), ("cross-validation ", result.get("cv") or {})]
    for part, source in parts:  # the test patients, then out of fold
        for owner, name, m in metric_rows(source):
            what = f"{owner} {name}" if owner else name
            ci = f"95% CI {m['ci_lower']} to {m['ci_upper']}"
            typer.echo(f"{task} {part}{what}: {m['value']} ({ci})")
    calibration = (result.get("ensemble") or {}).get("calibration")
    if calibration:
        typer.echo(
            f"{task} temperature {calibration['temperature']} (out of fold): test ECE "
            f"{calibration['test_ece_before']} -> {calibration['test_ece_after']}"
        )


def _decision(task: str, d: Any) -> None:
    status = "champion" if d.promoted else "challenger (champion unchanged)"
    typer.echo(f"{task}: version {d.version} is {status}: {d.reason}")
    if d.difference is not None:
        typer.echo(
            f"  {d.metric}: challenger {d.challenger_value:.4f}, champion (v{d.champion_version})"
            f" {d.champion_value:.4f}, difference {d.difference:+.4f} (95% CI {d.ci_low:+.4f}"
            f" to {d.ci_high:+.4f}, {d.n_patients} test patients)"
        )


@app.command()
def register(task: str = TASK_OPTION, params_file: Path = PARAMS_OPTION) -> None:
    """Register the evaluated model (alias challenger); promote it to champion if it beats
    the champion on the same test patients (registry.gate)."""
    from medimg import stages

    params = _load(params_file)
    with _user_errors():
        _decision(task, stages.register(params, task))


@app.command()
def summary(params_file: Path = PARAMS_OPTION) -> None:
    """Both tasks' test and cross-validation metrics, registered versions, where to look."""
    from medimg.summary import summary as lines

    with _user_errors():
        typer.echo("\n".join(lines(_load(params_file))))


@app.command()
def promote(
    task: str = TASK_OPTION,
    version: str | None = typer.Option(None, help="Registered version (default: challenger)."),
    force: bool = typer.Option(False, help="Make it champion without the gate."),
    reason: str = typer.Option("", help="Why (required with --force; recorded)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Run the promotion gate for a registered version, or force a promotion."""
    from medimg import stages

    params = _load(params_file)
    with _user_errors():
        _decision(task, stages.promote(params, task, version=version, force=force, reason=reason))


@app.command()
def predict(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model URI (default: predict.model), e.g. "
        "models:/medimg-segmenter@champion or models:/medimg-classifier@champion.",
    ),
    input_dir: Path | None = typer.Option(
        None, "--input", "-i", help="Folder of new DICOM studies (default: orchestration.inbox)."
    ),
    output_dir: Path | None = typer.Option(
        None, "--output", "-o", help="Results folder (default: predict.output)."
    ),
    pacs: bool = typer.Option(
        False,
        "--pacs",
        help="PACS mode: the DICOM SEG references the original images and "
        "carries the patient's identity (PHI). Default: de-identified.",
    ),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Predict new DICOM studies: NIfTI masks, DICOM SEG, predictions.csv, report.html."""
    from medimg import stages

    params = _load(params_file)
    if pacs:
        cfg = params.predict.model_copy(update={"deid": "pacs"})
        params = params.model_copy(update={"predict": cfg})
    with _user_errors(), _progress("predict: series") as progress:
        summary = stages.predict(params, Path("."), input_dir, output_dir, model, progress)
    out = output_dir or params.predict.output
    typer.echo(
        f"{summary['n_predicted']} series predicted ({summary['n_positive']} positive) with "
        f"{summary['model']} v{summary['model_version']}, {summary['n_rejected']} rejected, "
        f"{summary['n_failed']} failed; see {out}/report.html"
    )


LOOPBACK = ("127.0.0.1", "::1", "localhost")
HOST_OPTION = typer.Option(
    "127.0.0.1",
    help="Address to listen on. Anything but loopback exposes the server to the network: "
    "put authentication in front of it first (README, 'Shared deployments').",
)


def _warn_if_exposed(host: str, what: str) -> None:
    if host not in LOOPBACK:
        typer.echo(
            f"WARNING: {what} listens on {host}, reachable from the network; it has no "
            "authentication of its own: see the README, 'Shared deployments'",
            err=True,
        )


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port."),
    host: str = HOST_OPTION,
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Start the MLflow UI (127.0.0.1 by default) against the project's store."""
    import os
    import sys

    from medimg.tracking import is_server, tracking_uri

    params = _load(params_file)
    uri = tracking_uri(params.tracking)
    if is_server(uri):
        typer.echo(f"runs are on a tracking server: open {uri}")
        return
    _warn_if_exposed(host, "the MLflow UI")
    artifacts = params.tracking.artifacts.resolve()
    url = f"http://{host}:{port}"
    typer.echo(f"MLflow UI: {url}  (store {uri}; Ctrl-C stops it)")
    mlflow = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    args = [mlflow, "server", "--host", host, "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", uri, "--default-artifact-root", artifacts.as_uri()]
    os.execve(mlflow, args, env)


@app.command("prefect-server")
def prefect_server(
    port: int = typer.Option(4200, help="Port."),
    host: str = HOST_OPTION,
    external_url: str = typer.Option(
        "",
        help="The URL browsers reach this server at, behind a reverse proxy "
        "(https://prefect.example.org); default http://HOST:PORT.",
    ),
) -> None:
    """Start a Prefect server and its UI (127.0.0.1 by default), without telemetry."""
    import os
    import sys

    _warn_if_exposed(host, "the Prefect server")
    base = (external_url or f"http://{host}:{port}").rstrip("/")
    typer.echo(f"Prefect UI: {base}  (API {base}/api; Ctrl-C stops it)")
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the API it is given here; unset, Prefect gives it the client's
        # PREFECT_API_URL (the default port), not the port it is served on.
        "PREFECT_UI_API_URL": f"{base}/api",
        "PREFECT_UI_URL": base,
    }
    os.execve(prefect, [prefect, "server", "start", "--host", host, "--port", str(port)], env)


app.add_typer(pacs_app, name="pacs")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
