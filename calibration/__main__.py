"""`marginwatch-calibrate` (also `python -m marginwatch.calibration`): the job's command line.

Exit codes: 0 published (or shard done), 1 verification failed, 2 bad input, 3 another run of
the same model holds the lock. Meant for cron: idempotent, lock-protected, safe to kill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marginwatch-calibrate",
        description="Measure input margins on a subset with minimum-norm attacks, check margin "
        "consistency, fit the brittleness threshold λ and the robust-accuracy estimators, and "
        "publish a verified version (model.onnx, calibration.json, report.html) to the store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model",
        default="fmnist-cnn-pgd",
        help="shipped model, architecture name (with --weights), TorchScript file, "
        "or package.module:factory",
    )
    model.add_argument("--weights", type=Path, default=None, help="weights file for --model")
    model.add_argument(
        "--name", default=None, help="name in the store (default: the model or weights file name)"
    )
    model.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist, fashion-mnist-subset, cifar10, or an .npz path",
    )
    model.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of the dataset files (Fashion-MNIST: default "
        "$MARGINWATCH_FASHION_MNIST_DIR, then Debian's dataset-fashion-mnist)",
    )
    model.add_argument(
        "--split",
        choices=["train", "test"],
        default="test",
        help="split to calibrate on; its full size is the large set of the "
        "robust-accuracy estimate",
    )
    attack = parser.add_argument_group("attacks and threat model")
    attack.add_argument("--subset-size", type=int, default=500, help="points to attack")
    attack.add_argument("--seed", type=int, default=0, help="seed of the subset and the fits")
    attack.add_argument("--norm", choices=["linf", "l2"], default="linf", help="threat model")
    attack.add_argument(
        "--eps", type=float, default=None, help="budget ε (default: 0.1 for linf, 1.5 for l2)"
    )
    attack.add_argument(
        "--attack",
        action="append",
        dest="attacks",
        default=None,
        metavar="NAME[:STEPS]",
        help="minimum-norm attack, repeatable: fmn, fab (linf, l2), ddn (l2); "
        "default fmn:100 and fab:100 for linf, fmn:100 and ddn:100 for l2",
    )
    attack.add_argument("--attack-batch-size", type=int, default=100, help="points per batch")
    attack.add_argument(
        "--device", default="auto", help="auto (CUDA when torch sees it), cpu, cuda or cuda:N"
    )
    fit = parser.add_argument_group("threshold, estimators, pseudo-margin")
    fit.add_argument(
        "--threshold-rule",
        choices=["match-fraction", "target-tpr"],
        default="match-fraction",
        help="match-fraction: the λ whose flagged fraction equals the subset's "
        "non-robust fraction; target-tpr: smallest λ flagging --target-tpr of the "
        "non-robust points",
    )
    fit.add_argument("--target-tpr", type=float, default=0.95, help="for target-tpr")
    fit.add_argument(
        "--estimator",
        choices=["count", "regression"],
        default="regression",
        help="robust-accuracy estimate shown as the headline (both are recorded)",
    )
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    fit.add_argument(
        "--pseudo-margin",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: learn a pseudo-margin when Kendall τ < --tau-cutoff, keep it "
        "if it ranks the subset better",
    )
    fit.add_argument("--tau-cutoff", type=float, default=0.6, help="for --pseudo-margin auto")
    fit.add_argument(
        "--pseudo-train-size",
        type=int,
        default=1000,
        help="attacked training points for the pseudo-margin",
    )
    fit.add_argument(
        "--pseudo-input",
        choices=["features", "logits"],
        default="features",
        help="what the pseudo-margin MLP reads",
    )
    fit.add_argument("--pseudo-epochs", type=int, default=500, help="MLP training epochs")
    fit.add_argument(
        "--pseudo-hidden",
        type=int,
        default=64,
        help="width of the pseudo-margin MLP's hidden layers: its cost on every served request "
        "(docs/benchmarks.md compares 16 to 256 on the shipped model)",
    )
    fit.add_argument(
        "--pseudo-layers",
        type=int,
        default=2,
        help="hidden layers of the pseudo-margin MLP (0: a linear function of its input)",
    )
    run = parser.add_argument_group("store, sharding, output")
    run.add_argument(
        "--store",
        type=Path,
        default=None,
        help="artifact store folder (default: $MARGINWATCH_STORE, then ./artifacts)",
    )
    run.add_argument("--version", default=None, help="version name (default: UTC timestamp)")
    run.add_argument(
        "--shard",
        type=int,
        default=None,
        help="only attack shard I of --num-shards and exit (Kubernetes Indexed Job)",
    )
    run.add_argument("--num-shards", type=int, default=1, help="shard count")
    run.add_argument(
        "--merge",
        action="store_true",
        help="attack nothing: merge finished shards (fail if any is missing)",
    )
    run.add_argument("--json", action="store_true", help="print calibration.json, not a summary")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _summary(record) -> str:  # type: ignore[no-untyped-def]
    estimate = record.robust_accuracy
    lines = [
        f"model            {record.model_name}  version {record.version}",
        f"threat model     {record.threat_model.norm}  ε = {record.threat_model.eps:g}",
        f"score            {record.score_kind}   λ = {record.threshold:.4f} "
        f"({record.threshold_rule}), guard band {record.guard_band:.1e}",
        f"subset           {record.subset.size} points of {record.subset.dataset}:"
        f"{record.subset.split}, seed {record.subset.seed}, {record.censored} censored",
        f"consistency      Kendall τ = {record.kendall_tau:.3f}",
        f"detection        AUROC {record.auroc:.3f}  AUPR {record.aupr:.3f}  "
        f"FPR@95 {record.fpr_at_95_tpr:.3f}",
        f"subset accuracy  clean {record.subset_clean_accuracy:.3f}  "
        f"robust {record.subset_robust_accuracy:.3f}",
    ]
    for item in record.robust_accuracy_estimates:
        marker = "*" if item.method == estimate.method else " "
        lines.append(
            f"robust accuracy{marker} {item.method:10s} {item.estimate:.3f} "
            f"[{item.ci_low:.3f}, {item.ci_high:.3f}] on {record.big_set.size} points"
        )
    if record.pseudo_margin is not None:
        facts = record.pseudo_margin
        lines.append(
            f"pseudo-margin    τ {facts.logit_margin_tau:.3f} → {facts.pseudo_margin_tau:.3f}, "
            f"AUROC {facts.logit_margin_auroc:.3f} → {facts.pseudo_margin_auroc:.3f} "
            f"({'chosen' if facts.chosen else 'not chosen'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that `--help` answers at once.
    from marginwatch.artifact import store
    from marginwatch.calibration.config import CalibrationConfig, ConfigError, parse_attack
    from marginwatch.calibration.job import CalibrationError, run

    try:
        config = CalibrationConfig(
            model=args.model, weights=args.weights, model_name=args.name, dataset=args.dataset,
            data_dir=args.data_dir, split=args.split, subset_size=args.subset_size,
            seed=args.seed, norm=args.norm, eps=args.eps,
            attacks=tuple(parse_attack(a) for a in args.attacks or ()),
            attack_batch_size=args.attack_batch_size, threshold_rule=args.threshold_rule,
            target_tpr=args.target_tpr, estimator=args.estimator, bootstrap=args.bootstrap,
            pseudo_margin=args.pseudo_margin, tau_cutoff=args.tau_cutoff,
            pseudo_train_size=args.pseudo_train_size, pseudo_input=args.pseudo_input,
            pseudo_epochs=args.pseudo_epochs, pseudo_hidden=args.pseudo_hidden,
            pseudo_layers=args.pseudo_layers, device=args.device,
            store=args.store or store.default_store(), shard=args.shard,
            num_shards=args.num_shards, merge_only=args.merge, version=args.version,
            progress=not args.quiet and not args.json,
        )  # fmt: skip
        result = run(config)
    except ConfigError as error:
        print(f"marginwatch-calibrate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except store.StoreBusy as error:
        print(f"marginwatch-calibrate: {error}; try again later", file=sys.stderr)
        return EXIT_BUSY
    except (CalibrationError, store.ArtifactError, OSError) as error:
        print(f"marginwatch-calibrate: failed, store unchanged: {error}", file=sys.stderr)
        return EXIT_FAILED
    if result.record is None:
        print(f"shard {result.shard_done} of {config.num_shards} done")
        return 0
    if args.json:
        print(json.dumps(result.record.model_dump(mode="json"), indent=2))
    else:
        print(_summary(result.record))
        print(f"published {os.path.relpath(result.version_dir or '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
