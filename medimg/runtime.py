"""The process a run trains or predicts in: device, seeds, memory allocator, DDP.

Process-wide settings, made at the start of a run and nowhere else.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from medimg.errors import ConfigError


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
