"""The classifier's result as a DICOM Structured Report a PACS can store and a viewer show.

A Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom builds and
validates it): one measurement group per series, naming the algorithm (the registered
model and its version), the predicted class as a qualitative evaluation, each class's
probability, and, when a segmenter ran too, each structure's volume in millilitres. It
references the series' instances as evidence, so the PACS files it in the source study.

The diagnosis codes of medimg's own classes use the private coding scheme ``99MEDIMG``
(a model's class names are the project's, not a standard terminology's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medimg.io import atomic_path

SCHEME = "99MEDIMG"
SERIES_NUMBER = 9902


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value[:16], scheme_designator=scheme, meaning=meaning[:64])


def build_diagnosis_sr(
    sources: Sequence[Dataset],
    probabilities: Mapping[str, float],
    predicted: str,
    model: str,
    version: str,
    volumes_ml: Mapping[str, float] | None = None,
) -> Dataset:
    """The SR of one series' prediction (``sources``: its instances, as the evidence).

    UIDs derive from the series, the model and its version: predicting again with the same
    model replaces the object in the PACS instead of adding a copy.

    Raises:
        ValueError: ``predicted`` is not one of the classes of ``probabilities``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if predicted not in probabilities:
        raise ValueError(f"predicted class {predicted!r} is not one of {sorted(probabilities)}")
    series_uid = str(sources[0].SeriesInstanceUID)
    seed = [series_uid, model, version, "diagnosis-sr"]
    algorithm = hd.sr.AlgorithmIdentification(name=model[:64], version=version[:16])
    measurements = [
        hd.sr.Measurement(
            name=_code(f"P-{name}", f"Probability of {name}"),
            value=float(p),
            unit=_code("1", "no units", "UCUM"),
            algorithm_id=algorithm,
        )
        for name, p in probabilities.items()
    ]
    for structure, ml in (volumes_ml or {}).items():
        measurements.append(
            hd.sr.Measurement(
                name=_code(f"VOL-{structure}", f"Volume of {structure}"),
                value=float(ml),
                unit=_code("ml", "milliliter", "UCUM"),
                algorithm_id=algorithm,
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[*seed, "tracking"]), identifier="medimg diagnosis"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_code("DIAGNOSIS", "Predicted class"), value=_code(predicted, predicted)
            )
        ],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[model, version, "device"]), name=model[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code("DIAGNOSIS", "Image-based diagnosis"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[*seed, "instance"]),
        instance_number=1,
        manufacturer="medimg",
        is_complete=True,
    )


def write_diagnosis_sr(sr: Dataset, path: Path) -> None:
    """Write the SR atomically."""
    with atomic_path(path, suffix=".tmp.dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)


def read_diagnosis(path: Path) -> dict[str, Any]:
    """The predicted class, the probabilities and the volumes of an SR written by
    :func:`build_diagnosis_sr`, read back with highdicom."""
    import highdicom as hd

    sr = hd.sr.srread(path)
    report: Any = sr.content  # a MeasurementReport for a TID 1500 document
    groups = report.get_image_measurement_groups()
    group = groups[0] if groups else None
    out: dict[str, Any] = {"probabilities": {}, "volumes_ml": {}, "predicted": None}
    if group is None:
        return out
    for m in group.get_measurements():
        meaning = m.name.meaning
        if meaning.startswith("Probability of "):
            out["probabilities"][meaning.removeprefix("Probability of ")] = float(m.value)
        elif meaning.startswith("Volume of "):
            out["volumes_ml"][meaning.removeprefix("Volume of ")] = float(m.value)
    for q in group.get_qualitative_evaluations():
        out["predicted"] = q.value.meaning
    return out
