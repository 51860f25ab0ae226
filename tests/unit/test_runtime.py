"""The process a run happens in: device choice, seeds."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medimg.errors import ConfigError
from medimg.runtime import distributed, resolve_device, seed_everything
from medimg.versions import PACKAGES, environment_versions
from tests.helpers import Processed


def test_device_auto_and_a_missing_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` takes the CPU where no GPU is visible; ``cuda`` then fails saying so. (A
    missing GPU is simulated: on a GPU machine it cannot be caused for real.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device is visible; use auto or cpu"):
        resolve_device("cuda")


def test_seed_everything_repeats_python_numpy_and_torch() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_a_single_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed() == (0, 1)


TRAIN_STEPS = """
import hashlib, sys
from medimg import runtime
if sys.argv[1] == "pin":
    runtime.pin_reproducible(2)
import torch
from medimg.config import TaskTrainParams
from medimg.models.build import build_model
torch.manual_seed(0)
model = build_model("classify", TaskTrainParams(arch="resnet10"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
x, y = torch.randn(4, 1, 32, 32, 32), torch.tensor([0.0, 1.0, 0.0, 1.0])
for _ in range(3):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(hashlib.sha256(weights).hexdigest(), torch.backends.cpu.get_cpu_capability())
"""
# two machines as the libraries see them: the instruction set they may use, the cores
MACHINES = {
    "no vector kernels, 1 thread": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
    "AVX2 kernels, 2 threads": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"},
}


def _as_machine(script: str, machine: dict[str, str], *args: str) -> tuple[str, str]:
    """Run ``script`` in a process whose libraries see ``machine``; it prints a digest of
    its numbers and the CPU capability PyTorch ran, the two returned."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env.update(machine)
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    digest, capability = out.stdout.split()[-2:]
    return digest, capability


def test_pinned_runs_agree_across_machines_and_unpinned_ones_do_not() -> None:
    """Three training steps in two processes that differ as two machines do (ISA level
    and thread count): bit-identical weights in reproducible mode, different without."""
    free = {name: _as_machine(TRAIN_STEPS, m, "free") for name, m in MACHINES.items()}
    pinned = {name: _as_machine(TRAIN_STEPS, m, "pin") for name, m in MACHINES.items()}
    assert [c for _, c in free.values()] == ["DEFAULT", "AVX2"]  # the machines differ
    assert len({d for d, _ in free.values()}) == 2  # and so do their numbers, unpinned
    assert [c for _, c in pinned.values()] == ["AVX2", "AVX2"]
    assert len({d for d, _ in pinned.values()}) == 1  # pinned: the same bits


MKL_PRODUCT = """
import sys
from medimg import runtime
if sys.argv[1] == "pin":
    runtime.pin_reproducible(2)
import torch
torch.nn.functional.linear(torch.randn(4, 128), torch.randn(3, 128))  # MKL's SGEMM
"""


def _mkl_branches(mode: str, extra: dict[str, str]) -> list[str]:
    """The conditional-reproducibility branch of each SGEMM the script's Linear layer ran,
    as MKL itself reports it (``MKL_VERBOSE``)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    env.update({"MKL_VERBOSE": "1", **extra})
    out = subprocess.run(
        [sys.executable, "-c", MKL_PRODUCT, mode],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return re.findall(r"SGEMM\(.*? CNR:(\w+)", out.stdout)


def test_pinned_mkl_runs_the_branch_it_keeps_on_intel_and_amd_alike() -> None:
    """MKL keeps an ISA branch such as ``MKL_CBWR=AVX2`` on Intel CPUs only and silently
    runs its AUTO branch on others (Intel's developer guide, "Specifying code branches"):
    a classifier trained with that pin on a 2-core AMD EPYC differed from the reference
    from its first epoch. Pinned, every matrix product runs the COMPATIBLE branch, the
    one MKL supports on every vendor's x86-64 CPU, whatever the process was given."""
    assert _mkl_branches("free", {}) == ["OFF"]  # unpinned: no reproducibility branch
    assert _mkl_branches("pin", {}) == ["COMPATIBLE"]
    assert _mkl_branches("pin", {"MKL_CBWR": "AVX2"}) == ["COMPATIBLE"]  # replaced


MASK_RESAMPLING = """
import hashlib, sys
from pathlib import Path
import nibabel as nib, numpy as np
from medimg import stages
from medimg.config import Params, PreprocessParams
if sys.argv[1] == "pin":
    stages.pin_runtime(Params())  # what medimg preprocess and medimg predict call first
import torch
from medimg.transforms import preprocessing_transforms
rng, folder, digests = np.random.default_rng(0), Path(sys.argv[2]), []
for deg in (0.0, 12.0, 25.0):  # axial and oblique, 5.3 x 5.3 x 4 mm to the 6 mm grid
    t = np.deg2rad(deg)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine[:3, :3] *= (5.3, 5.3, 4.0)
    affine[:3, 3] = (-100.3, -90.1, 20.0)
    image = rng.uniform(0, 200, (64, 64, 40)).astype(np.int16)
    mask = (rng.random((64, 64, 40)) > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, affine), folder / f"image{deg}.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / f"mask{deg}.nii.gz")
    item = {"image": str(folder / f"image{deg}.nii.gz"), "label": str(folder / f"mask{deg}.nii.gz")}
    out = preprocessing_transforms("CT", PreprocessParams(), True)(item)
    digests.append(hashlib.sha256(np.asarray(out["label"]).tobytes()).hexdigest()[:16])
print("-".join(digests), torch.backends.cpu.get_cpu_capability())
"""


def _resample_masks(mode: str, machine: dict[str, str], folder: Path) -> tuple[str, str]:
    folder.mkdir()
    return _as_machine(MASK_RESAMPLING, machine, mode, str(folder))


def test_mask_resampling_depends_on_the_kernels_unless_pinned(tmp_path: Path) -> None:
    """Preprocessing, not only training, needs the pinning: a mask resampled with nearest
    neighbour (medimg's chain, 5.3 x 5.3 x 4 mm to 6 mm) rounds voxels whose source
    coordinate lands on a half voxel one way or the other with PyTorch's scalar kernels
    and its AVX2 ones. Pinned, as ``medimg preprocess`` and ``medimg predict`` are in
    reproducible mode, both machines give the same masks."""
    free = {n: _resample_masks("free", m, tmp_path / f"free {n}") for n, m in MACHINES.items()}
    pinned = {n: _resample_masks("pin", m, tmp_path / f"pin {n}") for n, m in MACHINES.items()}
    assert [c for _, c in free.values()] == ["DEFAULT", "AVX2"]
    assert len({d for d, _ in free.values()}) == 2
    assert [c for _, c in pinned.values()] == ["AVX2", "AVX2"]
    assert len({d for d, _ in pinned.values()}) == 1


def test_preprocess_records_the_pinned_runtime(tiny_processed: Processed, tmp_path: Path) -> None:
    """``medimg preprocess`` started as on a machine without vector kernels still computes
    with AVX2 ones in reproducible mode, and its qc.json says so."""
    import os

    import yaml

    params = tiny_processed.params.model_dump(mode="json")
    params["data"]["processed"] = str(tmp_path / "processed")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    medimg = Path(sys.executable).parent / "medimg"
    command = [str(medimg), "preprocess", "--params", str(tmp_path / "params.yaml")]
    subprocess.run(command, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    qc = json.loads((tmp_path / "processed" / "qc.json").read_text())
    assert qc["runtime"] == {"reproducible": "true", "cpu_capability": "AVX2", "threads": "2"}
    assert tiny_processed.qc["runtime"]["reproducible"] == "true"


def test_deterministic_mode_is_set_without_loading_inductor() -> None:
    """The eager flag as torch.use_deterministic_algorithms(True, warn_only=True) sets it,
    without the 4 s import of TorchInductor and TorchDynamo that function costs."""
    code = (
        "import sys, torch; from medimg import runtime; runtime.deterministic_algorithms(); "
        "print(torch.are_deterministic_algorithms_enabled(), "
        "torch.is_deterministic_algorithms_warn_only_enabled(), "
        "'torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False", "False"], out.stdout
    # with Inductor loaded, torch's own function sets its flag too
    code = (
        "import torch, torch._inductor.config as c; from medimg import runtime; "
        "runtime.deterministic_algorithms(); "
        "print(torch.are_deterministic_algorithms_enabled(), c.deterministic)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout


def test_the_environment_record_says_what_was_pinned() -> None:
    code = "import json; from medimg import runtime; print(json.dumps(runtime.pin_reproducible(3)))"
    env = {"PATH": "/usr/bin:/bin", "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    record = json.loads(out.stdout)
    assert record["reproducible"] == "true" and record["deterministic"] == "true"
    assert (record["cpu_capability"], record["threads"]) == ("AVX2", "3")
    assert (record["aten_cpu_capability"], record["onednn_max_cpu_isa"]) == ("avx2", "AVX2")
    assert record["version.torch"].startswith("2.")
    # and the installed versions with the lock they came from, as this environment has them
    versions = {k: v for k, v in record.items() if k.startswith(("version.", "lock."))}
    assert versions == environment_versions() and len(versions) == len(PACKAGES) + 3
