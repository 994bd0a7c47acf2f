"""Every kustomization builds with `kubectl kustomize`, and what it builds is valid for Kubernetes
1.29+ and consistent with itself.

There is no cluster here, so no API server validates. Instead: every apiVersion/kind is one that
Kubernetes 1.29 serves (GA, none removed since) or a custom resource whose CRD is vendored
(test_custom_resources.py validates those against it); the fields the API server requires are
present; and references resolve inside the build (selectors select a pod template, named ports
exist, volumes are declared, claims and ConfigMaps exist, the HPA's target exists). The pod
security settings every workload must carry are checked on every pod template, the
calibration jobs' included.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
SHARDED_JOB = K8S / "calibration-sharded-job.yaml"

# (apiVersion, kind) -> namespaced. All GA in Kubernetes 1.29 and still served.
CORE = {
    ("v1", "Namespace"): False,
    ("v1", "ConfigMap"): True,
    ("v1", "PersistentVolumeClaim"): True,
    ("v1", "Service"): True,
    ("apps/v1", "Deployment"): True,
    ("batch/v1", "CronJob"): True,
    ("batch/v1", "Job"): True,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): True,
    ("policy/v1", "PodDisruptionBudget"): True,
    ("networking.k8s.io/v1", "NetworkPolicy"): True,
}
# Custom resources, validated against their vendored CRDs in test_custom_resources.py.
CUSTOM = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.{1,15}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


@dataclass
class Pod:
    """A pod template as a workload (or KServe's merge of runtime and predictor) defines it."""

    owner: str
    labels: dict[str, str]
    spec: dict[str, Any]

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.spec.get("containers", [])

    def port_names(self) -> set[str]:
        ports = [port for c in self.containers for port in c.get("ports", [])]
        return {port["name"] for port in ports if "name" in port}


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def kserve_pod(isvc: dict[str, Any], runtimes: list[dict[str, Any]]) -> Pod:
    """The predictor pod KServe makes: the runtime's `kserve-container` merged with the
    predictor's model spec (lists by key, as its strategic merge does), the runtime's volumes
    with the predictor's, the predictor's pod-level settings."""
    predictor = isvc["spec"]["predictor"]
    model = predictor.get("model", {})
    runtime = next(r for r in runtimes if r["metadata"]["name"] == model.get("runtime"))
    containers = runtime["spec"]["containers"]
    container = dict(next(c for c in containers if c["name"] == "kserve-container"))
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    mounts.update({m["mountPath"]: m for m in model.get("volumeMounts", [])})
    container["volumeMounts"] = list(mounts.values())
    volumes = {v["name"]: v for v in runtime["spec"].get("volumes", [])}
    volumes.update({v["name"]: v for v in predictor.get("volumes", [])})
    pod_fields = ("securityContext", "enableServiceLinks", "automountServiceAccountToken")
    spec = {key: predictor[key] for key in pod_fields if key in predictor}
    spec |= {"containers": [container], "volumes": list(volumes.values())}
    return Pod(name_of(isvc), predictor.get("labels", {}), spec)


def pods(objects: list[dict[str, Any]]) -> list[Pod]:
    found = []
    for obj in objects:
        template = None
        if obj["kind"] in ("Deployment", "Job"):
            template = obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
        if template is not None:
            labels = template["metadata"].get("labels", {})
            found.append(Pod(name_of(obj), labels, template["spec"]))
    runtimes = find(objects, "ServingRuntime")
    found += [kserve_pod(isvc, runtimes) for isvc in find(objects, "InferenceService")]
    return found


def selected(selector: dict[str, Any], candidates: list[Pod]) -> list[Pod]:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    wanted = selector.get("matchLabels", {})
    return [pod for pod in candidates if wanted.items() <= pod.labels.items()]


def problems(objects: list[dict[str, Any]]) -> Iterator[str]:
    """Everything wrong with a build, as messages (none: valid)."""
    every_pod = pods(objects)
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for obj in objects:
        yield from check_object(obj)
    for pod in every_pod:
        for problem in check_pod(pod, names):
            yield f"{pod.owner}: {problem}"
    yield from check_references(objects, every_pod, names)


def check_object(obj: dict[str, Any]) -> Iterator[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    meta = obj.get("metadata", {})
    label = f"{key[1]}/{meta.get('name')}"
    if key not in CORE and key not in CUSTOM:
        yield f"{label}: {key} is not served by Kubernetes 1.29 nor a vendored CRD"
    if not DNS_SUBDOMAIN.match(str(meta.get("name", ""))):
        yield f"{label}: metadata.name is not a DNS subdomain"
    namespaced = CORE.get(key, True)  # every custom resource here is namespaced
    if namespaced != ("namespace" in meta):
        yield f"{label}: namespace {'missing' if namespaced else 'set on a cluster object'}"
    yield from (f"{label}: {problem}" for problem in check_spec(str(key[1]), obj))


def check_spec(kind: str, obj: dict[str, Any]) -> Iterator[str]:
    """The fields the API server requires, and the rules it enforces, for the kinds used."""
    spec = obj.get("spec", {})
    required = {
        "Deployment": ["selector", "template"],
        "CronJob": ["schedule", "jobTemplate"],
        "Job": ["template"],
        "Service": ["ports", "selector"],
        "PersistentVolumeClaim": ["accessModes", "resources"],
        "HorizontalPodAutoscaler": ["scaleTargetRef", "maxReplicas"],
        "PodDisruptionBudget": ["selector"],
        "NetworkPolicy": ["podSelector"],
    }.get(kind, [])
    missing = [field for field in required if field not in spec]
    yield from (f"spec.{field} is required" for field in missing)
    if missing:
        return  # the checks below read those fields
    if kind == "Deployment" and not spec["selector"]["matchLabels"].items() <= (
        spec["template"]["metadata"]["labels"].items()
    ):
        yield "the selector does not select its own pod template"
    if kind == "PodDisruptionBudget" and ("minAvailable" in spec) == ("maxUnavailable" in spec):
        yield "exactly one of minAvailable and maxUnavailable"
    if kind == "HorizontalPodAutoscaler" and spec.get("minReplicas", 1) > spec["maxReplicas"]:
        yield "minReplicas above maxReplicas"
    if kind == "PersistentVolumeClaim" and not QUANTITY.match(
        str(spec["resources"]["requests"]["storage"])
    ):
        yield "storage request is not a quantity"
    if kind == "ConfigMap" and not all(isinstance(v, str) for v in obj.get("data", {}).values()):
        yield "ConfigMap data values must be strings"
    if kind in ("Job", "CronJob"):
        job = spec if kind == "Job" else spec["jobTemplate"]["spec"]
        if job["template"]["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
            yield "a Job's pods need restartPolicy Never or OnFailure"


def check_pod(pod: Pod, names: set[tuple[str, str]]) -> Iterator[str]:
    spec = pod.spec
    if not pod.containers:
        yield "no containers"
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    yield from check_pod_security(spec)
    for volume in volumes.values():
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and ("PersistentVolumeClaim", claim) not in names:
            yield f"volume {volume['name']}: no PersistentVolumeClaim {claim} in the build"
    for container in pod.containers:
        yield from (f"container {container.get('name')}: {p}" for p in check_container(container))
        mounts = container.get("volumeMounts", [])
        for mount in mounts:
            if mount["name"] not in volumes:
                yield f"mount {mount['mountPath']}: no volume {mount['name']}"
        if "/tmp" not in {mount["mountPath"] for mount in mounts}:
            yield "the root file system is read-only: /tmp needs a volume"
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None and ("ConfigMap", ref) not in names:
                yield f"envFrom: no ConfigMap {ref} in the build"


def check_pod_security(spec: dict[str, Any]) -> Iterator[str]:
    security = spec.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or security.get("runAsUser", 0) == 0:
        yield "the pod must run as a non-root user (runAsNonRoot, runAsUser)"
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        yield "seccompProfile RuntimeDefault missing"
    if spec.get("automountServiceAccountToken") is not False:
        yield "automountServiceAccountToken must be false (the pods call no API)"
    if spec.get("enableServiceLinks") is not False:
        yield "enableServiceLinks must be false (MARGINWATCH_PORT=tcp://… breaks the settings)"


def check_container(container: dict[str, Any]) -> Iterator[str]:
    if not DNS_LABEL.match(str(container.get("name", ""))):
        yield "name is not a DNS label"
    if not container.get("image"):
        yield "image is required"
    yield from check_ports_and_probes(container)
    for scope in ("requests", "limits"):
        for resource, amount in container.get("resources", {}).get(scope, {}).items():
            if not QUANTITY.match(str(amount)):
                yield f"resources.{scope}.{resource}: {amount!r} is not a quantity"
    security = container.get("securityContext", {})
    if security.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation must be false"
    if security.get("readOnlyRootFilesystem") is not True:
        yield "readOnlyRootFilesystem must be true"
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        yield "capabilities must drop ALL"


def check_ports_and_probes(container: dict[str, Any]) -> Iterator[str]:
    ports = container.get("ports", [])
    for port in ports:
        if not 0 < port["containerPort"] < 65536:
            yield f"containerPort {port['containerPort']} out of range"
        if "name" in port and not PORT_NAME.match(port["name"]):
            yield f"port name {port['name']} is not an IANA service name"
    names = {port.get("name") for port in ports}
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name)
        if probe is None:
            continue
        handlers = {"httpGet", "tcpSocket", "exec", "grpc"} & set(probe)
        if len(handlers) != 1:
            yield f"{probe_name} needs exactly one handler"
        port = probe.get("httpGet", {}).get("port")
        if isinstance(port, str) and port not in names:
            yield f"{probe_name}: no port named {port}"


def check_references(
    objects: list[dict[str, Any]], every_pod: list[Pod], names: set[tuple[str, str]]
) -> Iterator[str]:
    """Selectors select, named ports exist on what they select, targets exist."""
    serving = [pod for pod in every_pod if pod.labels.get("app.kubernetes.io/component") == "serve"]
    if len(serving) != 1:
        yield f"expected one serving pod template, found {[pod.owner for pod in serving]}"
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        selector = {
            "Service": {"matchLabels": spec.get("selector", {})},
            "PodDisruptionBudget": spec.get("selector"),
            "NetworkPolicy": spec.get("podSelector"),
            "PodMonitor": spec.get("selector"),
        }.get(kind)
        if selector is None:
            continue
        chosen = selected(selector, every_pod)
        if not chosen:
            yield f"{name_of(obj)}: its selector selects no pod template"
            continue
        ports = set.union(*(pod.port_names() for pod in chosen))
        wanted = {
            "Service": [p["targetPort"] for p in spec.get("ports", [])],
            "PodMonitor": [e["port"] for e in spec.get("podMetricsEndpoints", [])],
            # Each rule must reach something; `grpc` may be absent (the plain Deployment).
            "NetworkPolicy": ["http"],
        }.get(kind, [])
        for port in wanted:
            if isinstance(port, str) and port not in ports:
                yield f"{name_of(obj)}: the selected pods have no port named {port}"
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) not in names:
            yield f"{name_of(hpa)}: no {target['kind']} {target['name']} to scale"


def test_build_is_valid(builds: dict[str, list[dict]], variant: str) -> None:
    objects = builds[variant]
    assert objects, f"{variant} built nothing"
    found = list(problems(objects))
    assert not found, "\n".join(found)
    keys = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert len(keys) == len(set(keys)), "an object appears twice"


def test_every_kustomization_is_built(variant_folders: dict[str, Path]) -> None:
    """A new overlay or component under deploy/ is not forgotten by the tests above."""
    folders = {path.parent for path in DEPLOY.rglob("kustomization.yaml")}
    components = {
        folder
        for folder in folders
        if "kind: Component" in (folder / "kustomization.yaml").read_text()
    }
    assert set(variant_folders.values()) == folders - components
    assert components == {K8S / "components" / "prometheus-operator"}


def test_the_validator_finds_problems(builds: dict[str, list[dict]]) -> None:
    """The checks above can fail: a broken copy of the base build is refused, for each fault."""
    objects = yaml.safe_load(yaml.safe_dump(builds["base"]))
    deployment = find(objects, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    pod["containers"][0]["readinessProbe"]["httpGet"]["port"] = "htp"
    pod["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = "other"
    find(objects, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"]["x"] = "y"
    find(objects, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"].pop(
        "securityContext"
    )
    find(objects, "HorizontalPodAutoscaler")[0]["apiVersion"] = "autoscaling/v2beta2"
    text = "\n".join(problems(objects))
    for expected in (
        "readinessProbe: no port named htp",
        "readOnlyRootFilesystem must be true",
        "no PersistentVolumeClaim other",
        "PodDisruptionBudget/marginwatch: its selector selects no pod template",
        "CronJob/marginwatch-calibrate: the pod must run as a non-root user",
        "not served by Kubernetes 1.29",
    ):
        assert expected in text


def test_sharded_job_file_is_valid(builds: dict[str, list[dict]]) -> None:
    """The one-off Jobs are not in any kustomization; they run beside the base's objects."""
    jobs = [doc for doc in yaml.safe_load_all(SHARDED_JOB.read_text()) if doc]
    assert [job["kind"] for job in jobs] == ["Job", "Job"]
    others = [obj for obj in builds["base"] if obj["kind"] != "Job"]
    found = [p for p in problems(others + jobs) if "Job/" in p]
    assert not found, "\n".join(found)


def test_the_hpa_owns_the_replica_count(builds: dict[str, list[dict]]) -> None:
    for variant in ("base", "gpu"):
        (deployment,) = find(builds[variant], "Deployment")
        assert "replicas" not in deployment["spec"], f"{variant}: the HPA owns the count"
        (hpa,) = find(builds[variant], "HorizontalPodAutoscaler")
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB's maxUnavailable: 1 needs a second


def test_disruption_budget(builds: dict[str, list[dict]]) -> None:
    for variant in ("base", "gpu", "kserve"):
        (pdb,) = find(builds[variant], "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        (serving,) = selected(pdb["spec"]["selector"], pods(builds[variant]))
        assert serving.labels["app.kubernetes.io/component"] == "serve"


def test_network_policy(builds: dict[str, list[dict]]) -> None:
    (policy,) = find(builds["base"], "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open: the pods read a volume only
    inference, scraping = spec["ingress"]
    assert {p["port"] for p in inference["ports"]} == {"http", "grpc"}
    assert {"podSelector": {}} in inference["from"]  # the namespace's own clients
    ingress_ns = [peer["namespaceSelector"]["matchLabels"] for peer in inference["from"][1:]]
    assert ingress_ns == [{"kubernetes.io/metadata.name": "ingress-nginx"}]
    # Monitoring: from that namespace only, to the metrics listener only, which the serving pods
    # declare on the port the settings give it (and the inference port then has no /metrics).
    assert scraping["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert [p["port"] for p in scraping["ports"]] == ["metrics"]
    (config,) = find(builds["base"], "ConfigMap")
    serving = [pod for pod in pods(builds["base"]) if pod.owner.startswith("Deployment/")]
    assert serving
    for pod in serving:
        ports = {p["name"]: p["containerPort"] for c in pod.containers for p in c["ports"]}
        assert str(ports["metrics"]) == config["data"]["MARGINWATCH_METRICS_PORT"]
    (deployment,) = find(builds["base"], "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["data"]["MARGINWATCH_METRICS_PORT"]


def test_calibration_jobs_run_read_only_and_non_root(builds: dict[str, list[dict]]) -> None:
    jobs = [pod for pod in pods(builds["base"]) if pod.owner.startswith("CronJob/")]
    jobs += pods([doc for doc in yaml.safe_load_all(SHARDED_JOB.read_text()) if doc])
    assert len(jobs) == 4  # the traffic check, the weekly calibration, the sharded Jobs' two
    for pod in jobs:
        assert pod.spec["securityContext"]["runAsNonRoot"] is True
        (container,) = pod.containers
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp"  # the image's home is on the read-only root


def test_gpu_overlay(builds: dict[str, list[dict]]) -> None:
    objects = builds["gpu"]
    (config,) = find(objects, "ConfigMap")
    assert config["data"]["MARGINWATCH_DEVICE"] == "cuda"  # envFrom beats the image's own ENV
    by_owner = {pod.owner: pod for pod in pods(objects)}
    serve = by_owner["Deployment/marginwatch"]
    calibrate = by_owner["CronJob/marginwatch-calibrate"]
    assert serve.containers[0]["image"] == "marginwatch:0.1.0-gpu"
    assert calibrate.containers[0]["image"] == "marginwatch-calibrate:0.1.0-gpu"
    for pod in (serve, calibrate):
        assert pod.containers[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod.spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod.spec["tolerations"]
        )
    env = {e["name"]: e.get("value") for e in calibrate.containers[0]["env"]}
    assert env["MARGINWATCH_CALIBRATE_DEVICE"] == "cuda"
    assert env["HOME"] == "/tmp"  # the patch merged env by name, the base's entries stay
    # The CPU build is untouched by the overlay.
    cpu = {pod.owner: pod for pod in pods(builds["base"])}["Deployment/marginwatch"]
    assert "nvidia.com/gpu" not in cpu.containers[0]["resources"]["limits"]


def test_gpu_overlay_env_names_are_calibration_fields() -> None:
    from marginwatch.calibration.config import CalibrationConfig

    text = "\n".join(path.read_text() for path in (K8S / "overlays").rglob("*.yaml"))
    variables = re.findall(r"\bMARGINWATCH_CALIBRATE_([A-Z0-9_]+)", text)
    assert variables  # the overlay sets some, so the loop below checks something
    for variable in variables:
        assert variable.lower() in CalibrationConfig.model_fields, variable


def test_prometheus_operator_component(builds: dict[str, list[dict]]) -> None:
    for variant in ("base", "gpu", "kserve"):
        objects = builds[f"{variant}+prometheus-operator"]
        assert {obj["kind"] for obj in objects} - {obj["kind"] for obj in builds[variant]} == {
            "PodMonitor",
            "PrometheusRule",
        }
        (monitor,) = find(objects, "PodMonitor")
        # The rules' `up{job="marginwatch"}`: the job is this pod label's value.
        (serving,) = selected(monitor["spec"]["selector"], pods(objects))
        assert serving.labels[monitor["spec"]["jobLabel"]] == "marginwatch"
        deployments = find(objects, "Deployment")
        assert deployments or variant == "kserve", variant  # KServe makes its own
        for deployment in deployments:
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "false"  # scraped once, by the monitor


def test_documented_paths_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    paths = re.findall(r"kubectl (?:apply|kustomize) -k (deploy/\S+)", readme)
    assert paths  # the README documents some, so the loop below checks something
    for path in paths:
        assert (DEPLOY.parent / Path(path) / "kustomization.yaml").exists(), path


def test_registry_overlay(builds: dict[str, list[dict]]) -> None:
    """overlays/registry is the base with every image under the registry's prefix, the base's
    tags kept, and nothing else changed (the generic checks validate it as every variant)."""
    objects, base = builds["registry"], builds["base"]
    images = {container["image"] for pod in pods(objects) for container in pod.containers}
    base_images = {container["image"] for pod in pods(base) for container in pod.containers}
    assert base_images == {"marginwatch:0.1.0", "marginwatch-calibrate:0.1.0"}
    assert images == {f"registry.example.com/team/{image}" for image in base_images}
    unprefixed = [
        yaml.safe_load(yaml.safe_dump(doc).replace("registry.example.com/team/", ""))
        for doc in objects
    ]
    assert unprefixed == base
