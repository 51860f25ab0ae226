"""One frozen spec per task: everything that differs between diagnosis and segmentation.

Training, evaluation, the registry, the MLflow model, prediction and the CLI ask a
:class:`TaskSpec` instead of branching on a task's name: which params section configures
it, which network it builds, its loss, how a batch is scored, how a volume is predicted,
its validation metric (and direction), how the test set is summarised and plotted, its
registry name and gate metric, and what its model card says. Adding a task means adding
a spec here (and its network to :mod:`medimg.models.build`).

The outputs are configuration (:meth:`TaskSpec.configure`): the diagnosis' classes and
the segmentation's structures; :func:`configured_task` gives a spec for a params file.

Example:
    >>> get_task("classify").val_metric
    'auroc'
"""

from __future__ import annotations

from collections.abc import Sequence

from medimg.config import Params
from medimg.errors import ConfigError
from medimg.tasks.base import Batch as Batch
from medimg.tasks.base import Item as Item
from medimg.tasks.base import TaskSpec as TaskSpec
from medimg.tasks.classification import Classification as Classification
from medimg.tasks.classification import probability_column as probability_column
from medimg.tasks.segmentation import Segmentation as Segmentation

CLASSIFY = Classification(
    name="classify",
    val_metric="auroc",
    val_metric_title="AUROC",
    val_metric_card="AUROC (macro mean of one-vs-rest AUROCs for more than two classes)",
    maximize=True,
    with_masks=False,
    output="Diagnosis: a probability per class for a CT or MR volume (one logit for two "
    "classes, one per class otherwise).",
    architecture="MONAI ResNet",
    slices="on axial slices, slice logits pooled by a top-k mean",
)
SEGMENT = Segmentation(
    name="segment",
    val_metric="dice",
    val_metric_title="Dice",
    val_metric_card="mean Dice (over the structures; each over the volumes that have it)",
    maximize=True,
    with_masks=True,
    output="Segmentation: a probability per voxel of background and of each structure.",
    architecture="ResNet encoder in a MONAI FlexibleUNet",
    slices="on axial slices, predicted slice by slice",
)

# every task, in the order the pipeline runs them (the classifier may start from the
# segmenter's encoder: train.classify.pretrained)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (SEGMENT, CLASSIFY)}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The spec of ``task`` (a name or a spec), with binary outputs for a name.

    Raises:
        ConfigError: an unknown task name, naming the known ones.
    """
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"task must be one of {tuple(TASKS)}, got {task!r}") from None


def configured_task(
    task: str | TaskSpec, params: Params, classes: Sequence[str] | None = None
) -> TaskSpec:
    """The spec of ``task`` with the outputs of ``params`` (and, for a diagnosis whose
    params leave ``train.classify.classes`` unset, the ``classes`` its labels gave)."""
    return get_task(task).configure(params, classes)
