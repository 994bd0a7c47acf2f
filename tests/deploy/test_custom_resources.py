"""The custom resources (KServe's ServingRuntime and InferenceService, the Prometheus Operator's
PodMonitor and PrometheusRule) validate against their projects' released CRDs, vendored with
their version and git blob hashes (deploy/kserve/crds/README.md and the component's
crds/README.md), and the KServe objects agree with the service and with each other.

The API server prunes fields a CRD's schema does not list, silently: a misspelled
`minReplica` would be accepted and do nothing. The schemas are therefore made strict here
(unknown fields refused, except where the CRD itself preserves them), as kubeconform's -strict
does.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from marginwatch.artifact.schema import SCHEMA_VERSION
from marginwatch.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_FOLDERS = [
    DEPLOY / "kserve" / "crds",
    DEPLOY / "kubernetes" / "components" / "prometheus-operator" / "crds",
]
# KServe's protocol names (pkg/constants InferenceServiceProtocol, v0.20.0).
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def vendored() -> dict[str, tuple[Path, str]]:
    """file name -> (path, the blob hash its README records)."""
    files = {}
    for folder in CRD_FOLDERS:
        readme = (folder / "README.md").read_text()
        for name, sha in re.findall(
            r"^\| `([\w.]+\.yaml)` \|[^|]+\| `([0-9a-f]{40})` \|$", readme, re.M
        ):
            files[name] = (folder / name, sha)
    return files


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict JSON Schema of that served version."""
    schemas = {}
    for path, _ in vendored().values():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema: an object that lists its properties refuses
    others (unless x-kubernetes-preserve-unknown-fields), and `nullable` admits null."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":  # a map of names to schemas, not a schema itself
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    open_ended = "additionalProperties" in schema or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if "properties" in schema and not open_ended:
        out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def validation_errors(obj: dict[str, Any]) -> list[str]:
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def custom(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    known = crd_schemas()
    return [obj for obj in objects if (obj["apiVersion"], obj["kind"]) in known]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def test_vendored_crds_are_the_released_files() -> None:
    files = vendored()
    assert set(files) == {
        "serving.kserve.io_servingruntimes.yaml",
        "serving.kserve.io_inferenceservices.yaml",
        "monitoring.coreos.com_podmonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
    }
    for name, (path, recorded) in files.items():
        assert git_blob_sha1(path) == recorded, f"{name} differs from the released file"
    assert set(crd_schemas()) == {
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }


def test_custom_resources_validate(builds: dict[str, list[dict]], variant: str) -> None:
    found = custom(builds[variant])
    # the variants that hold custom resources hold some; the others none, and pass on that
    assert bool(found) == (variant == "kserve" or variant.endswith("+prometheus-operator"))
    for obj in found:
        errors = validation_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(errors)


def test_every_build_with_crs_is_checked(builds: dict[str, list[dict]]) -> None:
    """The parametrised test above saw every custom resource the builds contain."""
    kinds = {obj["kind"] for objects in builds.values() for obj in custom(objects)}
    assert kinds == {"ServingRuntime", "InferenceService", "PodMonitor", "PrometheusRule"}


def test_strict_schemas_refuse_what_the_api_server_would_prune(
    builds: dict[str, list[dict]],
) -> None:
    isvc = yaml.safe_load(yaml.safe_dump(one(builds["kserve"], "InferenceService")))
    isvc["spec"]["predictor"]["minReplica"] = 2  # misspelled
    isvc["spec"]["predictor"]["maxReplicas"] = "ten"
    errors = "\n".join(validation_errors(isvc))
    assert "'minReplica' was unexpected" in errors
    assert "'ten' is not of type 'integer'" in errors
    runtime = yaml.safe_load(yaml.safe_dump(one(builds["kserve"], "ServingRuntime")))
    del runtime["spec"]["containers"]
    assert "'containers' is a required property" in "\n".join(validation_errors(runtime))
    monitor = yaml.safe_load(yaml.safe_dump(one(builds["base+prometheus-operator"], "PodMonitor")))
    del monitor["spec"]["selector"]
    assert validation_errors(monitor)


def test_kserve_runtime_and_service_agree(builds: dict[str, list[dict]]) -> None:
    objects = builds["kserve"]
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    spec, predictor = runtime["spec"], isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {"name": f["name"], "version": f["version"]} for f in spec["supportedModelFormats"]
    ]
    # The format's version is the calibration record's schema version the image reads.
    assert model["modelFormat"]["version"] == str(SCHEMA_VERSION)
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"} <= KSERVE_PROTOCOLS
    assert model["protocolVersion"] in spec["protocolVersions"]
    # Knative's mode allows one port per container; Standard (raw Deployment) allows both.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert "storageUri" not in model  # a copied snapshot would never see a new CURRENT


def test_kserve_container_ports_and_settings(builds: dict[str, list[dict]]) -> None:
    objects = builds["kserve"]
    (container,) = one(objects, "ServingRuntime")["spec"]["containers"]
    assert container["name"] == "kserve-container"  # where KServe merges the model spec
    http, grpc, metrics = container["ports"]  # KServe maps Service port 80 to the first one
    assert (http["name"], http["containerPort"]) == ("http", 8000)
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", 8001)
    config_data = one(objects, "ConfigMap")["data"]
    assert (metrics["name"], str(metrics["containerPort"])) == (
        "metrics",
        config_data["MARGINWATCH_METRICS_PORT"],
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MARGINWATCH_GRPC_PORT"] == str(grpc["containerPort"])
    assert container["args"][container["args"].index("--port") + 1] == str(http["containerPort"])
    config = one(objects, "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    variables = [variable for variable in env if variable.startswith("MARGINWATCH_")]
    assert variables  # the runtime sets some, so the loop below checks something
    for variable in variables:
        assert variable.removeprefix("MARGINWATCH_").lower() in Settings.model_fields, variable
    # The store: the PVC, mounted read-only where the settings look for it.
    isvc = one(objects, "InferenceService")
    (mount,) = isvc["spec"]["predictor"]["model"]["volumeMounts"]
    (volume,) = [v for v in isvc["spec"]["predictor"]["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert mount["mountPath"] == config["data"]["MARGINWATCH_STORE"]
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    )


def test_kserve_replaces_the_plain_workload(builds: dict[str, list[dict]]) -> None:
    """KServe makes its own Deployment, Service and HPA; ours would serve a second copy."""
    kinds = {obj["kind"] for obj in builds["kserve"]}
    assert not kinds & {"Deployment", "Service", "HorizontalPodAutoscaler"}
    base = {(obj["kind"], obj["metadata"]["name"]) for obj in builds["base"]}
    kept = {(obj["kind"], obj["metadata"]["name"]) for obj in builds["kserve"]}
    assert base - kept == {
        ("Deployment", "marginwatch"),
        ("Service", "marginwatch"),
        ("HorizontalPodAutoscaler", "marginwatch"),
    }
    # Probes, resources and security as the plain Deployment has them: one way to run it.
    (plain,) = one(builds["base"], "Deployment")["spec"]["template"]["spec"]["containers"]
    (runtime,) = one(builds["kserve"], "ServingRuntime")["spec"]["containers"]
    for key in ("args", "readinessProbe", "livenessProbe", "startupProbe", "resources"):
        assert runtime[key] == plain[key], key
    assert runtime["securityContext"] == plain["securityContext"]
