"""Loading pretrained weights: real MONAI models saved to real files, no mocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import resnet10, resnet18, resnet34
from torch import nn

from medimg.config import TaskTrainParams
from medimg.errors import ConfigError
from medimg.models.pretrained import (
    LoadReport,
    adapt,
    detect_format,
    freeze_encoder,
    load_pretrained,
    map_keys,
    param_groups,
    read_state_dict,
)
from medimg.models.resnet import build_classifier
from medimg.models.unet import build_segmenter

N_CLASSIFIER_BACKBONE = 85  # resnet18, 3D, type-A shortcuts: all but fc.* and num_batches_tracked
N_SEGMENTER_BACKBONE = 85  # encoder.* of FlexibleUNet: parameter-free shortcuts, no downsample


class NotATensor:
    """A custom class: weights_only loading must refuse to unpickle it."""


def _counted(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if not k.endswith("num_batches_tracked")]


def _randomise_bn(model: nn.Module) -> None:
    """Give BatchNorm non-default statistics, so copying them is visible."""
    gen = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            assert mod.running_mean is not None and mod.running_var is not None
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen))
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    src = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000)
    _randomise_bn(src)
    path = tmp_path_factory.mktemp("tv") / "resnet18_imagenet.pth"
    torch.save(src.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def medicalnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    src = resnet18(spatial_dims=3, n_input_channels=1, num_classes=1, shortcut_type="A")
    _randomise_bn(src)
    sd = src.state_dict()
    path = tmp_path_factory.mktemp("mn") / "resnet_18.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in sd.items() if not k.startswith("fc")}}, path
    )
    return path


def classifier(arch: str = "resnet18") -> nn.Module:
    return build_classifier(TaskTrainParams(arch=arch))  # type: ignore[arg-type]


def segmenter() -> nn.Module:
    return build_segmenter(TaskTrainParams(arch="resnet18"))


# ----------------------------------------------------------------------------- formats


def test_detect_format_of_the_three_layouts(torchvision_file: Path, medicalnet_file: Path) -> None:
    assert read_state_dict(torchvision_file)[1] == "torchvision"
    state, fmt = read_state_dict(medicalnet_file)
    assert fmt == "medicalnet"
    assert all(k.startswith("module.") for k in state)
    own = classifier().state_dict()
    assert detect_format({"model": own, "config": {"arch": "resnet18"}}) == "medimg"
    with pytest.raises(ConfigError, match="unrecognised checkpoint layout"):
        detect_format({"weights": torch.zeros(3)})


def test_map_keys_is_explicit() -> None:
    w = torch.zeros(1)
    src = {"module.conv1.weight": w, "module.layer1.0.bn1.weight": w, "module.fc.weight": w}
    assert list(map_keys(src, "medicalnet", "classify")) == [
        "conv1.weight",
        "layer1.0.bn1.weight",
    ]
    assert list(map_keys(src, "torchvision", "segment")) == [
        "encoder.conv1.weight",
        "encoder.layer1.0.bn1.weight",
    ]
    seg = {"encoder.conv1.weight": w, "decoder.blocks.0.conv1.conv.weight": w}
    assert list(map_keys(seg, "medimg", "segment")) == list(seg)  # same task: all kept
    assert list(map_keys(seg, "medimg", "classify")) == ["conv1.weight"]
    cls = {"conv1.weight": w, "fc.weight": w}
    assert list(map_keys(cls, "medimg", "classify")) == ["conv1.weight", "fc.weight"]
    assert list(map_keys(cls, "medimg", "segment")) == ["encoder.conv1.weight"]


# ----------------------------------------------------------------------------- adapt


def test_adapt_inflates_and_sums_rgb() -> None:
    w = torch.randn(64, 3, 7, 7)
    out = adapt(w, (64, 1, 7, 7, 7))
    assert out is not None
    expected = w.sum(dim=1, keepdim=True).unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7
    torch.testing.assert_close(out, expected)
    # more target channels than source: repeat and scale
    more = adapt(torch.ones(8, 1, 3, 3), (8, 2, 3, 3, 3))
    assert more is not None
    torch.testing.assert_close(more, torch.full((8, 2, 3, 3, 3), 1 / 6))
    # unfittable: other out-channels, other kernel, other vector length, 3D -> 2D
    assert adapt(w, (32, 1, 7, 7, 7)) is None
    assert adapt(w, (64, 1, 3, 3, 3)) is None
    assert adapt(torch.zeros(64), (128,)) is None
    assert adapt(torch.zeros(64, 1, 7, 7, 7), (64, 1, 7, 7)) is None
    assert adapt(torch.zeros(1000, 512), (1, 512)) is None


def test_inflated_conv_on_constant_volume_equals_2d_conv() -> None:
    torch.manual_seed(0)
    w2 = torch.randn(16, 3, 7, 7)
    w3 = adapt(w2, (16, 1, 5, 7, 7))
    assert w3 is not None
    rgb = torch.full((1, 3, 24, 24), 0.7)  # a grey image: R = G = B
    grey = torch.full((1, 1, 12, 24, 24), 0.7)
    out2 = F.conv2d(rgb, w2, padding=3)[..., 3:-3, 3:-3]  # away from the zero-padded border
    out3 = F.conv3d(grey, w3, padding=(2, 3, 3))[..., 2:-2, 3:-3, 3:-3]
    assert out3.numel() > 0
    torch.testing.assert_close(out3, out2.unsqueeze(2).expand_as(out3), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- loading


def test_torchvision_into_3d_classifier(torchvision_file: Path) -> None:
    src = torch.load(torchvision_file, weights_only=True)
    model = classifier()
    fc_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    report = load_pretrained(model, torchvision_file, "classify")
    assert report.source_format == "torchvision"
    assert report.n_model_backbone == N_CLASSIFIER_BACKBONE
    assert len(report.loaded) == N_CLASSIFIER_BACKBONE and report.fraction == 1.0
    assert report.missing == [] and report.skipped_shape == []
    # torchvision's projection shortcuts have no place in MedicalNet-style type-A blocks
    assert set(report.unexpected) == {"fc.weight", "fc.bias"} | {
        k for k in src if ".downsample." in k and not k.endswith("num_batches_tracked")
    }
    own = model.state_dict()
    expected = src["conv1.weight"].sum(1, keepdim=True).unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7
    torch.testing.assert_close(own["conv1.weight"], expected)
    for key in ("bn1.running_mean", "bn1.running_var", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(own[key], src[key])
    for key, before in fc_before.items():
        torch.testing.assert_close(own[key], before)  # the head stays as initialised
    assert "loaded 85/85" in report.summary()


def test_torchvision_into_3d_segmenter(torchvision_file: Path) -> None:
    src = torch.load(torchvision_file, weights_only=True)
    model = segmenter()
    report = load_pretrained(model, torchvision_file, "segment")
    assert report.n_model_backbone == N_SEGMENTER_BACKBONE
    assert len(report.loaded) == N_SEGMENTER_BACKBONE and report.fraction == 1.0
    assert all(k.startswith("encoder.") for k in report.loaded)
    # the encoder's ResNet-18 has parameter-free shortcuts: the source's projections go unused
    assert "layer2.0.downsample.0.weight" in report.unexpected
    own = model.state_dict()
    expected = src["conv1.weight"].sum(1, keepdim=True).unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7
    torch.testing.assert_close(own["encoder.conv1.weight"], expected)
    torch.testing.assert_close(own["encoder.bn1.running_var"], src["bn1.running_var"])


def test_medicalnet_into_classifier(medicalnet_file: Path) -> None:
    src = torch.load(medicalnet_file, weights_only=True)["state_dict"]
    model = classifier()
    report = load_pretrained(model, medicalnet_file, "classify")
    assert report.source_format == "medicalnet"
    assert report.fraction == 1.0 and report.unexpected == []
    own = model.state_dict()
    for key in _counted(own):
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], src["module." + key])


def test_medicalnet_shortcut_a_fits_segmenter_and_classifier(tmp_path: Path) -> None:
    # Real MedicalNet ResNet-18s use parameter-free (type A) shortcuts, as do the segmenter's
    # encoder and medimg's classifier: the whole backbone loads into either.
    src = resnet18(spatial_dims=3, n_input_channels=1, shortcut_type="A", bias_downsample=False)
    path = tmp_path / "resnet_18_23dataset.pth"
    sd = src.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items() if "fc" not in k}}, path)
    assert load_pretrained(segmenter(), path, "segment").fraction == 1.0
    report = load_pretrained(classifier(), path, "classify")
    assert report.fraction == 1.0 and report.missing == []


def test_medicalnet_resnet10_projections_fit_segmenter_and_classifier(tmp_path: Path) -> None:
    # MedicalNet's ResNet-10 has projection shortcuts without bias (type B, MONAI's
    # resnet_params), as the segmenter's ResNet-10 encoder has: the classifier builds them
    # too, so every tensor loads, the three projections and their batch norms included.
    src = resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False)
    path = tmp_path / "resnet_10_23dataset.pth"
    sd = src.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items() if "fc" not in k}}, path)
    seg = build_segmenter(TaskTrainParams(arch="resnet10"))
    assert load_pretrained(seg, path, "segment").fraction == 1.0
    report = load_pretrained(build_classifier(TaskTrainParams(arch="resnet10")), path, "classify")
    assert report.fraction == 1.0 and report.missing == [] and report.unexpected == []
    assert sum(".downsample." in k for k in report.loaded) == 15  # 3 x (conv, 4 of its norm)


def test_medimg_checkpoint_round_trip_with_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    trained = classifier()
    _randomise_bn(trained)
    path = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "config": {"arch": "resnet18"}}, path)
    fresh = classifier()
    report = load_pretrained(fresh, path, "classify")
    assert report.source_format == "medimg" and report.fraction == 1.0
    assert sorted(report.loaded_head) == ["fc.bias", "fc.weight"]
    assert report.unexpected == []
    torch.testing.assert_close(fresh.state_dict(), trained.state_dict())
    # the other task takes the backbone only
    seg = segmenter()
    report = load_pretrained(seg, path, "segment")
    assert report.fraction == 1.0 and report.loaded_head == []
    torch.testing.assert_close(
        seg.state_dict()["encoder.conv1.weight"], trained.state_dict()["conv1.weight"]
    )


def test_segmenter_checkpoint_round_trip(tmp_path: Path) -> None:
    trained = segmenter()
    path = tmp_path / "seg.pt"
    torch.save({"model": trained.state_dict(), "config": {}}, path)
    fresh = segmenter()
    report = load_pretrained(fresh, path, "segment")
    assert report.fraction == 1.0 and report.unexpected == []
    assert any(k.startswith("decoder.") for k in report.loaded_head)
    torch.testing.assert_close(fresh.state_dict(), trained.state_dict())


# ----------------------------------------------------------------------------- failures


def test_wrong_depth_fails_with_counts(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(spatial_dims=3, n_input_channels=1, shortcut_type="A").state_dict(), path)
    model = classifier("resnet34")
    n34 = len([k for k in _counted(model.state_dict()) if not k.startswith("fc.")])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        load_pretrained(model, path, "classify")
    msg = str(err.value)
    assert "resnet18.pth" in msg and f"only 85/{n34} backbone tensors" in msg
    assert "Wrong architecture depth" in msg and "Wrong file" in msg
    for key, value in model.state_dict().items():  # a failed load leaves the model alone
        torch.testing.assert_close(value, before[key])
    with pytest.raises(ConfigError, match=r"wrong shape"):
        load_pretrained(classifier("resnet50"), path, "classify")


def test_deeper_source_loads_but_reports_unused(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34(spatial_dims=3, n_input_channels=1, shortcut_type="A").state_dict(), path)
    report = load_pretrained(classifier(), path, "classify")
    assert report.fraction == 1.0
    assert "layer3.5.conv1.weight" in report.unexpected


def test_missing_file_and_junk_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.pth not found"):
        read_state_dict(tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ConfigError, match=r"notes\.pth: not a PyTorch checkpoint"):
        read_state_dict(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.pth: not a PyTorch checkpoint"):
        load_pretrained(classifier(), empty, "classify")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ConfigError, match=r"list\.pth: holds a list, not a state dict"):
        read_state_dict(listed)
    no_tensors = tmp_path / "meta.pth"
    torch.save({"state_dict": {"epoch": 3}}, no_tensors)
    with pytest.raises(ConfigError, match=r"unrecognised checkpoint layout"):
        read_state_dict(no_tensors)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(ConfigError, match=r"evil\.pth: holds Python objects .*weights_only"):
        load_pretrained(classifier(), path, "classify")


def test_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    sd = resnet18(spatial_dims=2, n_input_channels=3).state_dict()
    from safetensors.torch import save_file  # a dependency of medimg: never skipped

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    state, fmt = read_state_dict(path)
    assert fmt == "torchvision" and set(state) == set(sd)


def test_safetensors_without_the_package_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resnet18.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails: not installed
    with pytest.raises(ConfigError, match="safetensors"):
        read_state_dict(path)


def test_none_source_changes_nothing() -> None:
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, "none", "classify")
    assert report == LoadReport(source_format="none", n_model_backbone=0)
    assert report.fraction == 0.0 and "none" in report.summary()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # MLflow model URIs: tests/unit/test_tracking.py and tests/integration (a real store)
    with pytest.raises(ValueError, match="target"):
        load_pretrained(model, "none", "detector")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("target", ["classify", "segment"])
def test_freeze_encoder_and_param_groups(target: str) -> None:
    model = classifier() if target == "classify" else segmenter()
    prefix = "encoder." if target == "segment" else ""
    freeze_encoder(model, target, frozen=True)  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        in_backbone = name.startswith(prefix) and not name.startswith("fc.")
        assert p.requires_grad is not in_backbone, name
    freeze_encoder(model, target, frozen=False)  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())

    groups = param_groups(model, target, lr=1e-3, head_lr_mult=10.0)  # type: ignore[arg-type]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups[0]["params"]) > 0 and len(groups[1]["params"]) > 0
    torch.optim.AdamW(groups)  # accepted as given


def test_the_old_target_names_still_work_with_a_warning(tmp_path: Path) -> None:
    """Before medimg 0.2 the targets were "classifier" and "segmenter"."""
    model = classifier()
    with pytest.warns(DeprecationWarning, match="'classifier' is deprecated; use .*'classify'"):
        groups = param_groups(model, "classifier", 1e-3, 10.0)  # type: ignore[arg-type]
    now = param_groups(model, "classify", 1e-3, 10.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        (g["name"], g["lr"], len(g["params"])) for g in now
    ]
    with pytest.warns(DeprecationWarning, match="'segmenter'"):
        assert list(map_keys({"conv1.weight": torch.zeros(1)}, "torchvision", "segmenter")) == [
            "encoder.conv1.weight"
        ]
