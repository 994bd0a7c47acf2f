from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from marginwatch.artifact.hashing import file_sha256
from marginwatch.models.architectures import FashionMnistCNN
from marginwatch.models.data import Dataset, save_npz, stratified_indices
from marginwatch.models.pgd import pgd_linf
from marginwatch.models.registry import load_model
from marginwatch.models.train_cli import main as train_main
from marginwatch.models.training import (
    RECIPES,
    Recipe,
    logit_margin_to_label,
    one_vs_rest_loss,
    sovr_loss,
    train,
)


@pytest.fixture(scope="module")
def train_512(fashion_subset: Dataset) -> Dataset:
    return fashion_subset.subset(stratified_indices(fashion_subset.labels, 512, seed=0))


def accuracy(model: torch.nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(data.float_images))
    return float((logits.argmax(1) == torch.from_numpy(data.labels)).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_one_epoch_smoke_run_learns(recipe: str, train_512: Dataset) -> None:
    torch.manual_seed(0)
    model = FashionMnistCNN().eval()
    before = accuracy(model, train_512)
    recipe_ = Recipe(recipe, epochs=1, batch_size=32, learning_rate=3e-3, attack_steps=2)  # type: ignore[arg-type]
    losses = train(model, train_512, recipe_, seed=0, progress=False)
    assert len(losses) == 1 and losses[0] > 0
    assert accuracy(model, train_512) > before + 0.1
    assert not model.training


def test_training_is_reproducible(train_512: Dataset) -> None:
    weights = []
    for _ in range(2):
        torch.manual_seed(5)
        model = FashionMnistCNN()
        train(
            model,
            train_512.subset(torch.arange(128).numpy()),
            Recipe("pgd", epochs=1, batch_size=64, attack_steps=1),
            seed=5,
            progress=False,
        )
        weights.append(model.state_dict())
    assert weights[0] and set(weights[0]) == set(weights[1])
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


@pytest.mark.slow
def test_train_cli_writes_weights_and_card(train_512: Dataset, tmp_path: Path) -> None:
    save_npz(train_512, tmp_path / "data.npz")
    code = train_main(
        [
            "--recipe",
            "sovr",
            "--dataset",
            str(tmp_path / "data.npz"),
            "--epochs",
            "1",
            "--attack-steps",
            "1",
            "--eval-limit",
            "100",
            "--out",
            str(tmp_path / "out" / "tiny"),
            "--quiet",
        ]
    )
    assert code == 0
    card = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert card["recipe"]["name"] == "sovr" and card["seed"] == 0
    assert card["evaluation"]["samples"] == 100
    assert 0 <= card["evaluation"]["robust_accuracy"] <= card["evaluation"]["clean_accuracy"] <= 1
    assert card["weights_sha256"] == file_sha256(tmp_path / "out" / "tiny.safetensors")
    load_model("fmnist-cnn", tmp_path / "out" / "tiny.safetensors")


def test_train_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--out", str(tmp_path / "x"), "--eps", "0"]) == 2
    assert capsys.readouterr().err == (
        "marginwatch-train: --eps: input should be greater than 0, got '0'\n"
    )
    with pytest.raises(SystemExit, match="2"):  # argparse refuses a choice the help lists
        train_main(["--out", str(tmp_path / "x"), "--arch", "mlp"])
    assert "argument --arch: invalid choice: 'mlp'" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "x"), "--data-dir", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_sovr_switches_the_smallest_margins() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0], [1.0, 0.9]])
    labels = torch.tensor([0, 0, 0, 0])
    margins = logit_margin_to_label(logits, labels)
    torch.testing.assert_close(margins, torch.tensor([5.0, 0.1, -3.0, 0.1]))
    ce = F.cross_entropy(logits, labels, reduction="none")
    ovr = one_vs_rest_loss(logits, labels)
    # half the batch switched: rows 2 (margin −3) and one of the two 0.1 rows
    expected = torch.stack([ce[0], ovr[1], ovr[2], ce[3]]).mean()
    alt = torch.stack([ce[0], ce[1], ovr[2], ovr[3]]).mean()
    got = sovr_loss(logits, labels, 0.5)
    assert torch.isclose(got, expected) or torch.isclose(got, alt)
    torch.testing.assert_close(sovr_loss(logits, labels, 1.0), ovr.mean())


def test_pgd_stays_in_the_ball_and_the_box() -> None:
    torch.manual_seed(0)
    model = FashionMnistCNN().eval()
    inputs = torch.rand(8, 1, 28, 28)
    labels = model(inputs).argmax(1)
    adversarial = pgd_linf(model, inputs, labels, eps=0.05, steps=3)
    assert (adversarial - inputs).abs().max() <= 0.05 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="positive"):
        pgd_linf(model, inputs, labels, eps=0.0, steps=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd_linf(model, inputs * 2, labels, eps=0.1, steps=3)
