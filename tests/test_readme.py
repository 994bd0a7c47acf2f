"""Every fenced block of README.md and deploy/README.md, run as a reader would run it, so that the
documents cannot drift from what the code does.

Each block is one test, in document order, in one working copy of the repository
(`readme_walk.py`). A command block (```sh, ```python) runs as written, after the commands above
it in its section; a block that starts a server (`make serve`, `marginwatch-serve`) runs in the
background until the next one; the output block shown right after a command is compared with what
it printed (`readme_blocks.py`: JSON by keys and values, text by line shape, numbers as shown
unless `VARYING` says they vary). A block added later is picked up: a command runs as written; any
other block fails until `RULES` says how to check it.

Blocks that cannot run here as written have an explicit equivalent in `RULES`, named and
explained: no Docker engine, no cluster, no registry, no torch index, no full Fashion-MNIST, and
`make test` would run this suite inside itself. Commands that train, export or calibrate are
marked slow.
"""

from __future__ import annotations

import ast
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from readme_blocks import Block, masked, output_mismatch, read_blocks
from readme_walk import ROOT, Walk, copy_checkout, is_server, prerequisites

DOCUMENTS = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
BLOCKS = [block for path in DOCUMENTS for block in read_blocks(path, ROOT)]
SLOW = re.compile(
    r"marginwatch-calibrate (?!--help)|marginwatch-train|marginwatch-export|torch\.jit"
)
# Shown outputs whose figures vary from run to run: a fresh subset each calibration, timings.
# Keyed by a pattern of the command; JSON: keys whose values need only the shown type; text:
# numbers compared by shape only.
VARYING: dict[str, frozenset[str]] = {
    r"v1/models/my-cnn/predict": frozenset(
        {"threshold", "calibration_version", "p_robust", "margin_estimate", "margin_interval"}
    ),
    r"--preflight-only|--pseudo-margin never": frozenset({"<numbers>"}),
}


@dataclass(frozen=True)
class Rule:
    """How to check a block that cannot run as written (or is no command): `check` runs."""

    pattern: str
    why: str
    check: Callable[[Walk, Block, pytest.FixtureRequest], None]


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    root = tmp_path_factory.mktemp("checkout")
    copy_checkout(root)
    state = Walk(root)
    try:
        yield state
    finally:
        state.stop_server()


# --- running a block -------------------------------------------------------------------------


def run_command(walk: Walk, block: Block) -> None:
    """A command block as written; its shown output, if any, compared with what it printed."""
    if is_server(block):
        walk.start_server(block)
        return
    out = walk.run(block)
    if block.output is None:
        _no_error_body(block, out)
        return
    vary = next((v for p, v in VARYING.items() if re.search(p, block.text)), frozenset())
    problem = output_mismatch(block.output, out, vary=vary, exact_numbers="<numbers>" not in vary)
    assert problem is None, f"{block.label}: output differs from the README's: {problem}"


def _no_error_body(block: Block, out: str) -> None:
    """curl -s exits 0 on an HTTP error: a JSON answer must not be an error."""
    try:
        body = json.loads(out)
    except ValueError:
        return
    assert not (isinstance(body, dict) and "error" in body), f"{block.label}: {body}"


def execute(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """`block` after its prerequisites (each run once per walk), with the right server up."""
    for before in [*prerequisites(block, BLOCKS), block]:
        key = (before.name, before.line)
        servers = [b for b in BLOCKS[: BLOCKS.index(before)] if is_server(b)]
        wanted = servers[-1] if servers and not is_server(before) else None
        if key in walk.done and not (is_server(before) and before is not block):
            continue
        if wanted is not None and walk.server_block is not wanted and _talks(before):
            execute(walk, wanted, request)
        rule = rule_for(before)
        if rule is not None:
            rule.check(walk, before, request)
        elif before.is_command:
            run_command(walk, before)
        else:
            pytest.fail(f"{before.label}: no rule runs this {before.language or 'text'} block")
        walk.done[key] = "ok"


def _talks(block: Block) -> bool:
    return re.search(r"localhost:\d+", block.text) is not None


def is_slow(block: Block) -> bool:
    return any(SLOW.search(b.text) for b in [*prerequisites(block, BLOCKS), block])


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=block.label, marks=[pytest.mark.slow] if is_slow(block) else [])
        for block in BLOCKS
    ],
)
def test_block(block: Block, walk: Walk, request: pytest.FixtureRequest) -> None:
    execute(walk, block, request)


def test_every_rule_matches_a_block() -> None:
    """A rule whose block is gone (or changed beyond its pattern) is stale."""
    for rule in RULES:
        assert any(re.search(rule.pattern, b.text, re.M) for b in BLOCKS), rule.pattern


def test_settings_table_names_real_settings() -> None:
    """The README's table of settings: each variable is a field of the service's settings, and
    the flag beside it is that field's flag."""
    from marginwatch.service.settings import Settings

    rows = re.findall(r"^\| `MARGINWATCH_(\w+)` \| `(--[\w-]+)` \|", DOCUMENTS[0].read_text(), re.M)
    assert len(rows) >= 5, rows
    for variable, flag in rows:
        assert variable.lower() in Settings.model_fields, variable
        assert flag == f"--{variable.lower().replace('_', '-')}", flag


def rule_for(block: Block) -> Rule | None:
    return next((rule for rule in RULES if re.search(rule.pattern, block.text, re.M)), None)


# --- README.md: the equivalents --------------------------------------------------------------


def quick_start(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """`make serve` runs for real (on a free port, through make's own PORT variable); `make
    test` and `make test-fast` would run this suite inside itself: their dry runs must reach
    pytest."""
    assert block.text.splitlines()[0].startswith("make serve ")
    walk.start_server(Block(block.name, block.line, "sh", "make serve", block.section))
    for target in ("test", "test-fast"):
        assert re.search(rf"^make {target}\b", block.text, re.M)
        dry = walk.run(block, f"make -n {target}")
        assert "-m pytest" in dry, dry


def make_calibrate(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """`make calibrate` takes minutes on the full Fashion-MNIST (not installed here): its dry run
    must be the plain command, whose defaults are what the comment says. `--help` runs."""
    from marginwatch.calibration.config import DEFAULT_EPS, CalibrationConfig

    dry = walk.run(block, "make -n calibrate").strip()
    assert dry == ".venv/bin/marginwatch-calibrate", dry
    fields = CalibrationConfig.model_fields
    comment = block.text.splitlines()[0]
    assert fields["model"].default in comment and fields["norm"].default == "linf"
    assert fields["dataset"].default == "fashion-mnist" and "Fashion-MNIST" in comment
    assert f"ε = {DEFAULT_EPS['linf']:g}" in comment
    assert f"{fields['subset_size'].default} points" in comment
    assert "--help" in block.text.splitlines()[1]
    assert "usage: marginwatch-calibrate" in walk.run(block, block.text.splitlines()[1])


def fashion_mnist_stand_in(folder: Path, train: int = 128, test: int = 64) -> Path:
    """IDX files as Debian's dataset-fashion-mnist installs them, holding images of the shipped
    subset (the full set is not installed here)."""
    from marginwatch.models.data import load_dataset

    data = load_dataset("fashion-mnist-subset", "test")
    splits = {"train": slice(0, train), "t10k": slice(train, train + test)}
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, rows in splits.items():
        images, labels = data.images[rows, 0], data.labels[rows].astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return folder


def training(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """The command as written, on a stand-in Fashion-MNIST of 128 training and 64 test images
    from the shipped subset (the full set is `apt-get install dataset-fashion-mnist`); it writes
    the weights and the model card the README names."""
    data = fashion_mnist_stand_in(walk.root / "stand-in-fashion-mnist")
    walk.run(block, MARGINWATCH_FASHION_MNIST_DIR=str(data))
    out = re.search(r"--out (\S+)", block.text)
    assert out is not None
    for suffix in (".safetensors", ".json"):
        assert (walk.root / (out.group(1) + suffix)).is_file(), suffix


def traffic_check(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """The check as written, on traffic that `make serve` sampled into `./traffic`
    (MARGINWATCH_TRAFFIC_DIR, every input sampled) from one request of 12 subset images."""
    from marginwatch.models.data import load_dataset

    folder = re.search(r"--traffic (\S+)", block.text)
    assert folder is not None
    serve = Block(block.name, block.line, "sh", "make serve", block.section)
    walk.start_server(serve, MARGINWATCH_TRAFFIC_DIR=str(walk.root / folder.group(1)),
                      MARGINWATCH_TRAFFIC_SAMPLE_RATE="1")  # fmt: skip
    images = load_dataset("fashion-mnist-subset", "test").float_images[:12]
    url = f"http://127.0.0.1:{walk.ports['api']}/v1/models/fmnist-cnn-pgd/predict"
    assert httpx.post(url, json={"inputs": images.tolist()}, timeout=30).status_code == 200
    walk.stop_server()  # the sampler writes its last shard at shutdown
    walk.run(block)
    current = (walk.root / "artifacts" / "fmnist-cnn-pgd" / "CURRENT").read_text().strip()
    assert (walk.root / "artifacts" / "fmnist-cnn-pgd" / current / "traffic-check.json").is_file()


def image_folder_layout(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """The drawing of the two layouts, built as drawn (small images of each named format) and
    read the way `--dataset` reads it: the class folders are the classes, one split is the test
    split only, two splits give both."""
    from marginwatch.models.data import DataError, load_dataset

    lines = block.text.splitlines()
    column = lines[0].index("two splits")
    for side, splits in ((slice(0, column), ["test"]), (slice(column, None), ["train", "test"])):
        files = [line[side].strip() for line in lines[1:] if line[side].strip()]
        root = walk.root / "layouts" / str(len(splits)) / files[0]
        for name in files[1:]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 128).save(root / name)
        for split in splits:
            prefix = f"{split}/" if len(splits) == 2 else ""
            drawn = [name for name in files[1:] if name.startswith(prefix)]
            data = load_dataset(str(root), split)  # type: ignore[arg-type]
            assert len(data.labels) == len(drawn)
            assert list(data.class_names) == sorted({Path(name).parent.name for name in drawn})
        if splits == ["test"]:
            with pytest.raises(DataError):
                load_dataset(str(root), "train")


def refusal_examples(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """Examples of preflight refusals: one `marginwatch-calibrate: ` line each, and each the
    message a case of tests/calibration/test_preflight.py provokes and checks (read from its
    source, compared with the figures masked)."""
    source = (ROOT / "tests" / "calibration" / "test_preflight.py").read_text()
    checked = [
        _quotes_masked(node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 15
    ]
    for line in block.text.splitlines():
        assert line.startswith("marginwatch-calibrate: "), line
        message = _quotes_masked(line.removeprefix("marginwatch-calibrate: "))
        assert any(fragment in message for fragment in checked), f"no preflight test: {line}"


def _quotes_masked(text: str) -> str:
    """`masked`, with quoted names ('my-cnn') masked too: the tests use their own."""
    return masked(re.sub(r"'[^']*'", "<q>", text))


# --- deploy/README.md: the equivalents -------------------------------------------------------


def docker_build(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No Docker engine here: hadolint passes on the Dockerfile, every `--target` is a stage of
    it, every `--build-arg` one of its ARGs, and a lock named there exists (the serve stages'
    commands themselves run in tests/deploy/test_dockerfile.py)."""
    hadolint = request.getfixturevalue("hadolint")
    walk.run(block, f"{hadolint} Dockerfile")
    dockerfile = (walk.root / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    arguments = set(re.findall(r"^ARG ([A-Z_]+)", dockerfile, re.M))
    targets = re.findall(r"--target (\S+)", block.text)
    assert targets and set(targets) <= stages, (targets, stages)
    for name, value in re.findall(r"--build-arg ([A-Z_]+)=(\S+)", block.text):
        assert name in arguments, name
        assert value.startswith("<") or (walk.root / value).is_file(), value


def kubectl_apply(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No cluster here: `kubectl apply -k X` becomes `kubectl kustomize X` (the project's kubectl,
    kustomize v5), which must build; tests/deploy validates what it builds."""
    kubectl = request.getfixturevalue("kubectl")
    folders = re.findall(r"kubectl apply -k (\S+)", block.text)
    assert folders
    for folder in folders:
        built = list(yaml.safe_load_all(walk.run(block, f"{kubectl} kustomize {folder}")))
        assert any(doc and doc["kind"] == "ConfigMap" for doc in built), folder


def operator_overlay(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """The overlay as written, `<path>` being the copy's root, built with `kubectl kustomize`:
    the component's PodMonitor and PrometheusRule, and the label on every object."""
    kubectl = request.getfixturevalue("kubectl")
    overlay = walk.root / "my-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(block.text.replace("<path>", ".."))
    built = [doc for doc in yaml.safe_load_all(walk.run(block, f"{kubectl} kustomize {overlay}"))]
    kinds = {doc["kind"] for doc in built}
    assert {"PodMonitor", "PrometheusRule", "Deployment"} <= kinds, kinds
    assert all(doc["metadata"]["labels"]["release"] == "kube-prometheus-stack" for doc in built)


def refresh_digests(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No registry here: the script as written, on the copy's Dockerfile, with a stand-in
    `crane` that answers one digest; every pin must then carry it."""
    digest = "sha256:" + "ab" * 32
    stand_in = walk.root / "stand-in-bin"
    stand_in.mkdir()
    (stand_in / "crane").write_text(f'#!/bin/sh\n[ "$1" = digest ] && echo {digest}\n')
    (stand_in / "crane").chmod(0o755)
    walk.run(block, f'PATH="{stand_in}:$PATH"\n{block.text}')
    dockerfile = (walk.root / "Dockerfile").read_text()
    pins = re.findall(r"^ARG [A-Z_]+=\S+@(sha256:\w+)$", dockerfile, re.M)
    assert pins and set(pins) == {digest}, pins


def make_lock(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No torch index here: the dry run of `make lock` runs deploy/images/lock.sh, which reads
    both variables the block names."""
    dry = walk.run(block, "make -n lock")
    assert "deploy/images/lock.sh" in dry, dry
    script = (walk.root / "deploy" / "images" / "lock.sh").read_text()
    for variable in re.findall(r"\b(TORCH_[A-Z_]+)=", block.text):
        assert f"${{{variable}" in script, variable


def kustomize_edit(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No kustomize binary here (kubectl has no `edit`): the overlay holds an `images:` entry for
    each name the block sets, and setting its `newName` as the edit would moves the built
    images there."""
    kubectl = request.getfixturevalue("kubectl")
    overlay = walk.root / "deploy" / "kubernetes" / "overlays" / "registry" / "kustomization.yaml"
    spec = yaml.safe_load(overlay.read_text())
    edits = dict(re.findall(r"set image (\S+)=(\S+)", block.text))
    entries = {entry["name"]: entry for entry in spec["images"]}
    assert set(edits) == set(entries), (edits, entries)
    for name, target in edits.items():
        entries[name]["newName"] = target.replace("<registry>/<path>", "registry.test/team")
    overlay.write_text(yaml.safe_dump(spec))
    built = walk.run(block, f"{kubectl} kustomize {overlay.parent}")
    images = set(re.findall(r"image: (\S+)", built))
    assert images == {f"registry.test/team/{name}:0.1.0" for name in edits}, images


def docker_compose(walk: Walk, block: Block, request: pytest.FixtureRequest) -> None:
    """No Docker engine here: the compose file builds the Dockerfile's `serve` stage and publishes
    what the README's next paragraph names (8000, 9090, 3000)."""
    path = re.search(r"-f (\S+)", block.text)
    assert path is not None
    compose = yaml.safe_load((walk.root / path.group(1)).read_text())
    dockerfile = (walk.root / "Dockerfile").read_text()
    target = compose["services"]["marginwatch"]["build"]["target"]
    assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, re.M), target
    published = {port.split(":")[0] for s in compose["services"].values() for port in s["ports"]}
    assert published == {"8000", "9090", "3000"}, published


RULES = [
    Rule(r"^make test\b", "make test would run this suite inside itself", quick_start),
    Rule(r"^make calibrate\b", "minutes, on the full Fashion-MNIST", make_calibrate),
    Rule(r"^marginwatch-train ", "the full Fashion-MNIST is not installed here", training),
    Rule(r"^marginwatch-calibrate --traffic ", "needs sampled traffic", traffic_check),
    Rule(r"^one split", "a drawing of folders", image_folder_layout),
    Rule(r"^marginwatch-calibrate: ", "examples of refusals", refusal_examples),
    Rule(r"^docker build ", "no Docker engine", docker_build),
    Rule(r"^kubectl apply -k ", "no cluster", kubectl_apply),
    Rule(r"^# your overlay's kustomization.yaml", "a template", operator_overlay),
    Rule(r"^deploy/images/refresh-digests.sh", "no registry", refresh_digests),
    Rule(r"make lock$", "no torch index", make_lock),
    Rule(r"^kustomize edit ", "no kustomize binary", kustomize_edit),
    Rule(r"^docker compose ", "no Docker engine", docker_compose),
]
