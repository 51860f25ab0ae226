"""Parameters: one pydantic model per ``params.yaml`` section, strict about keys.

``params.yaml`` is the single source of parameters. It is read once, at the edge (CLI,
DVC stage, Prefect flow); library functions receive only their own section. Unknown keys
and wrong values fail with a message naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medimg.config.base import Fraction, IntRange, Orientation, Range, StrictModel, ordered
from medimg.config.data import (
    DataParams,
    IngestParams,
    IntTriple,
    PreprocessParams,
    SplitParams,
    StackChoice,
    StacksParams,
    SynthParams,
    Triple,
)
from medimg.config.pacs import ListenParams, PacsParams
from medimg.config.structures import (
    LESION,
    CodeParams,
    StructureParams,
    check_structures,
    structure_key,
    structure_label,
)
from medimg.errors import ConfigError

__all__ = [  # the sections and types defined beside this file, importable from here
    "LESION", "CodeParams", "DataParams", "Fraction", "IngestParams", "IntRange",
    "IntTriple", "ListenParams", "Orientation", "PacsParams", "PreprocessParams", "Range",
    "SplitParams", "StackChoice", "StacksParams", "StrictModel", "StructureParams",
    "SynthParams", "Triple", "structure_key",
]  # fmt: skip


class LoaderParams(StrictModel):
    """How training reads the cached data."""

    dataset: Literal["cache", "persistent", "plain"] = "cache"  # MONAI dataset kind
    cache_gib: float = Field(2.0, ge=0)  # memory budget of the in-memory cache, GiB
    workers: int = Field(0, ge=0)  # loader workers; 0 reads in threads (ThreadDataLoader)


class AugmentParams(StrictModel):
    """Random augmentation at training time."""

    flip_prob: Fraction = 0.5  # per axis
    affine_prob: Fraction = 0.3  # chance of a small random affine
    rotate_deg: float = Field(10.0, ge=0)  # max rotation about each axis, degrees
    scale: float = Field(0.1, ge=0)  # max relative zoom
    noise_std: float = Field(0.02, ge=0)  # Gaussian noise, in scaled intensity units
    shift: float = Field(0.05, ge=0)  # max intensity shift, scaled units
    intensity_prob: Fraction = 0.3  # chance of noise and of shift, each
    patch_size: IntTriple = (32, 32, 32)  # segmentation patch, voxels (multiples of 32)
    patches_per_volume: int = Field(2, ge=1)  # segmentation patches sampled per volume
    positive_ratio: float = Field(1.0, ge=0)  # lesion-centred : background patches


class TaskTrainParams(StrictModel):
    """One task's model and optimisation."""

    arch: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet18"  # backbone
    spatial_dims: Literal[2, 3] = 3  # 3: 3D volumes; 2: axial slices of the same volumes
    # (segment: patches_per_volume slices of patch_size[:2], predicted slice by slice;
    # classify: each volume a bag of slices, top-k mean of slice logits)
    conv1_stride: int = Field(2, ge=1, le=2)  # first conv stride (2 is ~7x faster in 3D)
    width: Literal[16, 32, 64] = 64  # channels of the ResNet's first stage, doubled by each
    # later one: 64 is the standard network, the one pretrained files hold; 32 has a
    # quarter of the weights and a 2.25x faster step on 2 AVX2 cores (docs/performance.md)
    pretrained: str = "none"  # none | path to MedicalNet .pth, torchvision .pth,
    # medimg checkpoint, or an MLflow URI such as models:/medimg-classifier@champion
    min_loaded_fraction: Fraction = 0.9  # fail when fewer backbone tensors load
    freeze_encoder_epochs: int = Field(0, ge=0)  # encoder frozen for the first N epochs
    head_lr_mult: float = Field(1.0, gt=0)  # learning-rate multiplier of the new head
    epochs: int = Field(15, ge=1)  # upper bound; early stopping may end sooner
    batch_size: int = Field(4, ge=1)  # volumes per step (segmentation: volumes, each
    # giving augment.patches_per_volume patches)
    accumulate: int = Field(1, ge=1)  # gradient accumulation steps
    lr: float = Field(1e-3, gt=0)  # peak learning rate, AdamW
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)  # linear warm-up, then cosine decay to zero
    patience: int = Field(15, ge=1)  # epochs without validation improvement before stopping
    val_every: int = Field(1, ge=1)  # validate every N epochs and after the last (MONAI's
    # val_interval): the best weights are chosen among the validated epochs
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)  # segmentation decoder widths


class ClassifyParams(TaskTrainParams):
    """``train.classify``: the diagnosis model. Keys a params file leaves out keep these
    defaults, not the generic ones of :class:`TaskTrainParams`.

    By default the classifier starts from the segmenter's encoder (train segment first):
    dense lesion supervision is the "related task" pretraining a CPU can afford. The
    demo's params train it from scratch instead (docs/performance.md).
    """

    pretrained: str = "models/segment/model.pt"  # see TaskTrainParams.pretrained
    epochs: int = Field(30, ge=1)  # upper bound; early stopping may end sooner
    freeze_encoder_epochs: int = Field(3, ge=0)  # encoder frozen for the first N epochs
    head_lr_mult: float = Field(10.0, gt=0)  # learning-rate multiplier of the new head
    classes: tuple[str, ...] | None = None  # class names in order (index 0 first), as the
    # labels file writes them; None: the labels file's values, sorted (numbers numerically).
    # Two classes train one logit (sigmoid); more, one logit per class (softmax).
    balance: Literal["none", "weights", "sampler"] = "none"  # class imbalance: weights:
    # loss weighted by inverse class frequency; sampler: classes drawn equally often
    pooling: Literal["avg", "max"] = "avg"  # 3D: global pooling of the last feature map;
    # max asks "is a lesion anywhere", avg dilutes a small one by the volume (no weights:
    # pretrained files load either way). 2D bags of slices keep their top-k mean.

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if len(value) < 2:
            raise ValueError(f"needs at least two classes, got {list(value)}")
        if len({v.strip() for v in value}) != len(value) or any(not v.strip() for v in value):
            raise ValueError(f"class names must be distinct and non-empty, got {list(value)}")
        return tuple(v.strip() for v in value)


class SegmentParams(TaskTrainParams):
    """``train.segment``: the segmentation model, with its own defaults."""

    batch_size: int = Field(2, ge=1)  # volumes per step, each giving patches_per_volume
    lr: float = Field(0.002, gt=0)  # peak learning rate, AdamW
    epochs: int = Field(25, ge=1)  # upper bound; early stopping may end sooner
    nsd_tolerance_mm: float = Field(3.0, gt=0)  # normalised surface distance tolerance, mm


class TrainParams(StrictModel):
    """Training of both tasks: shared settings, then one section per task."""

    seed: int = 0  # seeds Python, NumPy and torch; CPU runs repeat exactly
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    amp: bool = True  # mixed precision (on CUDA only)
    fold: int = Field(0, ge=0)  # the validation fold; the other folds train
    # Cross-validation: "all" or a list of folds trains one model per fold (each validated
    # on its own patients), scores every listed fold's patients out of fold, and makes the
    # fold models one ensemble, the model that is tested and registered (docs/training.md).
    # None: one model, validated on `fold`. dvc.yaml's foreach needs the list written out.
    folds: Literal["all"] | list[Annotated[int, Field(ge=0)]] | None = None
    reproducible: bool = True  # the same numbers on every x86-64 CPU with AVX2: pins the
    # instruction sets, the thread count and deterministic algorithms (docs/training.md)
    threads: int = Field(2, ge=1)  # intra-op threads when reproducible (results depend on it)
    classify: ClassifyParams = ClassifyParams()
    segment: SegmentParams = SegmentParams()

    @field_validator("classify", "segment", mode="before")
    @classmethod
    def _complete_section(cls, value: Any) -> Any:
        # A mapping (a params file's section) is completed from the task's own defaults.
        # A TaskTrainParams object built in code says every value already: taken as it is.
        if isinstance(value, TaskTrainParams):
            return value.model_dump()
        return value


class TrackingParams(StrictModel):
    """MLflow: where runs and models go. ``MLFLOW_TRACKING_URI`` overrides ``uri``."""

    enabled: bool = True  # log train/evaluate runs to MLflow
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are from the project root
    artifacts: Path = Path("mlartifacts")  # artifact folder of a local store (a server
    # keeps its own)
    experiment_prefix: str = "medimg"  # experiments are named <prefix>-<task>
    ui_url: str = "http://127.0.0.1:5000"  # the MLflow UI people open for a local store
    # (make ui); links to runs of a tracking server point at the server itself
    retries: int = Field(3, ge=0)  # extra tries of a failed call to the tracking server
    retry_wait_s: float = Field(2.0, ge=0)  # first wait between tries (doubles each try)

    def experiment(self, task: str) -> str:
        """The task's MLflow experiment name, ``<experiment_prefix>-<task>``."""
        return f"{self.experiment_prefix}-{task}"


class GateParams(StrictModel):
    """When a challenger replaces the champion: compared on the same test patients."""

    rule: Literal["paired_ci", "margin"] = "paired_ci"  # paired_ci: the lower bound of the
    # 95% patient-bootstrap CI of (challenger - champion) must exceed min_margin;
    # margin: the point difference must exceed min_margin
    min_margin: float = Field(0.0, ge=0)  # in units of the metric
    classify_metric: Literal["auroc", "balanced_accuracy"] = "auroc"  # higher is better
    segment_metric: Literal["dice"] = "dice"  # mean Dice on test volumes with a lesion
    n_boot: int = Field(1000, ge=100)  # paired bootstrap resamples of patients


class RegistryParams(StrictModel):
    """Model registry names and the promotion gate."""

    classify_name: str = "medimg-classifier"
    segment_name: str = "medimg-segmenter"
    gate: GateParams = GateParams()


class OrchestrationParams(StrictModel):
    """Prefect deployments: when the pipeline retrains, where new studies arrive."""

    timezone: str = "UTC"  # IANA name, e.g. Europe/Berlin, for the cron schedule
    retrain_cron: str = "0 2 * * *"  # nightly-retrain: dvc repro, register, promote
    inbox: Path = Path("data/inbox")  # predict-inbox watches this folder of new studies
    inbox_interval_s: int = Field(300, ge=10)  # how often predict-inbox runs
    inbox_quiet_s: float = Field(120.0, ge=0)  # a study folder without the storage node's
    # COMPLETE marker is taken once no file in it has changed for this long
    work_pool: str = "medimg"  # the work pool deployments are sent to (`prefect worker`)
    fold_workers: int = Field(1, ge=1)  # folds of a cross-validation trained at once by the
    # pipeline flow, each in a process of its own (one per GPU; 1 on a small CPU machine)
    fold_gpus: tuple[Annotated[int, Field(ge=0)], ...] = ()  # CUDA devices the folds take in turn
    # (CUDA_VISIBLE_DEVICES); () leaves the device to train.device


class PredictParams(StrictModel):
    """Prediction on new studies: which model, where results go, how PHI is handled."""

    model: str = "models:/medimg-segmenter@champion"  # registered model (or runs:/) URI
    output: Path = Path("predictions")  # results folder: <key>/, predictions.csv, report
    deid: Literal["deidentified", "pacs"] = "deidentified"  # pacs: the SEG references the
    # original instances and carries the patient and study (for the hospital's own PACS)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # inference device; auto: CUDA if any
    seg_series_number: int = Field(9901, ge=1)  # SeriesNumber of the DICOM SEG objects
    montage_slices: int = Field(12, ge=1)  # slices shown in each PNG montage
    montage_columns: int = Field(4, ge=1)  # montage tiles per row
    montage_window_hu: Range = (-160.0, 240.0)  # CT display window of the montage, HU
    volumes_from: Path | None = None  # a segmenter's prediction folder: the classifier's SR
    # then carries the volumes it measured on the same series (predictions.csv)
    push: bool = False  # send each study's SEG and SR to the PACS (``pacs``) after
    # prediction; needs deid: pacs (the results must name the patient to be filed)

    @model_validator(mode="after")
    def _check(self) -> PredictParams:
        ordered(self.montage_window_hu, "predict.montage_window_hu")
        if self.push and self.deid != "pacs":
            raise ValueError(
                "predict.push sends results to the hospital's PACS, where they must be "
                "filed with the patient's own study: set predict.deid: pacs too (a "
                "de-identified SEG would create a pseudonymous patient there)"
            )
        return self


class Params(StrictModel):
    """All of ``params.yaml``."""

    data: DataParams = DataParams()
    synth: SynthParams = SynthParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    split: SplitParams = SplitParams()
    loader: LoaderParams = LoaderParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    registry: RegistryParams = RegistryParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    predict: PredictParams = PredictParams()
    pacs: PacsParams = PacsParams()
    # Segmentation targets, in label-map order: structure i has value i + 1 in every mask.
    # Where structures overlap the later one wins, so list containers (body, organs)
    # before what lies inside them (lesions): docs/training.md, "Several structures".
    structures: tuple[StructureParams, ...] = (LESION,)

    @field_validator("structures")
    @classmethod
    def _check_structures(cls, value: tuple[StructureParams, ...]) -> tuple[StructureParams, ...]:
        return check_structures(value)

    @model_validator(mode="after")
    def _check_folds(self) -> Params:
        folds, n = self.train.folds, self.split.n_folds
        if isinstance(folds, list):
            wrong = [f for f in folds if f >= n]
            if not folds or wrong or len(set(folds)) != len(folds):
                raise ValueError(
                    f"train.folds {folds} must be distinct folds below split.n_folds ({n}); "
                    f'"all" lists every fold'
                )
        return self

    # What a model is made of: the sections saved with its weights (config.json, model.pt)
    # and read back at prediction. Where runs are logged, registered, scheduled or sent
    # (tracking, registry, orchestration, predict, and sections added for deployment) is
    # not part of a model: editing them must not change a model's bytes.
    MODEL_SECTIONS: ClassVar[tuple[str, ...]] = (
        "data", "synth", "ingest", "preprocess", "split", "loader", "augment", "train",
        "structures",
    )  # fmt: skip

    def model_dump_for_model(self) -> dict[str, Any]:
        """The sections of :data:`MODEL_SECTIONS`, as JSON values."""
        return self.model_dump(mode="json", include=set(self.MODEL_SECTIONS))

    def cv_folds(self) -> list[int] | None:
        """The folds of a cross-validation (``train.folds``), in order; None for one model."""
        folds = self.train.folds
        if folds is None:
            return None
        return list(range(self.split.n_folds)) if folds == "all" else sorted(folds)

    def structure_label(self, name: str) -> int | None:
        """The label-map value (1..K) of the structure an annotation's ``name`` means, or
        None when no configured structure or synonym matches."""
        return structure_label(self.structures, name)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against the documented params)"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def parse_params(raw: dict[str, Any] | None, source: str = "<params>") -> Params:
    """Validate a mapping of parameters.

    Args:
        raw: the parsed YAML mapping (``None`` means all defaults).
        source: the file name to cite in error messages.

    Raises:
        ConfigError: naming the file and every offending key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())  # type: ignore[arg-type]
        raise ConfigError(f"{source}: invalid parameters:\n  {lines}") from e


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ConfigError: the file is missing, is not YAML, or has wrong keys or values.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: parameter file not found (pass --params PATH)") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_params(raw, str(path))
