from pathlib import Path

import pytest

from medimg.config import Params, TrainParams, load_params, parse_params
from medimg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _merged(base: dict, changes: dict) -> dict:
    return {
        k: _merged(v, changes[k]) if isinstance(v, dict) and k in changes else changes.get(k, v)
        for k, v in base.items()
    }


def test_repo_params_file_is_valid_and_matches_defaults() -> None:
    # params.yaml documents the defaults: drift between the two is a bug. Its demo departs
    # from the code's binary, one-structure defaults in these keys only.
    loaded = load_params(REPO / "params.yaml")
    demo = {
        "synth": {"n_patients": 120, "positive_fraction": 0.66,
                  "lesion_kinds": ["cyst", "solid"], "labels": "kind",
                  "lesion_radius_mm": (25.0, 35.0), "lesion_contrast_hu": 90.0,
                  "seg_fraction": 0.33, "rtstruct_fraction": 0.33},
        "augment": {"flip_prob": 0.0},
        "split": {"n_folds": 3},
        "train": {"folds": [0, 1, 2],
                  "classify": {"classes": ["none", "cyst", "solid"], "arch": "resnet10",
                               "pooling": "max", "pretrained": "none", "lr": 0.001, "width": 16,
                               "freeze_encoder_epochs": 0, "head_lr_mult": 1.0, "epochs": 40},
                  "segment": {"nsd_tolerance_mm": 6.0, "epochs": 30, "arch": "resnet10",
                              "width": 16, "val_every": 5,
                              "decoder_channels": [32, 16, 16, 8, 8]}},
        "structures": [s.model_dump(mode="json") for s in loaded.structures],
    }  # fmt: skip
    assert [s.name for s in loaded.structures] == ["body", "lung", "liver", "spine", "lesion"]
    assert loaded.structures[-1].type == Params().structures[0].type  # the lesion's codes
    assert loaded == parse_params(_merged(Params().model_dump(mode="json"), demo))


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("synth:\n  n_patinets: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert str(f) in str(e.value)
    assert "synth.n_patinets" in str(e.value)
    assert "unknown key" in str(e.value)


def test_wrong_value_names_key_and_value(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("synth:\n  positive_fraction: 1.5\n  orientations: [axial, diagonal]\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    msg = str(e.value)
    assert "synth.positive_fraction" in msg and "1.5" in msg
    assert "synth.orientations.1" in msg and "diagonal" in msg


def test_reversed_range_is_rejected() -> None:
    with pytest.raises(ConfigError, match="slice_spacing_mm"):
        parse_params({"synth": {"slice_spacing_mm": [6.0, 4.0]}})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_are_immutable() -> None:
    p = Params()
    with pytest.raises(ValueError):
        p.synth.seed = 3  # type: ignore[misc]


def test_a_partial_task_section_keeps_that_tasks_defaults() -> None:
    """A params file that sets one key of train.classify keeps the classifier's own
    defaults for the rest, not the generic ones of TaskTrainParams."""
    from medimg.config import ClassifyParams, SegmentParams, TaskTrainParams

    cls = parse_params({"train": {"classify": {"lr": 0.01}}}).train.classify
    assert cls.lr == 0.01
    assert (cls.pretrained, cls.epochs, cls.freeze_encoder_epochs, cls.head_lr_mult) == (
        ClassifyParams().pretrained,
        ClassifyParams().epochs,
        ClassifyParams().freeze_encoder_epochs,
        ClassifyParams().head_lr_mult,
    )
    assert (cls.pretrained, cls.epochs, cls.freeze_encoder_epochs, cls.head_lr_mult) == (
        "models/segment/model.pt",
        30,
        3,
        10.0,
    )
    seg = parse_params({"train": {"segment": {"epochs": 3}}}).train.segment
    assert (seg.epochs, seg.batch_size, seg.lr) == (3, SegmentParams().batch_size, 0.002)
    # a TaskTrainParams object built in code is taken as it is, generic defaults included
    built = TrainParams(classify=TaskTrainParams(arch="resnet10")).classify
    assert (built.arch, built.pretrained, built.epochs) == ("resnet10", "none", 15)


def test_a_model_holds_its_own_sections_only() -> None:
    """What is saved with a model's weights: where runs are logged, registered, scheduled
    or sent is not part of it, so editing those sections leaves a model's bytes alone."""
    params = Params()
    saved = params.model_dump_for_model()
    assert set(saved) == set(Params.MODEL_SECTIONS)
    assert {"tracking", "registry", "orchestration", "predict"} & set(saved) == set()
    elsewhere = params.model_copy(
        update={"tracking": params.tracking.model_copy(update={"uri": "http://host:5000"})}
    )
    assert elsewhere.model_dump_for_model() == saved
    assert Params.model_validate(saved) == params  # the rest are defaults when read back
