"""The service beside the serving frameworks users would pick instead, side by side (issue 21).

marginwatch (`marginwatch-serve`, the shipped model in `artifacts/`, its flag on) and its peers
all serve the SAME ONNX graph (the current version's `model.onnx`) with ONNX Runtime at one
intra-op thread, and answer the SAME one-image Open Inference Protocol v2 JSON body (the first
Fashion-MNIST test image, `request_body("v2", ...)` of bench/serve_load.py) with the label and
`brittle = score < λ` (λ from the version's calibration.json). The body names no outputs, so
the service answers all of its own (logits, label, score, brittle, borderline, ...) where the
peers answer two: if anything, that is to the service's cost (`--outputs label brittle` asks it
for the peers' two).

- `minimal`: the hand-written FastAPI endpoint of bench/minimal_baseline.py (its v2 route, which
  answers `label` and `score`: its flag is checked as `score < λ`), in the project's environment;
- `litserve`, `kserve` (`kserve.Model`, v2 REST), `mlserver` (an `MLModel`, v2 REST), `bentoml`
  (one API taking the body), `ray` (one Ray Serve deployment, 1 replica, behind its HTTP proxy):
  bench/peer_<name>.py, each in its own virtual environment that this bench makes on first use
  under `--peers-dir` (`pip install <framework> onnxruntime==<the project's> numpy`; a framework
  that pulls in torch or CUDA, or fails to install, is reported as "did not install" and left out).

Each round starts every server in turn (the order rotated each round), checks that it answers
the load body and a brittle and a robust test image with the label and flag ONNX Runtime gives
directly, warms it up, measures it at each concurrency, and stops it with everything it started.
Every server runs under the same CPU affinity (`--server-cpus`, default every CPU this bench may
use; wrk: `--client-cpus`, the same). Splitting two cores into one for the server and one for
wrk would leave wrk's core mostly idle and starve the servers that work in several threads or
processes (the service's model thread under backlog, LitServe's and Ray Serve's processes); on a
bigger machine, give each side CPUs of its own.

The load generator is wrk: one thread, as many connections as the concurrency, the body posted
by a Lua script that counts the statuses. One thread drives far more than these servers answer
here (wrk spent about 40 µs of CPU per request on this 2-core machine, 10-15 % of a core) and
leaves the rest of the cores to the server; it also allows concurrency 1. (The asyncio client of
bench/serve_load.py spent about 1.6× that per request, on cores the servers share: no
substitute, so wrk is required.)

Per server and concurrency the table gives the median over rounds of the successful answers per
second and of wrk's p50 and p99 latency, and the ratio marginwatch / peer: the median of the
per-round ratios (each from the same minutes), then each round's. The machine's state (CPUs,
load average) is printed and written with the points.

    .venv/bin/python bench/peers.py                     # 3 rounds, everything: about 11 minutes
    .venv/bin/python bench/peers.py --peers minimal kserve --rounds 1 --duration-s 2
    .venv/bin/python bench/peers.py --out bench/results/peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
from overload import WRK_LUA, parse_wrk  # siblings: Python puts a script's folder on the path
from peer_common import FlaggedOnnx, Spec
from peer_envs import InstallFailed, Peer, ensure, project_versions
from peer_process import Expected, ServerFailed, check, serving, wait_answering
from serve_load import free_port, median_ratio, request_body, server_command

from marginwatch.artifact.store import current_dir, default_store, list_models, read_record
from marginwatch.models.data import load_dataset

PROJECT = Path(__file__).resolve().parent.parent
PEERS = {
    peer.name: peer
    for peer in (
        Peer("litserve", "litserve", "litserve"),
        Peer("kserve", "kserve", "kserve"),
        Peer("mlserver", "mlserver", "mlserver"),
        Peer("bentoml", "bentoml", "bentoml"),
        Peer("ray", "ray[serve]", "ray"),
    )
}
CHOICES = ("minimal", *PEERS)
# quiet servers that phone no one: no usage reports, no per-request log lines
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "BENTOML_DO_NOT_TRACK": "true",
         "KSERVE_LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1",
         "MARGINWATCH_INTRA_OP_THREADS": "1"}  # fmt: skip
WRK_TIMEOUT_S = 30  # far beyond any latency here: wrk leaves a timed-out request out of its figures


@dataclass
class Point:
    server: str
    concurrency: int
    round: int
    requests: int
    errors: int  # non-200 answers, time-outs and socket errors
    requests_per_s: float  # 200 answers per second
    p50_ms: float
    p99_ms: float
    load_average: float  # the 1-minute load average when the point ended

    def line(self) -> str:
        return (f"  {self.server:12s} conc {self.concurrency:3d}: {self.requests_per_s:7.0f} req/s"
                f"  p50 {self.p50_ms:7.2f} ms  p99 {self.p99_ms:7.2f} ms  errors {self.errors}"
                f"  load {self.load_average:.1f}")  # fmt: skip


@dataclass
class Bench:
    """What every measurement shares: the options, the model, the body and the checks."""

    args: argparse.Namespace
    store: Path
    spec: Spec  # model, onnx and λ (its port is set per start)
    script: Path  # wrk's, posting the load body
    checks: list[tuple[bytes, Expected]]  # a body, and its labels and flags from ORT
    logs: Path


def make_checks(spec: Spec, outputs: list[str]) -> list[tuple[bytes, Expected]]:
    """The load body (the first test image), then the first brittle and the first robust image
    other than it, each with the label and flag from ONNX Runtime run here directly."""
    images = load_dataset("fashion-mnist-subset", "test").float_images
    labels, brittle = FlaggedOnnx(spec.onnx, spec.threshold)(images)
    chosen = [0]
    for wanted in (True, False):
        chosen += [int(i) for i in np.flatnonzero(brittle == wanted)[:2] if i != 0][:1]
    return [(body(images[i : i + 1], outputs), ([int(labels[i])], [bool(brittle[i])]))
            for i in chosen]  # fmt: skip


def body(images: np.ndarray, outputs: list[str]) -> bytes:
    """bench/serve_load.py's OIP v2 JSON body, asking for `outputs` by name when there are any
    (the peers answer their two whatever the body asks; the service answers what is asked)."""
    shared = request_body("v2", images)
    if not outputs:
        return shared
    return orjson.dumps({**orjson.loads(shared), "outputs": [{"name": n} for n in outputs]})


def command(name: str, bench: Bench, port: int) -> list[str]:
    """The server's command line, under the bench's CPU affinity."""
    pinned = ["taskset", "-c", bench.args.server_cpus]
    if name in ("marginwatch", "minimal"):
        return [*pinned, *server_command(name, bench.store, bench.spec.model, port, 1)]
    venv = bench.args.peers_dir / name / "bin"
    if name == "bentoml":  # BentoML's own command: its worker imports the service by name
        return [*pinned, str(venv / "bentoml"), "serve", "peer_bentoml:OnnxPeer", "--working-dir",
                str(PROJECT / "bench"), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return [*pinned, str(venv / "python"), str(PROJECT / "bench" / f"peer_{name}.py")]


def run_wrk(bench: Bench, port: int, connections: int, duration_s: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}{bench.spec.path}"
    line = ["taskset", "-c", bench.args.client_cpus, "wrk", "-t", "1", "-c", str(connections),
            "-d", f"{duration_s}s", "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(bench.script),
            url]  # fmt: skip
    try:
        done = subprocess.run(
            line, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise ServerFailed(f"wrk did not finish in {duration_s + 60} s") from error
    if done.returncode != 0 or "RESULT " not in done.stdout:
        raise ServerFailed(f"wrk failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return parse_wrk(done.stdout)


def to_point(server: str, concurrency: int, round_: int, result: dict[str, float]) -> Point:
    return Point(server, concurrency, round_, int(result["requests"]), int(result["failed"]),
                 result["ok_per_s"], result["p50_us"] / 1e3, result["p99_us"] / 1e3,
                 os.getloadavg()[0])  # fmt: skip


def measure(name: str, bench: Bench, round_: int) -> list[Point]:
    """Start, check, warm up, measure at each concurrency, stop."""
    port = free_port()
    spec = Spec(bench.spec.model, bench.spec.onnx, bench.spec.threshold, port)
    env = {**QUIET, **spec.env()}
    points = []
    log = bench.logs / f"{name}.log"
    with serving(command(name, bench, port), env, log, cwd=PROJECT) as process:
        wait_answering(port, spec.path, bench.checks[0][0], process,
                       timeout_s=bench.args.start_timeout_s, log=log)  # fmt: skip
        check(port, spec.path, bench.checks, threshold=spec.threshold)
        run_wrk(bench, port, 8, bench.args.warmup_s)
        for concurrency in bench.args.concurrency:
            result = run_wrk(bench, port, concurrency, bench.args.duration_s)
            points.append(to_point(name, concurrency, round_, result))
            print(points[-1].line(), flush=True)
    return points


def run_rounds(bench: Bench, servers: list[str]) -> tuple[list[Point], list[dict[str, str | int]]]:
    points: list[Point] = []
    failures: list[dict[str, str | int]] = []
    for round_ in range(bench.args.rounds):
        shift = round_ % len(servers)
        order = servers[shift:] + servers[:shift]
        print(f"round {round_ + 1} of {bench.args.rounds}: {', '.join(order)}", flush=True)
        for name in order:
            try:
                points += measure(name, bench, round_)
            except ServerFailed as failure:
                print(f"  {name}: FAILED: {failure} (its output: {bench.logs / name}.log)",
                      flush=True)  # fmt: skip
                failures.append({"server": name, "round": round_, "reason": str(failure)})
    return points, failures


def table(points: list[Point], servers: list[str], concurrency: list[int]) -> list[str]:
    """Markdown: per concurrency and server, medians over rounds and marginwatch / server."""
    rows = ["| conc | server | req/s | p50 ms | p99 ms | marginwatch / server (rounds) |",
            "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    by_round = {(p.server, p.concurrency, p.round): p for p in points}
    for conc in concurrency:
        for server in servers:
            group = [p for p in points if p.server == server and p.concurrency == conc]
            if not group:
                continue
            rate, p50, p99 = (float(np.median([getattr(p, field) for p in group]))
                              for field in ("requests_per_s", "p50_ms", "p99_ms"))  # fmt: skip
            ratios = [ours.requests_per_s / p.requests_per_s for p in group
                      if (ours := by_round.get(("marginwatch", conc, p.round)))
                      and p.requests_per_s and server != "marginwatch"]  # fmt: skip
            rows.append(f"| {conc} | {server} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
                        f"{median_ratio(ratios)} |")  # fmt: skip
    return rows


def install_peers(names: list[str], args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    versions: dict[str, dict[str, str]] = {
        "marginwatch": project_versions("marginwatch", "onnxruntime", "numpy", "uvicorn"),
        "minimal": project_versions("fastapi", "uvicorn", "onnxruntime", "numpy"),
    }
    not_installed: dict[str, str] = {}
    for name in names:
        if name in PEERS:
            print(f"{name}: environment in {args.peers_dir / name} ...", flush=True)
            try:
                versions[name] = ensure(PEERS[name], args.peers_dir, reinstall=args.reinstall)
            except InstallFailed as failure:
                not_installed[name] = f"did not install: {failure}"
                print(f"  {not_installed[name]}", flush=True)
    return versions, not_installed


def machine(args: argparse.Namespace) -> dict[str, object]:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=PROJECT, text=True,
                            capture_output=True, check=False).stdout.strip()  # fmt: skip
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {"nproc": os.cpu_count(), "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus, "load_average": os.getloadavg(),
            "wrk": (wrk.stdout or wrk.stderr).split(" [")[0], "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    every = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
    parser = argparse.ArgumentParser(
        prog="peers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peers", nargs="+", choices=CHOICES, default=list(CHOICES),
        help="the peers measured beside marginwatch (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="rounds; each starts every server once, in an order rotated from round to round",
    )  # fmt: skip
    parser.add_argument(
        "--duration-s", type=int, default=5,
        help="seconds of wrk per server and concurrency (whole seconds, as wrk takes them)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-s", type=int, default=1,
        help="seconds of wrk at concurrency 8 after each start and check, not measured",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", nargs="+", type=int, default=[1, 8, 32, 64],
        help="wrk's connections (one wrk thread), one measurement each",
    )  # fmt: skip
    parser.add_argument(
        "--outputs", nargs="+", default=[], metavar="NAME",
        help="name these outputs in the body (e.g. label brittle: what the peers answer); "
        "default: none, the shared body, and the service answers all of its outputs",
    )  # fmt: skip
    parser.add_argument(
        "--server-cpus", default=every,
        help=f"CPUs every server runs on, as taskset lists them (default: {every})",
    )  # fmt: skip
    parser.add_argument("--client-cpus", default=every, help=f"CPUs wrk runs on (default: {every})")
    parser.add_argument(
        "--start-timeout-s", type=float, default=180.0,
        help="how long a server may take to answer its first request (Ray Serve: about 15 s)",
    )  # fmt: skip
    parser.add_argument(
        "--peers-dir", type=Path, default=PROJECT / "bench" / ".peers",
        help="where the peers' virtual environments are made (git-ignored) and the servers' "
        "output is written (logs/<server>.log, overwritten at each start)",
    )  # fmt: skip
    parser.add_argument(
        "--reinstall", action="store_true",
        help="make the peers' virtual environments again, with the newest releases",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write the command, machine state, versions, failures and points here as JSON "
        "(bench/results/peers.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    problem = bad_args(args)
    if problem:
        print(f"peers.py: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return args


def bad_args(args: argparse.Namespace) -> str | None:
    """One line naming what is wrong and the flag that fixes it, or None."""
    if args.rounds < 1 or args.duration_s < 1 or args.warmup_s < 1:
        return "--rounds, --duration-s and --warmup-s must be at least 1"
    if min(args.concurrency) < 1:
        return "--concurrency: every value must be at least 1"
    allowed = os.sched_getaffinity(0)
    for flag, cpus in (("--server-cpus", args.server_cpus), ("--client-cpus", args.client_cpus)):
        if not cpu_list(cpus) or not cpu_list(cpus) <= allowed:
            return f"{flag} {cpus!r}: give CPUs of {sorted(allowed)}, e.g. 0,1 or 0-1"
    if shutil.which("wrk") is None:
        return (
            "wrk is not on the PATH: install it (apt-get install wrk); bench/serve_load.py's "
            "asyncio client costs about 1.6x wrk's CPU per request, so it is no substitute"
        )
    return None


def cpu_list(text: str) -> set[int]:
    """taskset's CPU list form ("0,2-3") as a set; empty when it is not one."""
    cpus: set[int] = set()
    with contextlib.suppress(ValueError):
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus |= set(range(int(low), int(high or low) + 1))
        return cpus
    return set()


def prepare(args: argparse.Namespace, scratch: Path) -> Bench:
    store = default_store()
    models = list_models(store)
    if not models:
        print(f"peers.py: no calibrated model in {store}: calibrate one first", file=sys.stderr)
        raise SystemExit(2)
    version = current_dir(store, models[0])
    spec = Spec(models[0], str(version / "model.onnx"), read_record(version).threshold, 0)
    checks = make_checks(spec, args.outputs)
    (scratch / "body.json").write_bytes(checks[0][0])
    (scratch / "post.lua").write_text(WRK_LUA.format(body=scratch / "body.json"))
    logs = args.peers_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return Bench(args, store, spec, scratch / "post.lua", checks, logs)


def shown_path(path: str | Path) -> str:
    """`path` as the results file records it: relative to the checkout where it lies inside it,
    so that no machine's folders are written into a tracked file."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(PROJECT)) if resolved.is_relative_to(PROJECT) else resolved.name


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    state = machine(args)
    print(f"machine: {state}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        bench = prepare(args, Path(scratch))
        print(f"model {bench.spec.model} ({Path(bench.spec.onnx).parent.name}), "
              f"λ {bench.spec.threshold:.4f}; checks: {[c[1] for c in bench.checks]}")  # fmt: skip
        versions, not_installed = install_peers(args.peers, args)
        servers = ["marginwatch", *(name for name in args.peers if name not in not_installed)]
        points, failures = run_rounds(bench, servers)
    state["load_average_end"] = os.getloadavg()
    print(f"\nversions: {json.dumps(versions)}")
    for name, reason in not_installed.items():
        print(f"{name}: {reason}")
    for failure in failures:
        print(f"{failure['server']}, round {int(failure['round']) + 1}: {failure['reason']}")
    print("\n" + "\n".join(table(points, servers, args.concurrency)))
    print(f"\nmachine at the end: load average {state['load_average_end']}; "
          f"{time.monotonic() - started:.0f} s in all")  # fmt: skip
    if args.out:
        spec = asdict(bench.spec) | {"onnx": shown_path(bench.spec.onnx)}
        record = {"command": sys.argv, "machine": state, "settings": vars(args) | {
                      "peers_dir": shown_path(args.peers_dir), "out": shown_path(args.out)},
                  "model": spec, "versions": versions,
                  "not_installed": not_installed, "failures": failures,
                  "points": [asdict(p) for p in points]}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
