"""The calibration job: attack a subset, measure margin consistency, choose the score, fit λ and
the robust-accuracy estimators, export and verify the serving graph, publish a version.

Everything is written into a staging folder first, and `store.publish` moves CURRENT only when
the version is complete and verified, so a failure at any point leaves the serving artifact
untouched. Attacks are cached chunk by chunk (`margin_cache`), so a killed run resumes.
"""

from __future__ import annotations

import functools
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from marginwatch.artifact import store
from marginwatch.artifact.hashing import file_sha256
from marginwatch.artifact.schema import (
    ONNX_FILE,
    REPORT_FILE,
    CalibrationRecord,
    PseudoMarginFacts,
)
from marginwatch.calibration import margin_cache, score_choice
from marginwatch.calibration.config import CalibrationConfig, CalibrationError, ConfigError
from marginwatch.calibration.inputs import Inputs, Outputs, forward_all, subset_indices
from marginwatch.calibration.margins import MarginResult
from marginwatch.calibration.preflight import PreflightReport, run_preflight
from marginwatch.calibration.pseudo_margin import path_training_points
from marginwatch.calibration.record import (
    attack_budgets,
    build_record,
    data_source,
    report_data,
    with_refit_facts,
)
from marginwatch.calibration.report import render_report
from marginwatch.calibration.scores import ServingGraph, export_serving_graph
from marginwatch.models.architectures import SplitClassifier

__all__ = ["CalibrationError", "RunResult", "TrafficPoints", "forward_all", "run", "subset_indices"]


@dataclass(frozen=True)
class TrafficPoints:
    """Attacked points of served traffic that `--refit` adds to the label-free fits: λ's, and
    the pseudo-margin's training set. The estimators stay the labelled subset's."""

    images: np.ndarray
    outputs: Outputs  # the model's, on `images`: their labels are the served labels
    margins: MarginResult


def margins_for(
    config: CalibrationConfig,
    model: SplitClassifier,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    data_id: str,
    indices: np.ndarray,
    phase: str = "input margins",
) -> tuple[Path, int]:
    """The cache folder of the margins of `images` (the points `indices` of `data_id`, which
    name them in the cache key); attacks the chunks that are missing, or this shard's, under one
    progress bar named `phase`."""
    key = margin_cache.cache_key(
        margin_cache.state_dict_sha256(model), data_id, indices, config.attack_plan
    )
    folder = config.store / config.resolved_model_name / ".margins" / key
    size = len(indices)
    if config.shard is not None:
        chunks = margin_cache.shard_chunks(size, config.shard, config.num_shards)
    elif config.merge_only:
        chunks = []
    else:
        chunks = margin_cache.missing_chunks(folder, size)
    device = config.torch_device
    margin_cache.compute_chunks(
        folder,
        model,
        torch.from_numpy(images).to(device),
        torch.from_numpy(labels).to(device),
        plan=config.attack_plan,
        chunks=chunks,
        batch_size=config.attack_batch_size,
        progress=config.progress,
        phase=phase,
    )
    return folder, size


def load_margins(config: CalibrationConfig, folder: Path, size: int) -> MarginResult:
    try:
        return margin_cache.load_chunks(folder, size, config.attack_plan)
    except FileNotFoundError as error:
        raise ConfigError(f"cannot merge: {error}; run the missing shards first") from error


def pseudo_margin_training(
    config: CalibrationConfig,
    inputs: Inputs,
    subset: np.ndarray,
    traffic: TrafficPoints | None = None,
) -> score_choice.TrainingSet | None:
    """Features (or logits) and margins of attacked training points, disjoint from the subset;
    with `--pseudo-paths`, points on their attack paths after them; `traffic`'s last (`--refit`:
    label-free targets, like the others). In shard mode only attacks this shard's part of the
    training points and returns None."""
    if inputs.train_data is not None:
        source, tag, pool = inputs.train_data, "train", np.arange(len(inputs.train_data))
    else:
        source, tag = inputs.data, config.split
        pool = np.setdiff1d(np.arange(len(inputs.data)), subset)
    size = min(config.pseudo_train_size, len(pool))
    chosen = pool[subset_indices(size, len(pool), config.seed + 1)]
    images = source.subset(chosen).float_images  # not the whole split: it may be 60,000 images
    outputs = forward_all(inputs.model, images, config.torch_device)
    folder, count = margins_for(
        config,
        inputs.model,
        images=images,
        labels=outputs.labels,
        data_id=f"{config.dataset}:{tag}:pseudo",
        indices=chosen,
        phase="training-point margins",
    )
    if config.shard is not None:
        return None
    margins = load_margins(config, folder, count)
    features, targets = [outputs.score_inputs(config.pseudo_input)], [margins.finite_radius]
    paths = 0
    if config.pseudo_paths and margins.adv_inputs is not None:
        points, path_targets = path_training_points(images, margins.adv_inputs, margins.radius)
        path_outputs = forward_all(inputs.model, points, config.torch_device)
        features.append(path_outputs.score_inputs(config.pseudo_input))
        targets.append(path_targets)
        paths = len(points)
    if traffic is not None:
        features.append(traffic.outputs.score_inputs(config.pseudo_input))
        targets.append(traffic.margins.finite_radius)
    return score_choice.TrainingSet(np.concatenate(features), np.concatenate(targets), paths)


def choose_score(
    config: CalibrationConfig,
    inputs: Inputs,
    subset_indices_: np.ndarray,
    margins: MarginResult,
    *,
    images: np.ndarray,
    everything: Outputs,
    traffic: TrafficPoints | None = None,
) -> tuple[ServingGraph, PseudoMarginFacts | None]:
    """The logit margin, or the pseudo-margin (guarded by the logit margin) fitted on attacked
    training points (`traffic`'s among them) where it measures better on the held-out subset:
    `score_choice` decides and records why. `images` are the split's, as floats, and
    `everything` the model's outputs on them."""
    if config.pseudo_margin == "never":
        return ServingGraph(inputs.model), None
    if not score_choice.can_learn_pseudo_margin(config, inputs):
        # small data: attack none, say why in the record
        facts = score_choice.without_pseudo_margin(
            config,
            train_points=score_choice.pseudo_train_points(config, inputs),
            labels=inputs.data.labels,
            subset=subset_indices_,
            margins=margins,
            everything=everything,
        )
        return ServingGraph(inputs.model), facts
    training = pseudo_margin_training(config, inputs, subset_indices_, traffic)
    if training is None:
        raise CalibrationError("pseudo-margin training points are not attacked")
    return score_choice.choose(
        config,
        inputs.model,
        training=training,
        images=images,
        labels=inputs.data.labels,
        subset=subset_indices_,
        margins=margins,
        everything=everything,
    )


@torch.no_grad()
def graph_scores(graph: ServingGraph, images: np.ndarray, device: torch.device) -> np.ndarray:
    graph = graph.to(device).eval()
    parts = [
        graph(torch.from_numpy(images[start : start + 500]).to(device))[1].cpu().numpy()
        for start in range(0, len(images), 500)
    ]
    return np.concatenate(parts)


def software_versions() -> dict[str, str]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class RunResult:
    """What a run did: a published version, only attacked its shard, or only the preflight."""

    record: CalibrationRecord | None
    version_dir: Path | None
    preflight: PreflightReport
    shard_done: int | None = None


def run(
    config: CalibrationConfig,
    on_preflight: Callable[[PreflightReport], None] | None = None,
    traffic: TrafficPoints | None = None,
) -> RunResult:
    """The whole job. Raises `ConfigError` (bad input), `store.StoreBusy`, `CalibrationError`.
    `on_preflight` hears the preflight's report before the attacks start; `traffic` (`--refit`)
    joins the subset in the label-free fits."""
    started = time.monotonic()
    inputs, preflight = run_preflight(config)
    if on_preflight is not None and not config.preflight_only:
        on_preflight(preflight)
    if config.preflight_only:
        return RunResult(None, None, preflight)
    images = inputs.data.float_images
    everything = forward_all(inputs.model, images, config.torch_device)
    subset = subset_indices(inputs.subset_size, len(inputs.data), config.seed)
    attack = functools.partial(
        margins_for,
        config,
        inputs.model,
        images=images[subset],
        labels=everything.labels[subset],
        data_id=f"{config.dataset}:{config.split}",
        indices=subset,
        phase="subset margins",
    )
    if config.shard is not None:
        # Shards write disjoint chunk files atomically: no lock needed. They also attack their
        # part of the pseudo-margin's training points, which `--merge` may need.
        attack()
        if config.pseudo_margin != "never" and score_choice.can_learn_pseudo_margin(config, inputs):
            pseudo_margin_training(config, inputs, subset)
        return RunResult(None, None, preflight, shard_done=config.shard)
    name = config.resolved_model_name
    with store.model_lock(config.store, name):
        folder, size = attack()
        margins = load_margins(config, folder, size)
        graph, pseudo_facts = choose_score(
            config, inputs, subset, margins, images=images, everything=everything, traffic=traffic
        )
        version = config.version or store.new_version_id(config.store, name)
        staging = store.new_staging_dir(config.store, name, version)
        try:
            record = finish_version(
                config,
                inputs,
                graph=graph,
                pseudo_facts=pseudo_facts,
                subset=subset,
                margins=margins,
                big_labels=everything.labels,
                staging=staging,
                version=version,
                started=started,
                traffic=traffic,
            )
            final = store.publish(config.store, name, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return RunResult(record, final, preflight)


def finish_version(
    config: CalibrationConfig,
    inputs: Inputs,
    *,
    graph: ServingGraph,
    pseudo_facts: PseudoMarginFacts | None,
    subset: np.ndarray,
    margins: MarginResult,
    big_labels: np.ndarray,
    staging: Path,
    version: str,
    started: float,
    traffic: TrafficPoints | None = None,
) -> CalibrationRecord:
    """Export and verify the graph, compute every figure, write record and report."""
    images = inputs.data.float_images
    onnx_labels, subset_scores, guard_band = export_serving_graph(
        graph, inputs.model.input_shape, images[subset], staging
    )
    big_scores = graph_scores(graph, images, config.torch_device)
    # the new graph's scores: with a refitted pseudo-margin they are not the served ones
    threshold_points = (
        None
        if traffic is None
        else (graph_scores(graph, traffic.images, config.torch_device), traffic.margins)
    )
    record = build_record(
        config=config,
        version=version,
        model_sha256=file_sha256(staging / ONNX_FILE),
        input_shape=list(inputs.model.input_shape),
        class_names=list(inputs.data.class_names),
        margins=margins,
        subset_scores=subset_scores,
        subset_correct=onnx_labels == inputs.data.labels[subset],
        big_scores=big_scores,
        big_correct=big_labels == inputs.data.labels,
        big_labels=big_labels,
        guard_band=guard_band,
        pseudo_facts=pseudo_facts,
        attacks=attack_budgets(config, margins),
        subset_source=data_source(config, len(subset), seed=config.seed),
        big_source=data_source(config, len(images)),
        duration_s=time.monotonic() - started,
        software=software_versions(),
        threshold_points=threshold_points,
    )
    store.write_record(staging, record)
    data = report_data(record, margins, subset_scores, onnx_labels == inputs.data.labels[subset])
    if traffic is not None:
        data = with_refit_facts(data, len(traffic.images), config.since)
    html = render_report(data)
    (staging / REPORT_FILE).write_text(html)
    return record
