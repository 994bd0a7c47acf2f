"""`marginwatch-calibrate --traffic DIR` on real shards: the shipped test images served by the
shipped version through ONNX Runtime (`service.engine.ServedModel`, as the service serves them),
written with `artifact.traffic.write_shard`, checked on a copy of the shipped store. Plus the
faults a traffic folder can hold, and fresh subsets without --seed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marginwatch.artifact import store
from marginwatch.artifact.schema import ONNX_FILE, RECORD_FILE, REPORT_FILE
from marginwatch.artifact.traffic import (
    TRAFFIC_CHECK_FILE,
    TrafficCheck,
    TrafficShard,
    list_shards,
    read_shard,
    write_shard,
)
from marginwatch.calibration.__main__ import main
from marginwatch.calibration.config import CalibrationConfig, ConfigError, since_timestamp
from marginwatch.calibration.inputs import forward_all, subset_indices
from marginwatch.calibration.job import load_margins, margins_for
from marginwatch.calibration.margin_cache import content_sha256
from marginwatch.calibration.metrics import nonrobust_mask
from marginwatch.calibration.report import with_section
from marginwatch.calibration.threshold import threshold_matching_fraction
from marginwatch.calibration.traffic_check import draw_sample, wilson_ratio
from marginwatch.models.data import Dataset, save_npz
from marginwatch.models.registry import load_model
from marginwatch.service.engine import EngineOptions, ServedModel

MODEL = "fmnist-cnn-pgd"
SHIPPED = store.default_store() / MODEL
FAST = ["--attack", "fmn:15", "--attack", "fab:5", "--bootstrap", "50", "--quiet"]
NOW = time.time()


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    # the shipped version and CURRENT; not a margin cache or lock a local run may have left
    shutil.copytree(SHIPPED, tmp_path / "store" / MODEL, ignore=shutil.ignore_patterns(".*"))
    return tmp_path / "store"


def serve(store_dir: Path, images: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """What the service answers for `images`: version, labels, scores, flags."""
    served = ServedModel(MODEL, store.current_dir(store_dir, MODEL), EngineOptions(device="cpu"))
    served.load()
    prediction = served.predict(images)
    return served.version, prediction.labels, prediction.scores, prediction.brittle


def write_traffic(
    root: Path,
    store_dir: Path,
    images: np.ndarray,
    *,
    per_shard: int,
    ago_s: float = 600.0,
    model: str = MODEL,
) -> int:
    """Serve `images` in shards of `per_shard`, the newest `ago_s` seconds ago, as traffic of
    `model` (served by the shipped model and version); the shard count."""
    version, labels, scores, brittle = serve(store_dir, images)
    starts = range(0, len(images), per_shard)
    for seq, start in enumerate(starts):
        part = slice(start, start + per_shard)
        n = len(images[part])
        times = NOW - ago_s - 60.0 * (len(starts) - seq) + np.arange(n) * 0.01
        shard = TrafficShard(model, version, images[part], labels[part], scores[part],
                             brittle[part], times)  # fmt: skip
        write_shard(root, shard, seq=seq)
    return len(starts)


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def check_args(store_dir: Path, traffic: Path, *extra: str) -> list[str]:
    return ["--store", str(store_dir), "--traffic", str(traffic), "--traffic-size", "60", *FAST,
            *extra]  # fmt: skip


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marginwatch-calibrate: "), err
    return lines[0]


def cached_margins(
    store_dir: Path, images: np.ndarray, served: np.ndarray
) -> tuple[np.ndarray, Path]:
    """Non-robust at ε = 0.1 by the margins the check cached for `images` (attacking nothing),
    and the cache folder."""
    config = CalibrationConfig(store=store_dir, attacks=["fmn:15", "fab:5"], seed=3, quiet=True)
    model = load_model(MODEL)
    outputs = forward_all(model, images, config.torch_device)
    assert (outputs.labels == served).all()
    data_id = f"traffic:{content_sha256(images)}"
    folder, size = margins_for(config, model, images=images, labels=outputs.labels,
                               data_id=data_id, indices=np.arange(len(images)))  # fmt: skip
    assert folder.is_dir()
    margins = load_margins(config, folder, size)
    return nonrobust_mask(margins.radius, margins.success, 0.1), folder


@pytest.mark.slow
def test_check_is_published_beside_the_served_version(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    images = fashion_subset.float_images[:120]
    traffic = tmp_path / "traffic"
    write_traffic(traffic, store_copy, images, per_shard=40)
    # another version's traffic (excluded, counted), a broken shard (skipped, counted), and a
    # hidden half-written one (never read: it would be a second broken shard)
    older = fashion_subset.float_images[200:230]
    version, labels, scores, brittle = serve(store_copy, older)
    times = np.full(30, NOW - 900.0)
    write_shard(
        traffic, TrafficShard(MODEL, "older", older, labels, scores, brittle, times), seq=99
    )
    day = next((traffic / MODEL).iterdir())
    (day / "000000-x-1-00000100.npz").write_bytes(b"PK\x03\x04 truncated")
    (day / ".000000-x-1-00000101.npz.tmp").write_bytes(b"PK\x03\x04 half")
    version_dir = store_copy / MODEL / version
    before = {name: (version_dir / name).read_bytes() for name in (ONNX_FILE, RECORD_FILE)}
    old_report = (version_dir / REPORT_FILE).read_text()

    assert main(check_args(store_copy, traffic, "--seed", "3")) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable traffic shard(s)" in captured.err
    assert "CURRENT unchanged" in captured.out
    check = TrafficCheck.model_validate_json((version_dir / TRAFFIC_CHECK_FILE).read_text())
    assert store.current_version(store_copy, MODEL) == version
    assert {n: (version_dir / n).read_bytes() for n in before} == before
    store.read_record(version_dir)  # still verifies: hash and schema
    assert (check.version, check.seed, check.broken_shards) == (version, 3, 1)
    assert (check.available_points, check.other_version_points) == (120, 30)
    assert check.nonrobust.total == check.flagged.total == 60
    assert [a.name for a in check.attacks] == ["fmn", "fab"]

    # the figures, recomputed from the same sample and the cached margins
    sample = draw_sample(traffic, MODEL, version, since=check.traffic_since, size=60, seed=3)
    assert check.flagged.count == int(sample.brittle.sum())
    nonrobust, folder = cached_margins(store_copy, sample.inputs, sample.labels)
    assert check.nonrobust.count == int(nonrobust.sum())
    hits = int((nonrobust & sample.brittle).sum())
    if nonrobust.any():
        assert check.recall == pytest.approx(hits / nonrobust.sum())
    assert check.nonrobust.ci_low <= check.nonrobust.value <= check.nonrobust.ci_high
    record = store.read_record(version_dir)
    assert check.live_gauge == pytest.approx(record.live_curve(sample.scores).mean())
    overlap = (check.nonrobust.ci_low <= check.flagged.ci_high) and (
        check.flagged.ci_low <= check.nonrobust.ci_high
    )
    assert check.ratios_agree == overlap

    report = (version_dir / REPORT_FILE).read_text()
    assert report.startswith(old_report.split("</body>")[0])  # the calibration's page, kept
    assert report.count("<h2>Traffic check</h2>") == 1 and "60 points drawn" in report

    # a rerun of the same sample resumes from the cache (no chunk attacked again) and replaces
    # the section rather than adding a second
    chunks = {p: p.stat().st_mtime_ns for p in folder.glob("chunk-*.npz")}
    assert main(check_args(store_copy, traffic, "--seed", "3")) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.glob("chunk-*.npz")} == chunks
    assert (version_dir / REPORT_FILE).read_text().count("<h2>Traffic check</h2>") == 1
    assert not list(version_dir.glob(".*"))  # no temporary left behind


@pytest.mark.slow
def test_refit_publishes_a_version_that_serves(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset
) -> None:
    images = fashion_subset.float_images[:60]
    traffic = tmp_path / "traffic"
    write_traffic(traffic, store_copy, images, per_shard=30)
    served = store.current_version(store_copy, MODEL)
    data = tmp_path / "data.npz"
    save_npz(fashion_subset.subset(np.arange(1000, 1600)), data)
    refit = ["--refit", "--dataset", str(data), "--subset-size", "60", "--pseudo-margin", "never"]
    args = check_args(store_copy, traffic, *refit, "--seed", "4", "--version", "refit")
    assert main(args) == 0
    assert (store_copy / MODEL / str(served) / TRAFFIC_CHECK_FILE).exists()
    assert store.current_version(store_copy, MODEL) == "refit"
    new_dir = store.current_dir(store_copy, MODEL)
    record = store.read_record(new_dir)
    assert record.subset.seed == 4 and record.score_kind == "logit-margin"
    assert not (new_dir / TRAFFIC_CHECK_FILE).exists()
    assert "attacked traffic points" in (new_dir / REPORT_FILE).read_text()
    _, labels, scores, _ = serve(store_copy, images)  # the new version loads and serves

    # λ is the rule's on the subset and the traffic together (the logit margin: the new scores)
    config = CalibrationConfig(store=store_copy, dataset=str(data), subset_size=60, seed=4,
                               attacks=["fmn:15", "fab:5"], quiet=True)  # fmt: skip
    model = load_model(MODEL)
    subset = subset_indices(60, 600, 4)
    parts = []
    for points, data_id, indices in (
        (fashion_subset.subset(np.arange(1000, 1600)[subset]).float_images, f"{data}:test",
         subset),
        (images, f"traffic:{content_sha256(images)}", np.arange(60)),
    ):  # fmt: skip
        outputs = forward_all(model, points, config.torch_device)
        folder, size = margins_for(config, model, images=points, labels=outputs.labels,
                                   data_id=data_id, indices=indices)  # fmt: skip
        found = load_margins(config, folder, size)
        parts.append((outputs.scores, nonrobust_mask(found.radius, found.success, 0.1)))
    expected = threshold_matching_fraction(
        np.r_[parts[0][0], parts[1][0]], np.r_[parts[0][1], parts[1][1]]
    )
    assert record.threshold == pytest.approx(expected, abs=1e-4)
    assert (labels == forward_all(model, images, config.torch_device).labels).all()
    assert np.isfinite(scores).all()


def write_image_folder(root: Path, data: Dataset, per_class: int) -> Path:
    """PNGs of `per_class` images of each class, in class folders whose names sort in label
    order but are not the dataset's names ("0-T-shirt-top", ...)."""
    for label, name in enumerate(data.class_names):
        folder = root / f"{label}-{name.replace('/', '-')}"
        folder.mkdir(parents=True)
        for index in np.flatnonzero(data.labels == label)[:per_class]:
            Image.fromarray(data.images[index, 0]).save(folder / f"{index}.png")
    return root


@pytest.mark.slow
def test_refit_reuses_the_served_setup(
    tmp_path: Path, fashion_subset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    images = write_image_folder(tmp_path / "images", fashion_subset, per_class=8)
    store_dir, traffic = tmp_path / "store", tmp_path / "traffic"
    tiny = ["--store", str(store_dir), "--attack", "fmn:5", "--attack", "fab:3", "--bootstrap",
            "20", "--subset-size", "20", "--pseudo-margin", "never"]  # fmt: skip
    # served: the image folder, and a normalisation the check must repeat to get its labels
    assert main([*tiny, "--dataset", str(images), "--mean", "0.05", "--std", "0.9",
                 "--version", "v1", "--quiet"]) == 0  # fmt: skip
    served = store.read_record(store_dir / MODEL / "v1")
    assert served.class_names[:2] == ["0-T-shirt-top", "1-Trouser"]
    write_traffic(traffic, store_dir, fashion_subset.float_images[200:220], per_shard=10)
    capsys.readouterr()

    refit = [*tiny, "--traffic", str(traffic), "--refit"]
    assert main([*refit, "--version", "refit"]) == 0  # no --dataset: the served one
    record = store.read_record(store_dir / MODEL / "refit")
    assert record.class_names == served.class_names
    assert record.subset.dataset == served.subset.dataset == str(images)
    assert record.model_source == served.model_source
    assert record.model_source is not None and record.model_source.mean == (0.05,)
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "reusing served version" in line]
    prefix = f"marginwatch-calibrate: note: {MODEL}: reusing served version v1's dataset"
    assert line.startswith(prefix)
    for part in (f"dataset {images}", "split test", "class names 0-T-shirt-top, 1-Trouser, "
                 "2-Pullover, …, 9-Ankle boot (10)", f"model {MODEL}", "mean 0.05", "std 0.9",
                 "threat model linf ε = 0.1"):  # fmt: skip
        assert part in line
    assert "warning" not in err

    # an explicit --dataset wins, with its own class names, which the run reports; --quiet
    # prints no note. The refit serves now: the check is of its traffic, in its (reused) setup
    write_traffic(traffic, store_dir, fashion_subset.float_images[220:240], per_shard=10, ago_s=300)
    data = tmp_path / "data.npz"
    save_npz(fashion_subset.subset(np.arange(100)), data)
    assert main([*refit, "--quiet", "--dataset", str(data), "--version", "other"]) == 0
    other = store.read_record(store_dir / MODEL / "other")
    assert other.subset.dataset == str(data) and other.class_names[0] == "T-shirt/top"
    assert other.model_source == served.model_source  # not given: still reused
    err = capsys.readouterr().err
    assert "reusing" not in err
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert warning.startswith("marginwatch-calibrate: warning: the new version other of ")
    assert "served version refit named them 0-T-shirt-top, 1-Trouser" in warning


def run_fault(
    store_dir: Path, traffic: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> str:
    code = main(check_args(store_dir, traffic, *extra))
    line = one_line_error(capsys)
    assert code == 2, line
    return line


def test_missing_and_empty_traffic_folders(
    tmp_path: Path, store_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic"
    assert "does not exist" in run_fault(store_copy, traffic, capsys)
    traffic.mkdir()
    assert f"no models in {traffic}: no folder there holds a traffic shard (folders: none)" in (
        run_fault(store_copy, traffic, capsys)
    )
    line = run_fault(store_copy, traffic, capsys, "--model", MODEL)
    assert f"no traffic of {MODEL!r} in {traffic}, nor of any model" in line
    # a half-written shard is hidden until it is renamed into place: never read
    day = traffic / MODEL / time.strftime("%Y-%m-%d", time.gmtime())
    day.mkdir(parents=True)
    (day / ".120000-x-1-00000000.npz.tmp").write_bytes(b"PK\x03\x04 half")
    line = run_fault(store_copy, traffic, capsys)
    assert f"no models in {traffic}" in line and f"(folders: {MODEL})" in line
    assert f"no traffic of {MODEL!r}" in run_fault(store_copy, traffic, capsys, "--name", MODEL)
    assert not list((store_copy / MODEL).glob(f"*/{TRAFFIC_CHECK_FILE}"))


def test_traffic_that_cannot_be_checked(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic"
    images = fashion_subset.float_images[:20]
    write_traffic(traffic, store_copy, images, per_shard=10, ago_s=3 * 86400)
    newest = max(read_shard(path).times.max() for path in list_shards(traffic, MODEL))
    line = run_fault(store_copy, traffic, capsys)
    assert "no traffic of 'fmnist-cnn-pgd' since" in line
    assert f"; the newest sample is from {utc(newest)}: widen --since" in line
    # the model given is not the served one: refused before any attack
    line = run_fault(store_copy, traffic, capsys, "--since", "7d", "--model",
                     "fmnist-cnn-standard", "--name", MODEL)  # fmt: skip
    assert "is not the served model" in line
    # every shard broken
    for shard in (traffic / MODEL).rglob("*.npz"):
        shard.write_bytes(shard.read_bytes()[:100])
    line = run_fault(store_copy, traffic, capsys, "--since", "7d")
    assert "every traffic shard of 'fmnist-cnn-pgd'" in line and "unreadable (2)" in line
    assert not list((store_copy / MODEL).glob(f"*/{TRAFFIC_CHECK_FILE}"))
    assert not (store_copy / MODEL / ".margins").exists()  # nothing attacked


def add_twin(store_dir: Path, *, recorded: bool) -> Path:
    """A second served model, "twin": the shipped version under another name; its record names
    its model (`model_source`) only when `recorded`, as records before that field did not."""
    source = store.current_dir(store_dir, MODEL)
    twin = store_dir / "twin" / source.name
    if not twin.exists():
        shutil.copytree(source, twin)
        (twin.parent / store.CURRENT_FILE).write_text(source.name + "\n")
    record = json.loads((twin / RECORD_FILE).read_text())
    record["model_name"] = "twin"
    record["model_source"] = {"model": MODEL} if recorded else None
    (twin / RECORD_FILE).write_text(json.dumps(record))
    return twin


def test_without_model_every_served_model_in_the_folder_is_checked(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic"
    images = fashion_subset.float_images[:8]
    write_traffic(traffic, store_copy, images, per_shard=8, model="ghost")  # served nowhere
    line = run_fault(store_copy, traffic, capsys)
    assert f"no traffic in {traffic} of a model served from {store_copy}" in line
    assert line.endswith(f"found traffic of: ghost; the store serves: {MODEL} (give --store)")
    twin = add_twin(store_copy, recorded=False)
    write_traffic(traffic, store_copy, images, per_shard=8, model="twin")
    line = run_fault(store_copy, traffic, capsys, "--model", MODEL)
    assert line.endswith(f"no traffic of {MODEL!r} in {traffic}; found traffic of: ghost, twin")
    write_traffic(traffic, store_copy, images, per_shard=8)
    assert "give --name to pick one" in run_fault(store_copy, traffic, capsys, "--json")

    # each in turn; the exit code is the worst: twin's record does not say which model it is
    assert main(check_args(store_copy, traffic)) == 2
    out, err = capsys.readouterr()
    assert f"traffic check    {MODEL}" in out and "traffic check    twin" not in out
    assert err.splitlines() == [
        "marginwatch-calibrate: warning: traffic of 'ghost' is not checked: no served version "
        f"in {store_copy}",
        f"marginwatch-calibrate: twin: the served version {twin.name} of 'twin' does not record "
        "its model (it predates that field): give --model (and --weights)",
    ]
    add_twin(store_copy, recorded=True)
    assert main(check_args(store_copy, traffic)) == 0
    for model in (MODEL, "twin"):
        path = store.current_dir(store_copy, model) / TRAFFIC_CHECK_FILE
        check = TrafficCheck.model_validate_json(path.read_text())
        assert (check.model_name, check.nonrobust.total) == (model, 8)


def test_traffic_of_another_version_is_not_checked(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    traffic = tmp_path / "traffic"
    _, labels, scores, brittle = serve(store_copy, fashion_subset.float_images[:10])
    shard = TrafficShard(MODEL, "older", fashion_subset.float_images[:10], labels, scores,
                         brittle, np.full(10, NOW - 60.0))  # fmt: skip
    write_shard(traffic, shard, seq=0)
    line = run_fault(store_copy, traffic, capsys)
    assert "none of the 10 samples" in line and line.endswith("found versions: older (10)")


def test_the_sample_is_uniform_and_pinned_by_its_seed(
    tmp_path: Path, store_copy: Path, fashion_subset: Dataset
) -> None:
    traffic = tmp_path / "traffic"
    write_traffic(traffic, store_copy, fashion_subset.float_images[:90], per_shard=30)
    version = str(store.current_version(store_copy, MODEL))

    def drawn(seed: int, size: int = 20) -> np.ndarray:
        sample = draw_sample(traffic, MODEL, version, since=0.0, size=size, seed=seed)
        return sample.times

    assert np.array_equal(drawn(1), drawn(1))
    assert not np.array_equal(drawn(1), drawn(2))
    assert len(drawn(1, size=500)) == 90  # all of them when fewer
    # every shard contributes: the draw spans the whole window, not its first shard
    counts = np.histogram(np.concatenate([drawn(s) for s in range(20)]), bins=3)[0]
    assert counts.min() > 80


def test_wilson_interval() -> None:
    assert wilson_ratio(0, 10).ci_high == pytest.approx(0.2775, abs=1e-4)
    half = wilson_ratio(5, 10)
    assert (half.ci_low, half.ci_high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    full = wilson_ratio(10, 10)
    assert full.value == full.ci_high == 1.0 and full.ci_low == pytest.approx(0.7225, abs=1e-4)


def test_since_reads_durations_and_iso_times() -> None:
    assert since_timestamp("24h", 100_000.0) == 100_000.0 - 86400
    assert since_timestamp("7d", 10**6) == 10**6 - 7 * 86400
    assert since_timestamp("2026-12-01T00:00Z", 0) == since_timestamp("2026-12-01T00:00", 0)
    with pytest.raises(ConfigError, match="neither a duration"):
        since_timestamp("yesterday", 0)


def test_report_section_is_replaced_not_repeated() -> None:
    page = "<html><body><h1>x</h1></body></html>"
    one = with_section(page, "<!-- traffic-check -->A<!-- /traffic-check -->")
    two = with_section(one, "<!-- traffic-check -->B<!-- /traffic-check -->")
    assert (
        two == "<html><body><h1>x</h1><!-- traffic-check -->B<!-- /traffic-check --></body></html>"
    )


def test_fresh_seed_unless_pinned() -> None:
    assert CalibrationConfig().seed != CalibrationConfig().seed  # 1 in 2**31 to fail by chance
    assert CalibrationConfig(seed=5).seed == 5
    assert CalibrationConfig(version="v7").seed == CalibrationConfig(version="v7").seed
    assert CalibrationConfig(version="v7").seed != CalibrationConfig(version="v8").seed
    with pytest.raises(ValueError, match="--shard needs the same subset"):
        CalibrationConfig(shard=0, num_shards=2)


@pytest.mark.slow
def test_runs_without_seed_draw_fresh_subsets(tmp_path: Path, fashion_subset: Dataset) -> None:
    data = tmp_path / "data.npz"
    save_npz(fashion_subset.subset(np.arange(300)), data)
    base = ["--store", str(tmp_path / "s"), "--dataset", str(data), "--subset-size", "10",
            "--pseudo-margin", "never", "--attack", "fmn:5", "--attack", "fab:2", "--bootstrap",
            "10", "--quiet"]  # fmt: skip
    seeds = []
    for _ in range(2):
        assert main(base) == 0
        seeds.append(store.read_record(store.current_dir(tmp_path / "s", MODEL)).subset.seed)
    assert seeds[0] != seeds[1]  # drawn fresh, and recorded
    assert not np.array_equal(subset_indices(10, 300, seeds[0]), subset_indices(10, 300, seeds[1]))
    assert main([*base, "--seed", "11"]) == 0
    assert store.read_record(store.current_dir(tmp_path / "s", MODEL)).subset.seed == 11
