"""Blending datasets by weight, and train/validation splits by document ranges.

The blend uses Megatron's greedy assignment: sample ``t`` goes to the dataset whose count lags its target
``weight * t`` the most, so every prefix of the blend holds each dataset in its exact proportion (off by less
than one sample), deterministically, without random draws.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
from typing import Sequence

import numpy as np

# Megatron builds each dataset a little larger than its share, so rounding never runs one dry.
SIZE_SURPLUS = 0.005


def parse_split(split: str | Sequence[float]) -> list[float]:
    """``"98,2"`` or ``"949,50,1"`` -> normalised weights for (train, valid[, test])."""
    parts = [float(p) for p in split.replace("/", ",").split(",")] if isinstance(split, str) else list(split)
    if not parts or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split {split!r}: expected comma-separated non-negative weights, e.g. '98,2'")
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Consecutive, disjoint ``[begin, end)`` document ranges covering all documents, one per split weight
    (Megatron's rounding, so both stacks cut a shard at the same documents)."""
    bounds = np.cumsum([0.0] + parse_split(split))
    edges = [int(round(b * num_documents)) for b in bounds]
    edges[-1] = num_documents
    return list(zip(edges[:-1], edges[1:]))


def _megatron_helpers():
    """Megatron's compiled index helpers, loaded straight from the wheel's ``.so`` (importing
    ``megatron.core`` would cost ~8 s); ``None`` when megatron-core is not installed."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    found = glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
    if not found:
        return None
    loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("helpers_cpp", found[0],
                                                                                    loader=loader))
    loader.exec_module(module)
    return module


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of sample ``t``, its index inside that dataset) for ``t < size``, by greedy error minimisation."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any():
        raise ValueError(f"blend weights must be positive, got {list(weights)}")
    w = w / w.sum()
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers = _megatron_helpers()
    if helpers is not None:
        helpers.build_blending_indices(dataset_index, sample_index, w, len(w), size, False)
        return dataset_index, sample_index
    counts = np.zeros(len(w), dtype=np.int64)
    for t in range(size):  # the same loop as Megatron's helpers.cpp, in Python (slow, only without megatron)
        d = int(np.argmax(w * max(t, 1) - counts))
        dataset_index[t], sample_index[t] = d, counts[d]
        counts[d] += 1
    return dataset_index, sample_index


def samples_per_dataset(weights: Sequence[float], size: int) -> list[int]:
    """How many samples to build in each dataset so a blend of ``size`` never runs out."""
    total = float(sum(weights))
    return [int(np.ceil(np.ceil(size * w / total) * (1 + SIZE_SURPLUS))) for w in weights]


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in the proportions ``weights``; ``ds[i]`` is a sample dict."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.size = list(datasets), size
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        used = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, used)):
            if n > len(ds):
                name = getattr(getattr(ds, "indexed", None), "prefix", f"#{d}")
                raise ValueError(f"blend needs {n} samples from dataset {name}, which has only {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
