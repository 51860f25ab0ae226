"""One function per pipeline stage. The CLI, the DVC stages and the Prefect tasks all call
these, so each stage has exactly one implementation.

Stages take the validated :class:`~medimg.config.Params` and a project root; paths in the
params are relative to that root. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medimg.config import IngestParams, Params
from medimg.io import project_path
from medimg.typing import Progress

if TYPE_CHECKING:
    from medimg.ingest import IngestPaths


def synth(
    params: Params,
    root: Path = Path("."),
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, int]:
    """Write the built-in synthetic cohort to the paths in ``params.data`` (skipped when
    it is already there with the same settings, unless ``force``)."""
    from medimg.dicom.deid import write_demo_salt
    from medimg.dicom.synth import synth_cohort

    d = params.data
    write_demo_salt(ingest_params(params, root).salt_file)  # the same pseudonyms everywhere
    return synth_cohort(
        params.synth,
        raw_dir=project_path(root, d.raw),
        masks_dir=project_path(root, d.masks),
        labels_csv=project_path(root, d.labels),
        truth_csv=project_path(root, d.synth_truth),
        progress=progress,
        force=force,
        structures=params.structures,
    )


def ingest_paths(params: Params, root: Path = Path(".")) -> IngestPaths:
    """The ingest stage's inputs and outputs, from ``params.data``."""
    from medimg.ingest import IngestPaths

    d = params.data
    return IngestPaths(
        input=project_path(root, d.raw),
        out=project_path(root, d.interim),
        labels=project_path(root, d.labels),
        masks=project_path(root, d.masks),
        classes=getattr(params.train.classify, "classes", None),  # a TaskTrainParams has none
    )


def ingest(
    params: Params, root: Path = Path("."), progress: Progress | None = None
) -> dict[str, Any]:
    """DICOM folder to de-identified volumes, masks, manifest, QC report and quarantine;
    the masks are label maps of ``params.structures`` (NIfTI, DICOM SEG or RTSTRUCT in)."""
    from medimg.ingest import ingest as run

    cfg, paths = ingest_params(params, root), ingest_paths(params, root)
    return run(cfg, paths, progress, structures=params.structures)


def ingest_params(params: Params, root: Path = Path(".")) -> IngestParams:
    """The ingest section, with the salt file resolved against ``root``."""
    cfg = params.ingest
    if not cfg.salt_file.is_absolute():
        cfg = cfg.model_copy(update={"salt_file": root / cfg.salt_file})
    return cfg


def pin_runtime(params: Params) -> dict[str, str]:
    """Reproducible mode (``train.reproducible``) for a stage that computes with PyTorch,
    before its first tensor operation: the instruction sets, threads and algorithms pinned
    (:func:`medimg.runtime.pin_reproducible`). Not only training needs it: resampling a mask
    with nearest neighbour rounds coordinates that land on a half voxel one way or the
    other depending on the CPU's kernels. Returns what the process runs with."""
    from medimg import runtime

    t = params.train
    return runtime.pin_reproducible(t.threads) if t.reproducible else runtime.environment(False)


def preprocess(
    params: Params, root: Path = Path("."), progress: Progress | None = None
) -> dict[str, Any]:
    """Ingested volumes to cached, training-ready data and patient-level splits."""
    from medimg.preprocess import preprocess as run

    env = pin_runtime(params)
    d = params.data
    return run(
        params.preprocess,
        params.split,
        project_path(root, d.interim),
        project_path(root, d.processed),
        progress,
        runtime={k: env[k] for k in ("reproducible", "cpu_capability", "threads")},
    )


def _mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def train(
    params: Params,
    task: str,
    root: Path = Path("."),
    callbacks: Sequence[Callable[[Any], None]] = (),
    resume: bool = False,
    fold: int | None = None,
) -> Any:
    """Fine-tune the model of ``task`` (classify or segment) on the preprocessed data, and
    log the run and the model to MLflow (unless ``tracking.enabled`` is false).

    One model: validated on ``fold`` (default ``train.fold``), written to
    ``models/<task>/``. Under cross-validation (``train.folds``) ``fold`` is required and
    the model goes to ``models/<task>/folds/<fold>/`` (:func:`train_folds` trains them
    all); ``medimg evaluate`` makes the folds one ensemble.

    ``train.<task>.pretrained`` may be a path relative to ``root`` or an MLflow model URI,
    which is first downloaded to a local file through :mod:`medimg.tracking`.
    """
    from medimg.data.manifest import read_classes
    from medimg.tasks import configured_task
    from medimg.train import TrainConfig
    from medimg.train import train as run

    params, folds = _with_fold(params, task, fold)
    spec = configured_task(task, params, read_classes(project_path(root, params.data.processed)))
    cfg = spec.train_params(params.train)
    source = cfg.pretrained
    if source != "none" and not _mlflow_uri(source) and not Path(source).is_absolute():
        cfg = cfg.model_copy(update={"pretrained": str(project_path(root, Path(source)))})
        train_cfg = params.train.model_copy(update={spec.name: cfg})
        params = params.model_copy(update={"train": train_cfg})
    d = params.data
    model_dir, metrics_file = _train_paths(params, spec.name, root, folds is not None)
    config = TrainConfig.from_params(params, spec)

    def fit(extra: Sequence[Callable[[Any], None]] = ()) -> Any:
        return run(
            spec,
            config,
            project_path(root, d.processed),
            model_dir,
            metrics_file=metrics_file,
            callbacks=[*callbacks, *extra],
            resume=resume,
        )

    with tempfile.TemporaryDirectory(prefix="medimg-pretrained-") as tmp:
        if _mlflow_uri(source):
            from medimg import tracking

            tracking.configure(params, root)  # where the pretrained model is looked up
            local = tracking.pretrained_file(source, Path(tmp))
            config = dataclasses.replace(config, pretrained_file=local)
        if not params.tracking.enabled or _rank() > 0:
            return fit()
        from medimg import tracking

        with tracking.train_run(
            params,
            task,
            root,
            project_path(root, d.processed),
            project_path(root, d.interim),
            model_dir,
            resume,
            fold=fold if folds is not None else None,
        ) as tracked:
            result = fit([tracked.on_epoch])
            tracked.finish(result, metrics_file)
        return result


def _with_fold(params: Params, task: str, fold: int | None) -> tuple[Params, list[int] | None]:
    """``params`` validating on ``fold`` (when given), and the cross-validation's folds.

    Raises:
        ConfigError: under cross-validation, ``fold`` is not one of its folds.
    """
    from medimg.errors import ConfigError

    folds = params.cv_folds()
    if folds is not None and fold not in folds:
        raise ConfigError(
            f"train.folds is {folds}: train one of them (`medimg train --task {task} --fold "
            f"K`), or every fold (`medimg train --task {task}`); got fold {fold}"
        )
    if fold is not None:
        params = params.model_copy(update={"train": params.train.model_copy(update={"fold": fold})})
    return params, folds


def _train_paths(params: Params, task: str, root: Path, cross_validated: bool) -> tuple[Path, Path]:
    """The model folder and the training summary of a training run."""
    from medimg import cv

    models, metrics = (
        project_path(root, params.data.models),
        project_path(root, params.data.metrics),
    )
    if not cross_validated:
        return models / task, metrics / f"{task}_train.json"
    fold = params.train.fold
    return cv.fold_dir(models / task, fold), cv.fold_metrics_file(metrics, task, fold)


def train_folds(
    params: Params,
    task: str,
    root: Path = Path("."),
    callbacks: Sequence[Callable[[Any], None]] = (),
    resume: bool = False,
) -> list[Any]:
    """:func:`train` for every fold of ``train.folds``, one after the other (Prefect and
    DVC run them as separate tasks and stages); one model when it is not set."""
    folds = params.cv_folds()
    if folds is None:
        return [train(params, task, root, callbacks, resume)]
    return [train(params, task, root, callbacks, resume, fold=k) for k in folds]


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def evaluate(params: Params, task: str, root: Path = Path(".")) -> dict[str, Any]:
    """Evaluate the trained model of ``task`` on the held-out test patients, and add the
    results to the model's MLflow run; under cross-validation, join the folds into the
    ensemble first (:mod:`medimg.cv`), logged with its metrics in a parent run."""
    from medimg.evaluate import evaluate as run

    d = params.data
    model_dir = project_path(root, d.models) / task
    metrics_file = project_path(root, d.metrics) / f"{task}.json"
    plots_dir = project_path(root, d.plots) / task
    processed = project_path(root, d.processed)
    result = run(task, params, processed, model_dir / "model.pt", metrics_file, plots_dir)
    if params.tracking.enabled:
        from medimg import tracking

        folds = params.cv_folds()
        if folds is not None:  # the ensemble's run, to which the evaluation goes
            from medimg.cv import fold_dir

            fold_dirs = [fold_dir(model_dir, k) for k in folds]
            tracking.open_cv_run(params, task, root, model_dir, processed, fold_dirs)
        tracking.log_evaluation(
            params, task, root, model_dir, processed, result, metrics_file, plots_dir
        )
    return result


def _champion_scorer(params: Params, task: str, root: Path) -> Callable[[str], Any]:
    """Scores the registered champion on the current test patients (for the gate)."""

    def score(name: str) -> Any:
        from medimg import tracking
        from medimg.evaluate import score_test_set

        model = tracking.load_model(f"models:/{name}@{tracking.CHAMPION}")
        return score_test_set(task, params, model, project_path(root, params.data.processed))

    return score


def register(params: Params, task: str, root: Path = Path(".")) -> Any:
    """Register the evaluated model as a new version (alias challenger) and promote it to
    champion if it beats the current one on the same test patients."""
    from medimg import tracking

    model_dir = project_path(root, params.data.models) / task
    return tracking.register(params, task, root, model_dir, _champion_scorer(params, task, root))


def promote(
    params: Params,
    task: str,
    root: Path = Path("."),
    version: str | None = None,
    force: bool = False,
    reason: str = "",
) -> Any:
    """Run the promotion gate for a registered version (default: the challenger)."""
    from medimg import tracking

    return tracking.promote(
        params,
        task,
        root,
        version,
        force=force,
        reason=reason,
        champion_cases=_champion_scorer(params, task, root),
    )


def predict(
    params: Params,
    root: Path = Path("."),
    input_dir: Path | None = None,
    output_dir: Path | None = None,
    model_uri: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """A folder of new DICOM studies to masks, DICOM SEG, predictions.csv and report.html,
    with a registered model (default ``predict.model``) and its stored preprocessing.

    ``input_dir`` defaults to ``orchestration.inbox``, ``output_dir`` to ``predict.output``.
    """
    from medimg import tracking
    from medimg.predict import load_predictor
    from medimg.predict import predict as run

    pin_runtime(params)
    cfg = predict_params(params, root)
    client = tracking.configure(params, root)
    predictor = load_predictor(model_uri or cfg.model, client, cfg.device)
    return run(
        cfg,
        ingest_params(params, root),
        predictor,
        project_path(root, input_dir or params.orchestration.inbox),
        project_path(root, output_dir or cfg.output),
        progress,
    )


def predict_params(params: Params, root: Path = Path(".")) -> Any:
    """``predict``, with its folders resolved against the project ``root``."""
    cfg = params.predict
    if cfg.volumes_from is not None:
        cfg = cfg.model_copy(update={"volumes_from": project_path(root, cfg.volumes_from)})
    return cfg


def pacs_keys(params: Params, root: Path = Path(".")) -> Any:
    """The keyed hash that names pulled and received files (ingest's salt)."""
    from medimg.dicom.deid import Pseudonymizer, load_or_create_salt

    return Pseudonymizer(load_or_create_salt(ingest_params(params, root).salt_file))


def pacs_pull(
    params: Params,
    query: Any,
    out: Path | None = None,
    root: Path = Path("."),
    progress: Progress | None = None,
) -> Any:
    """The studies of ``query`` from ``params.pacs`` into ``out`` (default ``data.raw``)."""
    from medimg.pacs.pull import pull

    target = project_path(root, out or params.data.raw)
    return pull(params.pacs, query, target, pacs_keys(params, root), progress)
