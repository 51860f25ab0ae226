"""The process a run trains or predicts in: device, seeds, memory allocator, DDP, and what
makes CPU results the same on every machine.

Process-wide settings, made at the start of a run and nowhere else.
"""

from __future__ import annotations

import os
import platform
import random
import sys

import numpy as np
import torch

from medimg.errors import ConfigError
from medimg.versions import environment_versions


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU.

    Raises:
        ConfigError: ``cuda`` asked for and none is visible.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 512 << 20  # freed heap memory kept for reuse before it goes to the OS


def tune_allocator() -> bool:
    """Let glibc's malloc reuse freed memory across training steps; True when it did.

    Each step frees and reallocates the same activations and gradients. By default glibc
    serves blocks above 128 KiB with fresh ``mmap`` pages and returns freed memory to the
    OS, so every step pays page faults on zeroed pages again (docs/performance.md has the
    measurement). Results are unchanged: only where tensors live moves. Process-wide; on
    other C libraries, or with ``MEDIMG_TUNE_MALLOC=0``, nothing is done.
    """
    if os.environ.get("MEDIMG_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD)
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


# Reproducible mode (train.reproducible). CPU results depend on the machine through the
# vector instructions each library picks at run time and through the number of threads
# a reduction is split over. Pinned here, to what nearly every x86-64 CPU since 2013 has:
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: convolutions, pooling, batch norm
    # MKL (matrix products: the classifier's head) honours an ISA branch such as AVX2 on
    # Intel CPUs only and runs its AUTO branch elsewhere, so AMD and Intel differed; its
    # COMPATIBLE branch (SSE2 without approximate reciprocals) is the one it keeps on both
    "MKL_CBWR": "COMPATIBLE",
}
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS on GPUs


def pin_reproducible(threads: int) -> dict[str, str]:
    """Pin what makes results depend on the machine, before the process's first tensor
    operation: the CPU instruction sets (:data:`PINNED_ENV`), the intra-op thread count,
    and deterministic algorithms (cuDNN and cuBLAS included). Returns what the run really
    had (:func:`environment`): each library reads its setting once, at its first use, so
    a process that already computed keeps what it started with, and the record says so.

    Exact equality holds across x86-64 CPUs with AVX2 (docs/training.md); GPUs give no
    bitwise guarantee across models and drivers, only run-to-run determinism on one.
    """
    os.environ.update(PINNED_ENV)
    os.environ.update(DETERMINISTIC_ENV)
    torch.set_num_threads(threads)
    deterministic_algorithms()
    torch.backends.cudnn.benchmark = False
    return environment(reproducible=True)


def deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without its start-up
    cost. Besides the eager flag, that function sets TorchInductor's, importing
    ``torch._inductor`` and TorchDynamo for it: 4 s of every stage's start on two AVX2
    cores (PyTorch 2.13). medimg never compiles, so the eager flag alone is set, unless
    Inductor is loaded already (then torch's own function sets both)."""
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_flag(True, warn_only=True)


def environment(reproducible: bool) -> dict[str, str]:
    """What decides a run's numbers besides its inputs: the pinning, the instruction set
    PyTorch runs, the thread count, the machine, the installed versions and the lock they
    came from (:func:`medimg.versions.environment_versions`)."""
    record = {
        "reproducible": str(reproducible).lower(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(torch.get_num_threads()),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "machine": f"{platform.machine()} {_cpu_model()}".strip(),
    }
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        record[name.lower()] = os.environ.get(name, "")
    return record | environment_versions()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
