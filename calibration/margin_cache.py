"""Input margins computed in fixed chunks that are cached on disk, which gives two things at once:
a killed run resumes from its finished chunks, and `--shard i --num-shards n` lets a Kubernetes
Indexed Job spread the chunks over pods (shard i takes chunks i, i + n, i + 2n, …); the run that
finds every chunk present merges them.

A chunk file is written to a temporary name and renamed, so a half-written chunk never exists.
The cache folder's name hashes everything that determines the margins (weights, data indices,
norm, attacks and budgets; for sampled traffic, which has no stable indices, the points' bytes),
so a changed setting can never reuse stale results. It also holds CACHE_FORMAT: a chunk of an
older format (format 1 kept no adversarial inputs) lies in another folder and is recomputed,
never misread.

Each chunk keeps, besides the radii, the closest confirmed adversarial input per point (float32:
3.1 MB for the pseudo-margin's 1,000 Fashion-MNIST training points, 1.6 MB for a 500-point
subset), from which the pseudo-margin learns points on the attack paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from marginwatch.calibration.attacks import ATTACKS
from marginwatch.calibration.margins import MarginResult, input_margins
from marginwatch.calibration.progress import phase as progress_phase

CHUNK_SIZE = 50
CACHE_FORMAT = 2
"""Bumped whenever what a chunk holds changes (2: `adv_inputs`)."""


@dataclass(frozen=True)
class AttackPlan:
    """Which attacks run, with what budget, in which norm."""

    names: tuple[str, ...]
    steps: tuple[int, ...]
    norm: float

    def functions(self) -> list[functools.partial[torch.Tensor]]:
        return [
            functools.partial(ATTACKS[name], steps=steps)
            for name, steps in zip(self.names, self.steps, strict=True)
        ]


def state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def content_sha256(*arrays: np.ndarray) -> str:
    """What names points that have no stable index in a dataset (sampled traffic): their bytes,
    shapes and dtypes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def cache_key(model_hash: str, data_id: str, indices: np.ndarray, plan: AttackPlan) -> str:
    description = {
        "model": model_hash,
        "data": data_id,
        "indices": hashlib.sha256(np.ascontiguousarray(indices).tobytes()).hexdigest(),
        "attacks": list(plan.names),
        "steps": list(plan.steps),
        "norm": "inf" if math.isinf(plan.norm) else plan.norm,
        "chunk": CHUNK_SIZE,
        "format": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def shard_chunks(size: int, shard: int, num_shards: int) -> list[int]:
    return list(range(shard, chunk_count(size), num_shards))


def missing_chunks(folder: Path, size: int) -> list[int]:
    return [i for i in range(chunk_count(size)) if not (folder / f"chunk-{i:05d}.npz").exists()]


def _save_chunk(folder: Path, index: int, result: MarginResult, plan: AttackPlan) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"chunk-{index:05d}.npz"
    temporary = folder / f".chunk-{index:05d}.{os.getpid()}.npz"
    # per_attack follows the plan's order; store it under the plan's names
    radii = result.per_attack.values()
    arrays = {f"attack:{name}": r for name, r in zip(plan.names, radii, strict=True)}
    arrays |= {"radius": result.radius, "censored_at": result.censored_at}
    if result.adv_inputs is not None:
        arrays["adv_inputs"] = result.adv_inputs
    np.savez(temporary, **arrays)  # type: ignore[arg-type]
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    temporary.replace(final)


def chunk_points(size: int, index: int) -> int:
    """How many of `size` points chunk `index` holds (the last one may hold fewer)."""
    return max(0, min(CHUNK_SIZE, size - index * CHUNK_SIZE))


def compute_chunks(
    folder: Path,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    plan: AttackPlan,
    chunks: Sequence[int],
    batch_size: int,
    progress: bool,
    phase: str = "input margins",
) -> None:
    """Attack the given chunks that are not cached yet, saving each as soon as it is done.

    With `progress`, one bar named `phase` counts the points of all these chunks through every
    attack (cached chunks count as done from the start), not one bar per chunk."""
    cached = {index for index in chunks if (folder / f"chunk-{index:05d}.npz").exists()}
    total = sum(chunk_points(len(inputs), index) for index in chunks)
    done = sum(chunk_points(len(inputs), index) for index in cached)
    with progress_phase(phase, total, enabled=progress, done=done) as advance:
        for index in chunks:
            if index in cached:
                continue
            part = slice(index * CHUNK_SIZE, (index + 1) * CHUNK_SIZE)
            result = input_margins(
                model,
                inputs[part],
                labels[part],
                norm=plan.norm,
                attacks=plan.functions(),
                batch_size=batch_size,
                progress=False,
                advance=advance,
            )
            _save_chunk(folder, index, result, plan)


def load_chunks(folder: Path, size: int, plan: AttackPlan) -> MarginResult:
    """Merge every chunk into one result; raises FileNotFoundError naming the missing ones."""
    missing = missing_chunks(folder, size)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {chunk_count(size)} chunks missing: {missing}")
    parts = []
    for index in range(chunk_count(size)):
        with np.load(folder / f"chunk-{index:05d}.npz") as archive:
            parts.append({key: archive[key] for key in archive.files})
    per_attack = {name: np.concatenate([p[f"attack:{name}"] for p in parts]) for name in plan.names}
    margins = np.concatenate([p["radius"] for p in parts])
    return MarginResult(
        radius=margins,
        success=np.isfinite(margins),
        per_attack=per_attack,
        censored_at=np.concatenate([p["censored_at"] for p in parts]),
        norm=plan.norm,
        adv_inputs=np.concatenate([p["adv_inputs"] for p in parts]),
    )
