"""The served version's setup that `--traffic` and `--refit` reuse: every setting its record
holds, unless a flag gives it; the paths it names must exist; older records without the model
fall back to a shipped model's name or ask for --model. (End to end: test_traffic_check.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from marginwatch.artifact import store
from marginwatch.artifact.schema import CalibrationRecord, DataSource, ModelSource, ThreatModel
from marginwatch.calibration.__main__ import load_config
from marginwatch.calibration.config import ConfigError
from marginwatch.calibration.served_setup import with_served_setup
from tests.artifact.test_answers import with_grid

MODEL = "fmnist-cnn-pgd"


def served_record(**changes: object) -> CalibrationRecord:
    """The shipped version's record with `changes` (not re-validated: plain data here)."""
    record = store.read_record(store.current_dir(store.default_store(), MODEL))
    return record.model_copy(update=changes)


@pytest.fixture
def recorded(tmp_path: Path) -> CalibrationRecord:
    """A record of a version calibrated on an image folder, with weights and normalisation."""
    images, weights = tmp_path / "images", tmp_path / "w.safetensors"
    images.mkdir()
    weights.touch()
    source = ModelSource(
        model="fmnist-cnn", weights=str(weights), input_range=(0, 255), mean=(0.5,), std=(0.25,)
    )
    subset = DataSource(dataset=str(images), split="test", size=20, seed=1)
    return served_record(
        model_source=source,
        subset=subset,
        class_names=["x", "y"],
        threat_model=ThreatModel(norm="l2", eps=0.5),
    )


def test_every_recorded_setting_is_reused(tmp_path: Path, recorded: CalibrationRecord) -> None:
    config, _ = load_config(["--traffic", str(tmp_path), "--quiet"])
    reused, note = with_served_setup(config, recorded)
    assert reused.dataset == recorded.subset.dataset and reused.split == "test"
    assert reused.class_names == ("x", "y")
    assert (reused.model, str(reused.weights)) == ("fmnist-cnn", recorded.model_source.weights)  # type: ignore[union-attr]
    assert (reused.input_range, reused.mean, reused.std) == ((0, 255), (0.5,), (0.25,))
    assert (reused.norm, reused.resolved_eps) == ("l2", 0.5)
    assert reused.seed == config.seed and reused.quiet  # the rest stays the run's
    assert note.startswith(f"{MODEL}: reusing served version {recorded.version}'s dataset ")
    for part in ("class names x, y (2)", "model fmnist-cnn (weights ", "input range 0,255",
                 "mean 0.5", "std 0.25", "threat model l2 ε = 0.5"):  # fmt: skip
        assert part in note
    assert "given instead" not in note


def test_a_flag_keeps_its_setting(tmp_path: Path, recorded: CalibrationRecord) -> None:
    flags = ["--dataset", "fashion-mnist-subset", "--mean", "0.1", "--model", MODEL]
    config, _ = load_config(["--traffic", str(tmp_path), "--quiet", *flags])
    reused, note = with_served_setup(config, recorded)
    assert (reused.dataset, reused.mean, reused.model) == ("fashion-mnist-subset", (0.1,), MODEL)
    # the served weights belong to the served model, the class names to the served data
    assert reused.weights is None and reused.class_names == ()
    assert reused.std == (0.25,) and reused.input_range == (0, 255)  # not given: reused
    assert note.endswith("; given instead: --dataset, --model, --mean")
    assert "dataset " not in note and "class names" not in note


def test_older_records_without_the_model(tmp_path: Path) -> None:
    config, _ = load_config(["--traffic", str(tmp_path), "--quiet", "--name", "custom"])
    with pytest.raises(ConfigError, match=r"does not record its model .*: give --model"):
        with_served_setup(config, served_record(model_name="custom", model_source=None))
    # a shipped model is known by its name; an explicit --model serves any name
    reused, note = with_served_setup(config, served_record(model_source=None))
    assert reused.model == MODEL and "normalisation" not in note and "mean" not in note
    given, _ = load_config(["--traffic", str(tmp_path), "--name", "custom", "--model", MODEL])
    older = served_record(model_name="custom", model_source=None)
    assert with_served_setup(given, older)[0].model == MODEL


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"subset": DataSource(dataset="gone/images", split="test", size=9)}, "--dataset"),
        ({"model_source": ModelSource(model="fmnist-cnn", weights="gone.safetensors")},
         "--weights"),
        ({"model_source": ModelSource(model="gone/model.pt")}, "--model"),
    ],
)  # fmt: skip
def test_a_reused_path_that_is_not_there_names_its_flag(
    tmp_path: Path, changes: dict[str, object], flag: str
) -> None:
    config, _ = load_config(["--traffic", str(tmp_path), "--quiet"])
    with pytest.raises(ConfigError, match=f"calibrated with {flag} gone.*: give {flag}$"):
        with_served_setup(config, served_record(**changes))


def test_the_threat_model_is_the_served_one(tmp_path: Path) -> None:
    config, _ = load_config(["--traffic", str(tmp_path), "--norm", "l2"])
    with pytest.raises(ConfigError, match=r"flags for linf ε = 0\.1; .*drop --norm and --eps"):
        with_served_setup(config, served_record())
    same, _ = load_config(["--traffic", str(tmp_path), "--eps", "0.1"])
    assert with_served_setup(same, served_record())[0].resolved_eps == 0.1


def test_a_refit_answers_for_the_served_budget_grid(tmp_path: Path) -> None:
    record = with_grid(served_record())
    config, _ = load_config(["--traffic", str(tmp_path), "--quiet"])
    reused, note = with_served_setup(config, record)
    assert reused.resolved_eps_grid == (0.025, 0.05, 0.1, 0.2) and reused.margin_interval == 0.8
    assert "budget grid 0.025,0.05,0.1,0.2" in note and "margin interval 0.8" in note
    mine, note = with_served_setup(
        load_config(["--traffic", str(tmp_path), "--eps-grid", "0.3"])[0], record
    )
    assert mine.resolved_eps_grid == (0.1, 0.3) and "--eps-grid" in note
