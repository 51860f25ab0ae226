"""2D models on the axial slices of the 3D processed volumes: they train, repeat exactly,
predict one probability per volume or a 3D probability map, and take 2D (torchvision
layout) weights without inflation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import resnet18

from medimg.config import AugmentParams, Params, TaskTrainParams, TrainParams
from medimg.errors import ConfigError
from medimg.models.build import build_model, model_spatial_dims
from medimg.models.pretrained import load_pretrained
from medimg.models.resnet import SliceResNet, build_classifier, top_k_mean
from medimg.models.unet import build_segmenter
from medimg.tasks import CLASSIFY, SEGMENT
from tests.helpers import Processed

CPU = torch.device("cpu")
N_TV_BACKBONE = 100  # 2D ResNet-18, torchvision layout: all but fc.* and num_batches_tracked


def _params(p: Processed, out: Path, task: str, epochs: int, **cfg: object) -> Params:
    table = pd.read_parquet(p.processed / "manifest.parquet")
    folds = sorted(s for s in table["split"].unique() if s != "test")
    fold = next(  # a validation fold whose both sides hold both labels
        int(f)
        for f in folds
        if table[table["split"] == f]["label"].nunique() == 2
        and table[~table["split"].isin(["test", f])]["label"].nunique() == 2
    )
    data = p.params.data.model_copy(update={"models": out / "models", "metrics": out / "metrics"})
    task_cfg = TaskTrainParams(spatial_dims=2, epochs=epochs, patience=50, **cfg)  # type: ignore[arg-type]
    train = TrainParams(fold=fold, **{task: task_cfg})  # type: ignore[arg-type]
    return p.params.model_copy(update={"data": data, "train": train})


def _volumes(p: Processed, n: int = 2) -> torch.Tensor:
    import nibabel as nib

    table = pd.read_parquet(p.processed / "manifest.parquet")
    arrays = [
        np.asarray(nib.load(p.processed / name).dataobj, dtype=np.float32)
        for name in table["image"][:n]
    ]
    return torch.as_tensor(np.stack(arrays))[:, None]  # (N, 1, R, A, S)


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


@pytest.mark.slow
def test_2d_classifier_learns_repeats_and_predicts_per_volume(
    tiny_processed: Processed, tmp_path: Path
) -> None:
    from medimg import stages
    from medimg.evaluate import load_model

    kw = {"arch": "resnet10", "batch_size": 4, "lr": 3e-3}
    a = stages.train(_params(tiny_processed, tmp_path / "a", "classify", 2, **kw), "classify")
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]  # the loss falls
    b = stages.train(_params(tiny_processed, tmp_path / "b", "classify", 2, **kw), "classify")
    assert _strip(a.history) == _strip(b.history)  # two CPU runs repeat exactly

    params = _params(tiny_processed, tmp_path / "a", "classify", 2, **kw)
    model = load_model("classify", params, tmp_path / "a" / "models" / "classify" / "model.pt")
    assert isinstance(model, SliceResNet) and model_spatial_dims(model) == 2
    x = _volumes(tiny_processed)
    prob = CLASSIFY.predict(model, x, params.augment.patch_size, CPU)
    assert prob.shape == (2,) and ((prob >= 0) & (prob <= 1)).all()
    card = (tmp_path / "a" / "models" / "classify" / "model_card.md").read_text()
    assert "2D" in card and "axial slices" in card


@pytest.mark.slow
def test_2d_segmenter_trains_on_slices_and_predicts_a_3d_map(
    tiny_processed: Processed, tmp_path: Path
) -> None:
    from medimg import stages
    from medimg.evaluate import load_model

    params = _params(tiny_processed, tmp_path, "segment", 2, arch="resnet10", batch_size=2)
    result = stages.train(params, "segment")
    assert result.epochs_run == 2
    assert all(np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in result.history)
    model = load_model("segment", params, tmp_path / "models" / "segment" / "model.pt")
    assert model_spatial_dims(model) == 2
    x = _volumes(tiny_processed)
    prob = SEGMENT.predict(model, x, params.augment.patch_size, CPU)
    assert prob.shape == x[:, 0].shape  # (N, R, A, S), as in 3D
    assert ((prob >= 0) & (prob <= 1)).all()


@pytest.mark.slow
def test_2d_segmentation_samples_lesion_centred_slices(tiny_processed: Processed) -> None:
    from medimg.transforms import training_transforms

    table = pd.read_parquet(tiny_processed.processed / "manifest.parquet")
    row = table[table["mask"].notna() & (table["label"] == 1)].iloc[0]
    item = {
        "image": str(tiny_processed.processed / row["image"]),
        "label": str(tiny_processed.processed / row["mask"]),
    }
    aug = AugmentParams(patches_per_volume=3, positive_ratio=1e6, affine_prob=0.0)
    chain = training_transforms(aug, train=True, with_label=True, patches=True, spatial_dims=2)
    chain.set_random_state(seed=0)
    patches = chain(item)
    assert len(patches) == 3
    for patch in patches:
        assert patch["image"].shape == patch["label"].shape == (1, 32, 32)  # (C, R, A)
        assert patch["label"].sum() > 0  # centred on a lesion voxel
    whole = training_transforms(aug, train=False, spatial_dims=2)(item)
    assert whole["image"].shape == (1, *tiny_processed.params.preprocess.spatial_size)


def _torchvision_file(tmp_path: Path) -> Path:
    """A state dict with torchvision's ResNet-18 layout (projection shortcuts without bias,
    a 1000-class fc), random weights and non-default BatchNorm statistics."""
    torch.manual_seed(0)
    src = resnet18(
        spatial_dims=2,
        n_input_channels=3,
        num_classes=1000,
        shortcut_type="B",
        bias_downsample=False,
    )
    for mod in src.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert mod.running_mean is not None
            mod.running_mean.normal_()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(src.state_dict(), path)
    return path


@pytest.mark.slow
def test_torchvision_weights_load_into_2d_models_without_inflation(tmp_path: Path) -> None:
    path = _torchvision_file(tmp_path)
    source = torch.load(path, weights_only=True)
    assert len(source) == 122  # torchvision's resnet18().state_dict()

    cfg = TaskTrainParams(arch="resnet18", spatial_dims=2)
    model = build_classifier(cfg)
    report = load_pretrained(model, path, "classify", min_fraction=1.0)
    assert report.source_format == "torchvision"
    assert len(report.loaded) == report.n_model_backbone == N_TV_BACKBONE
    assert report.missing == [] and report.skipped_shape == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]  # the ImageNet head only
    own = model.state_dict()
    assert own["conv1.weight"].shape == (64, 1, 7, 7)  # 2D, not inflated
    torch.testing.assert_close(own["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer2.0.downsample.0.weight", "layer4.1.bn2.running_mean"):
        torch.testing.assert_close(own[key], source[key])
    assert "100/100 backbone tensors (100.0%)" in report.summary()

    seg = build_segmenter(cfg)
    seg_report = load_pretrained(seg, path, "segment")
    assert len(seg_report.loaded) == seg_report.n_model_backbone == 85  # type-A encoder
    assert seg_report.missing == [] and seg_report.skipped_shape == []
    unused = {k for k in seg_report.unexpected if not k.startswith("fc.")}
    assert len(unused) == 15 and all(".downsample." in k for k in unused)
    assert seg.state_dict()["encoder.conv1.weight"].shape == (64, 1, 7, 7)


@pytest.mark.slow
def test_3d_weights_into_a_2d_model_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "resnet_18.pth"
    src = resnet18(spatial_dims=3, n_input_channels=1, shortcut_type="A")
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = build_classifier(TaskTrainParams(arch="resnet18", spatial_dims=2))
    with pytest.raises(ConfigError, match=r"holds 3D weights .*is 2D .*spatial_dims: 2"):
        load_pretrained(model, path, "classify")


def test_top_k_mean_pools_slice_logits_per_volume() -> None:
    logits = torch.tensor([[0.0, 4.0, 2.0, -1.0], [1.0, 1.0, 1.0, 9.0]])
    torch.testing.assert_close(top_k_mean(logits, 0.5), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(top_k_mean(logits, 0.01), torch.tensor([4.0, 9.0]))  # k >= 1
    model = build_model("classify", TaskTrainParams(arch="resnet10", spatial_dims=2)).eval()
    volume = torch.rand(2, 1, 32, 32, 5)  # (B, 1, R, A, S)
    with torch.no_grad():
        per_slice = model(volume.permute(0, 4, 1, 2, 3).reshape(10, 1, 32, 32)).view(2, 5)
        torch.testing.assert_close(model(volume)[:, 0], top_k_mean(per_slice))


def test_2d_classifier_augmentation_keeps_slices_apart(tmp_path: Path) -> None:
    """In-plane augmentation of a bag: each axial slice is moved on its own, never mixed
    with its neighbours (a 3D rotation would blend them)."""
    import nibabel as nib

    from medimg.transforms import training_transforms

    volume = np.zeros((32, 32, 6), dtype=np.float32)  # (R, A, S)
    volume[8:24, 8:24, :] = np.arange(1, 7, dtype=np.float32)  # slice s holds the value s+1
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    aug = AugmentParams(affine_prob=1.0, rotate_deg=30.0, scale=0.2, intensity_prob=0.0)
    chain = training_transforms(aug, train=True, with_label=False, spatial_dims=2)
    chain.set_random_state(seed=3)
    out = torch.as_tensor(chain({"image": str(path)})["image"])[0]  # (R, A, S)
    assert out.shape == (32, 32, 6)
    for s in range(6):
        values = out[..., s][out[..., s] > 1e-3]
        assert len(values) > 0 and torch.all(values <= s + 1 + 1e-4), s  # no neighbour's value
        assert torch.isclose(values.max(), torch.tensor(s + 1.0)), s
