"""The Helm chart (deploy/helm/instructrec), rendered by Helm itself and checked against the code it deploys.

Helm is `helm-python-sdk` (a dev dependency): its wheel bundles libhelm_c, Helm's own Go SDK (v4) built as a
shared library, so rendering runs Helm's template engine, value coalescing, values.schema.json validation,
`helm lint` rules and the client-side install (`helm template` is an install dry run, as here) with no
cluster, no network and no `helm` binary. Every rendered object is validated against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) of the oldest Kubernetes the chart
supports and the newest the package knows.

What the chart says about the application is checked against the application: every INSTRUCTREC_* variable
must name a real field of `instructrec.config.Settings` and parse into it, container commands must parse
with the real CLI, probes must point at views the Faust app serves, Triton must be told to load models that
exist in deploy/triton.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr, TypeAdapter

from instructrec import cli
from instructrec.adapters.triton.repository import staging_dir
from instructrec.config import FinetuneSettings, Settings
from streams import commands as stream_commands
from workers import commands as worker_commands

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "instructrec"
TRITON_REPOSITORY = ROOT / "deploy" / "triton"
RELEASE, NAMESPACE = "rec", "prod"
# Chart.yaml's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
FULLNAME = f"{RELEASE}-instructrec"
CONFIG_TEMPLATE = "instructrec/templates/configmap.yaml"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

SASL = {
    "kafka": {
        "broker": "kafka://b1.kafka.svc:9093,kafka://b2.kafka.svc:9093",
        "securityProtocol": "SASL_SSL",
        "sasl": {"mechanism": "SCRAM-SHA-512", "existingSecret": "kafka-user", "passwordKey": "pw"},
        "tls": {"existingSecret": "kafka-ca"},
    }
}
EXTERNAL_QDRANT = {
    "qdrant": {
        "enabled": False,
        "url": "https://qdrant.vector.svc:6333",
        "apiKey": {"existingSecret": "qdrant"},
    }
}
FINETUNE = {
    "finetune": {"enabled": True},
    "worker": {"artifacts": {"existingClaim": "artifacts", "subPath": "trained"}},
}
EVERYTHING = {  # every optional part switched on at once
    **SASL,
    "imagePullSecrets": [{"name": "regcred"}],
    "settings": {"STREAM__BATCH_SIZE": "32", "STREAM__HISTORY_SIZE": 100, "TRITON__RERANKER_VERSION": "3"},
    "worker": {"replicas": 3, "persistence": {"enabled": False}, "artifacts": {"existingClaim": "artifacts"}},
    "triton": {
        "replicas": 2,
        "podDisruptionBudget": {"enabled": True},
        "protocol": "http",
        "modelRepository": {"persistence": {"existingClaim": "models"}},
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "jobs": {
        "index": {"enabled": True, "onUpgrade": True, "limit": 100, "data": {"existingClaim": "datasets"}}
    },
    "finetune": {
        "enabled": True,
        "gpu": {"enabled": True, "count": 2},
        "runtimeClassName": "nvidia",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "settings": {"every_examples": 500, "budget_minutes": 2.5, "method": "full", "min_margin": 0.01},
    },
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-off": {"triton": {"gpu": {"enabled": False}}},
    "external-qdrant": EXTERNAL_QDRANT,
    "sasl": SASL,
    "external-triton": {"triton": {"enabled": False, "externalUrl": "triton.inference.svc:8001"}},
    "finetune": FINETUNE,
    "everything": EVERYTHING,
}


# ------------------------------------------------------------------------------------------------- rendering


class Rendered:
    """One `helm install --dry-run` of the chart: the templates as Helm rendered them and the objects in them."""

    def __init__(self, files: dict[str, str], release: dict[str, Any]) -> None:
        self.files = files
        self.release = release
        self.objects: list[dict[str, Any]] = [
            doc
            for path, text in sorted(files.items())
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{len(found)} {kind} named {name}: {[o['metadata']['name'] for o in self.all(kind)]}"
        )
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.all(kind))

    @property
    def config(self) -> dict[str, str]:
        return self.get("ConfigMap", f"{FULLNAME}-config")["data"]

    @property
    def worker(self) -> dict[str, Any]:
        return self.get("StatefulSet", f"{FULLNAME}-worker")

    @property
    def triton(self) -> dict[str, Any]:
        return self.get("Deployment", f"{FULLNAME}-triton")

    @property
    def finetune(self) -> dict[str, Any]:
        return self.get("Deployment", f"{FULLNAME}-finetune")


def _freeze(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


@functools.cache
def _render(frozen: str) -> Rendered:
    values = json.loads(frozen)
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        # What `helm template` / `helm install --dry-run=client` does: coalesce and schema-check the values,
        # render, sort, split off hooks, render NOTES; no cluster is contacted (in-memory release storage).
        with helm.Config(storage_driver="memory", namespace=NAMESPACE) as config:
            release = config.install(chart, RELEASE, values, dry_run="client", namespace=NAMESPACE)
    return Rendered(files, release)


def render(values: dict[str, Any] | None = None) -> Rendered:
    return _render(_freeze(values or {}))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@pytest.fixture(params=list(SCENARIOS), ids=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Rendered]:
    values = SCENARIOS[request.param]
    return values, render(values)


# --------------------------------------------------------------------------------------- pod spec helpers


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


def workloads(rendered: Rendered) -> list[dict[str, Any]]:
    return [o for o in rendered.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env") or []}


def volume_mount_of(workload: dict[str, Any], c: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volume mount holding `path` (the deepest one) and its volume or volume claim template."""
    mounts = [m for m in c.get("volumeMounts") or [] if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of container {c['name']} (root file system)"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or []}
    templates = {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates") or []}
    assert mount["name"] in volumes or mount["name"] in templates, f"mount {mount['name']} has no volume"
    return mount, volumes.get(mount["name"]) or {"volumeClaimTemplate": templates[mount["name"]]}


def app_env(rendered: Rendered, c: dict[str, Any], *, secrets: str = "s3cret") -> dict[str, str]:
    """The INSTRUCTREC_* environment a container sees: its envFrom ConfigMap, then its own env, with secret
    references filled with `secrets` and $(VAR) references expanded as Kubernetes does."""
    env: dict[str, str] = {}
    for source in c.get("envFrom") or []:
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"])["data"])
    fields = {"metadata.name": f"{FULLNAME}-worker-0", "metadata.namespace": NAMESPACE}
    for item in c.get("env") or []:
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            assert "$(" not in value, f"{item['name']} refers to a variable defined after it (or never)"
        elif "secretKeyRef" in item["valueFrom"]:
            value = secrets
        else:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = value
    return {k: v for k, v in env.items() if k.startswith("INSTRUCTREC_")}


# --------------------------------------------------------------------------------------- settings helpers


def settings_field(variable: str):
    """The `Settings` field an INSTRUCTREC_* variable names (Settings ignores unknown variables, so a typo
    would silently configure nothing)."""
    assert variable.startswith("INSTRUCTREC_"), variable
    model: type[BaseModel] = Settings
    parts = variable.removeprefix("INSTRUCTREC_").lower().split("__")
    for depth, part in enumerate(parts):
        assert part in model.model_fields, f"{variable}: {part!r} is not a field of {model.__name__}"
        info = model.model_fields[part]
        if depth < len(parts) - 1:
            model = info.annotation
            assert isinstance(model, type) and issubclass(model, BaseModel), f"{variable}: {part} is a leaf"
    return parts, info


def settings_value(settings: Settings, parts: list[str]) -> Any:
    value: Any = settings
    for part in parts:
        value = getattr(value, part)
    return value


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built from exactly `env`, as the pod's process builds them, each variable checked to land in
    the field it names."""
    for key in list(os.environ):
        if key.startswith("INSTRUCTREC_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    for key, raw in env.items():
        parts, info = settings_field(key)
        value = settings_value(settings, parts)
        expected = TypeAdapter(info.annotation).validate_python(raw)
        if isinstance(value, SecretStr):
            value, expected = value.get_secret_value(), expected.get_secret_value()
        if parts == ["state_dir"]:  # Settings resolves it
            expected = expected.expanduser().resolve()
        assert value == expected, f"{key}={raw!r} gave {'.'.join(parts)} = {value!r}"
    return settings


@pytest.fixture(scope="module")
def web_views() -> dict[str, Any]:
    """Path → view of the web server the real Faust app declares (built, not started)."""
    import tempfile

    from streams.app import create_app
    from streams.services import Services

    with tempfile.TemporaryDirectory() as state:
        settings = Settings(_env_file=None, state_dir=state, stream={"store": "memory"})
        stream = create_app(settings, Services(index=None, encoder=None, reranker=None))
        return dict(stream.app.web.views)


def kubernetes_problem(obj: dict[str, Any], kube: str) -> str | None:
    """Why `obj` is not a valid object of Kubernetes `kube` (strict: unknown fields too), or None."""
    try:
        kubernetes_validate.validate(obj, kube, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"at {'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
    return None


def serves(views: dict[str, Any], path: str, method: str) -> bool:
    from faust import web as faust_web

    view = views.get(path)
    return view is not None and getattr(type(view), method) is not getattr(faust_web.View, method)


# ===================================================================================================== tests


def test_chart_metadata_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    assert project["scripts"]["instructrec"] == "instructrec.cli:main"  # the command the containers run
    with helm.Chart.load(CHART) as loaded:
        assert loaded.schema is not None, "values.schema.json is missing"
        assert loaded.metadata["appVersion"] == project["version"]
    (worker,) = containers(render().worker)
    assert worker["image"].endswith(f":{project['version']}")  # the default tag


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_helm_lint_strict_passes(name: str) -> None:
    for kube in KUBE_VERSIONS:
        report = helm.lint(CHART, SCENARIOS[name], strict=True, kube_version=f"v{kube}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (kube, report)


def test_every_rendered_object_is_valid_kubernetes(scenario) -> None:
    _, rendered = scenario
    assert rendered.objects
    for obj in rendered.objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":  # a CRD: no schema in kubernetes-validate
            assert obj["kind"] == "ServiceMonitor" and obj["spec"]["endpoints"] and obj["spec"]["selector"]
            continue
        for kube in KUBE_VERSIONS:
            problem = kubernetes_problem(obj, kube)
            assert problem is None, f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {kube}): {problem}"


def test_helm_install_dry_run_matches_the_templates_and_hooks_are_the_jobs(scenario) -> None:
    _, rendered = scenario
    installed = {
        (o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(rendered.release["manifest"]) if o
    }
    hooks = {
        (o["kind"], o["metadata"]["name"])
        for o in rendered.objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
    }
    assert installed | hooks == {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    assert {kind for kind, _ in hooks} <= {"Job"}
    assert rendered.release["notes"].startswith("InstructRec Stream")


def test_objects_carry_the_standard_labels_and_selectors_select_their_pods(scenario) -> None:
    _, rendered = scenario
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        assert all(label in labels for label in STANDARD_LABELS), (obj["kind"], obj["metadata"]["name"])
        assert labels["app.kubernetes.io/instance"] == RELEASE
    pods = {(w["kind"], w["metadata"]["name"]): w for w in workloads(rendered)}
    for w in pods.values():
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        if w["kind"] != "Job":
            assert w["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    for service in rendered.all("Service"):
        selected = [
            w
            for w in pods.values()
            if w["kind"] != "Job"
            and service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        ports = {p["name"] for c in containers(selected[0], init=False) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for pdb in rendered.all("PodDisruptionBudget"):
        assert any(
            pdb["spec"]["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in pods.values()
        )


def test_pods_run_unprivileged_with_resources_and_resolvable_references(scenario) -> None:
    values, rendered = scenario
    accounts = {a["metadata"]["name"] for a in rendered.all("ServiceAccount")}
    claims = {c["metadata"]["name"] for c in rendered.all("PersistentVolumeClaim")}
    existing_claims = {"artifacts", "models", "datasets"}  # claims the scenarios name as existing
    for w in workloads(rendered):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["serviceAccountName"] in accounts
        assert spec["automountServiceAccountToken"] is False
        assert spec.get("imagePullSecrets", []) == values.get("imagePullSecrets", [])
        volumes = {v["name"] for v in spec.get("volumes") or []}
        volumes |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
        for v in spec.get("volumes") or []:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims | existing_claims
            if "configMap" in v:
                assert rendered.has("ConfigMap", v["configMap"]["name"])
        for c in containers(w):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
            assert {m["name"] for m in c.get("volumeMounts") or []} <= volumes
            for source in c.get("envFrom") or []:
                assert rendered.has("ConfigMap", source["configMapRef"]["name"])
        for c in containers(w, init=False):  # a writable /tmp: Python, torch and Hugging Face write there
            volume_mount_of(w, c, "/tmp/x")


def test_configmap_holds_only_real_settings_and_they_parse(scenario, monkeypatch) -> None:
    _, rendered = scenario
    config = rendered.config
    assert config and all(key.startswith("INSTRUCTREC_") for key in config)
    assert not [key for key in config if re.search("PASSWORD|API_KEY|SECRET", key)], (
        "secrets in the ConfigMap"
    )
    settings = settings_from(config, monkeypatch)  # every key names a field and lands in it
    assert settings.stream.store == "rocksdb"
    assert settings.web.host == "0.0.0.0"


def test_worker_is_a_stateful_faust_worker_with_tables_on_its_volume(
    scenario, monkeypatch, web_views
) -> None:
    values, rendered = scenario
    worker = rendered.worker
    (c,) = containers(worker)
    assert worker["spec"]["replicas"] == values.get("worker", {}).get("replicas", 2)
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
    # the command is the real CLI's worker command
    assert c["command"] == ["instructrec"]
    args = cli.build_parser().parse_args(c["args"])
    assert args.handler is stream_commands.run_worker and args.web_port is None

    settings = settings_from(app_env(rendered, c), monkeypatch)
    assert settings.kafka.broker == values.get("kafka", {}).get("broker", "kafka://kafka:9092")
    assert settings.web.host == "0.0.0.0"
    (port,) = c["ports"]
    assert port["name"] == "http" and port["containerPort"] == settings.web.port
    # RocksDB tables and the state directory are on the pod's own volume, not the read-only root
    assert settings.stream.store == "rocksdb"
    mount, volume = volume_mount_of(worker, c, str(settings.stream.data_dir))
    assert volume_mount_of(worker, c, str(settings.state_dir))[0] == mount
    persistent = values.get("worker", {}).get("persistence", {}).get("enabled", True)
    assert ("volumeClaimTemplate" in volume) is persistent and ("emptyDir" in volume) is not persistent
    # model artifacts: read-only, an existing claim when given
    artifacts_mount, artifacts = volume_mount_of(worker, c, str(settings.model.artifacts / "x"))
    assert artifacts_mount["readOnly"] is True
    claim = values.get("worker", {}).get("artifacts", {}).get("existingClaim")
    assert artifacts.get("persistentVolumeClaim", {}).get("claimName") == claim

    # probes point at views the app serves, on the web port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert c[probe]["httpGet"]["port"] == "http"
        assert serves(web_views, path, "get"), f"{probe}: the worker serves no GET {path}"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert serves(web_views, "/recommend", "post") and serves(web_views, "/metrics", "get")


def test_each_worker_advertises_its_own_stable_canonical_url(monkeypatch) -> None:
    rendered = render()
    worker = rendered.worker
    (c,) = containers(worker)
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_NAME") < names.index("INSTRUCTREC_STREAM__CANONICAL_URL")
    settings = settings_from(app_env(rendered, c), monkeypatch)
    service = rendered.get("Service", worker["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    expected = (
        f"http://{FULLNAME}-worker-0.{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:"
        f"{settings.web.port}"
    )
    assert settings.stream.canonical_url == expected
    # without it, Faust would advertise http://0.0.0.0:6066 (streams.app.faust_options)
    assert settings.web.host == "0.0.0.0"


def test_each_worker_is_a_static_group_member_named_after_its_pod(monkeypatch) -> None:
    rendered = render()
    (c,) = containers(rendered.worker)
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_NAME") < names.index("INSTRUCTREC_STREAM__INSTANCE_ID")
    settings = settings_from(app_env(rendered, c), monkeypatch)
    assert settings.stream.instance_id == f"{FULLNAME}-worker-0"
    (c,) = containers(render({"worker": {"staticMembership": False}}).worker)
    assert "INSTRUCTREC_STREAM__INSTANCE_ID" not in [e["name"] for e in c["env"]]


def test_configmap_changes_roll_the_pods() -> None:
    def checksum(rendered: Rendered) -> str:
        return rendered.worker["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    before, after = render(), render({"settings": {"STREAM__BATCH_SIZE": "64"}})
    assert checksum(before) == hashlib.sha256(before.files[CONFIG_TEMPLATE].encode()).hexdigest()
    assert checksum(after) != checksum(before)
    assert after.config["INSTRUCTREC_STREAM__BATCH_SIZE"] == "64"


def test_worker_service_pdb_and_metrics() -> None:
    rendered = render()
    service = rendered.get("Service", f"{FULLNAME}-worker")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert rendered.get("PodDisruptionBudget", f"{FULLNAME}-worker")["spec"]["maxUnavailable"] == 1
    annotations = rendered.worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == rendered.config["INSTRUCTREC_WEB__PORT"]
    assert not rendered.all("ServiceMonitor")

    monitored = render(EVERYTHING)
    monitors = {m["metadata"]["name"]: m for m in monitored.all("ServiceMonitor")}
    assert set(monitors) == {f"{FULLNAME}-worker", f"{FULLNAME}-triton"}
    for monitor in monitors.values():
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]
        services = [
            s
            for s in monitored.all("Service")
            if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
            and not any(e["key"] in s["metadata"]["labels"] for e in selector.get("matchExpressions", []))
        ]
        assert len(services) == 1, "each pod must be scraped through exactly one Service"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}


@pytest.mark.parametrize("gpu", [True, False])
def test_triton_serves_the_repository_with_the_gpu_config_exactly_when_asked(gpu: bool, monkeypatch) -> None:
    rendered = render({"triton": {"gpu": {"enabled": gpu}}})
    triton = rendered.triton
    server = container(triton, "tritonserver")
    args = server["args"]
    assert server["command"] == ["tritonserver"]
    assert server["image"].startswith("nvcr.io/nvidia/tritonserver:") and server["image"].endswith("-py3")
    assert ("--model-config-name=gpu" in args) is gpu
    limits = server["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) is gpu
    if gpu:
        assert limits["nvidia.com/gpu"] == 1
        assert (
            "KIND_GPU" in (TRITON_REPOSITORY / "instructrec_reranker" / "configs" / "gpu.pbtxt").read_text()
        )
    assert "KIND_CPU" in (TRITON_REPOSITORY / "instructrec_reranker" / "config.pbtxt").read_text()

    assert "--model-control-mode=explicit" in args
    loaded = [a.removeprefix("--load-model=") for a in args if a.startswith("--load-model=")]
    assert "instructrec_reranker" in loaded
    for model in loaded:  # each one exists in the repository the image seeds from
        assert (TRITON_REPOSITORY / model / "config.pbtxt").is_file(), model
    (repository,) = [
        a.removeprefix("--model-repository=") for a in args if a.startswith("--model-repository=")
    ]
    mount, volume = volume_mount_of(triton, server, f"{repository}/instructrec_reranker")
    # a folder of the volume, not its root: a version staged beside it is renamed in on the same volume
    assert Path(repository) != Path(mount["mountPath"]) and "subPath" not in mount
    assert volume_mount_of(triton, server, str(staging_dir(repository)))[0] == mount
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert rendered.get("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    seed = container(triton, "seed-model-repository")
    assert volume_mount_of(triton, seed, repository)[1] == volume
    assert all(model in seed["args"][0] for model in loaded)
    assert seed["args"][0].count("deploy/triton") == 1

    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert volume_mount_of(triton, server, "/dev/shm/x")[1]["emptyDir"]["medium"] == "Memory"
    service = rendered.get("Service", f"{FULLNAME}-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports

    # the worker calls that service's gRPC port
    settings = settings_from(rendered.config, monkeypatch)
    assert settings.triton.protocol == "grpc"
    assert settings.triton.url == f"{service['metadata']['name']}:{ports['grpc']}"
    assert settings.triton.reranker_model == "instructrec_reranker"


def test_triton_image_tag_is_the_release_of_the_pinned_tritonclient() -> None:
    """NGC YY.MM ships Triton 2.(54 + 12·(YY − 25) + MM − 1): 24.10 is 2.51, 25.01 is 2.54."""
    tag = render().triton["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
    year, month = (int(part) for part in tag.removesuffix("-py3").split("."))
    major, minor, *_ = importlib.metadata.version("tritonclient").split(".")
    assert (int(major), int(minor)) == (2, 54 + 12 * (year - 25) + month - 1), tag


def test_external_triton_replaces_the_deployment(monkeypatch) -> None:
    rendered = render(SCENARIOS["external-triton"])
    assert not rendered.all("Deployment") and not rendered.all("PersistentVolumeClaim")
    assert settings_from(rendered.config, monkeypatch).triton.url == "triton.inference.svc:8001"
    http = render({"triton": {"protocol": "http"}})
    assert settings_from(http.config, monkeypatch).triton.url == f"{FULLNAME}-triton:8000"


def test_in_chart_qdrant_is_a_single_node_statefulset_the_worker_points_at(monkeypatch) -> None:
    rendered = render()
    qdrant = rendered.get("StatefulSet", f"{FULLNAME}-qdrant")
    assert qdrant["spec"]["replicas"] == 1
    (c,) = containers(qdrant)
    image, tag = c["image"].rsplit(":", 1)
    assert image == "qdrant/qdrant"
    from qdrant_client.common.version_check import is_compatible

    client = importlib.metadata.version("qdrant-client")
    assert is_compatible(client, tag.removeprefix("v")), f"qdrant {tag} vs qdrant-client {client}"
    assert {p["containerPort"] for p in c["ports"]} == {6333, 6334}
    _, storage = volume_mount_of(qdrant, c, "/qdrant/storage/collections")
    assert "volumeClaimTemplate" in storage
    service = rendered.get("Service", f"{FULLNAME}-qdrant")
    assert {p["port"] for p in service["spec"]["ports"]} == {6333, 6334}
    settings = settings_from(rendered.config, monkeypatch)
    assert settings.qdrant.url == f"http://{service['metadata']['name']}:6333"


def test_external_qdrant_with_an_api_key_from_a_secret(monkeypatch) -> None:
    rendered = render(EXTERNAL_QDRANT)
    assert not [o for o in rendered.objects if o["metadata"]["name"].endswith("-qdrant")]
    (c,) = containers(rendered.worker)
    settings = settings_from(app_env(rendered, c, secrets="key-1"), monkeypatch)
    assert settings.qdrant.url == "https://qdrant.vector.svc:6333"
    assert settings.qdrant.api_key.get_secret_value() == "key-1"
    ref = env_of(c)["INSTRUCTREC_QDRANT__API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "qdrant", "key": "api-key"}


def test_sasl_credentials_come_from_the_secret_and_tls_files_from_a_mounted_one(monkeypatch) -> None:
    rendered = render(EVERYTHING)
    config = rendered.config
    assert config["INSTRUCTREC_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["INSTRUCTREC_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    index = rendered.get("Job", f"{FULLNAME}-index")
    for workload, c in [
        (rendered.worker, container(rendered.worker, "worker")),
        (index, container(index, "ensure-topics")),
        (index, container(index, "index")),
    ]:
        env = env_of(c)
        assert env["INSTRUCTREC_KAFKA__SASL_USERNAME"]["valueFrom"]["secretKeyRef"] == {
            "name": "kafka-user",
            "key": "username",
        }
        assert env["INSTRUCTREC_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "kafka-user",
            "key": "pw",
        }
        settings = settings_from(app_env(rendered, c, secrets="pa55"), monkeypatch)
        assert settings.kafka.sasl_password.get_secret_value() == "pa55"
        assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka.bootstrap_servers == "b1.kafka.svc:9093,b2.kafka.svc:9093"
        mount, volume = volume_mount_of(workload, c, str(settings.kafka.ssl_cafile))
        assert volume["secret"]["secretName"] == "kafka-ca" and mount["readOnly"] is True
        assert settings.kafka.ssl_cafile.name == "ca.crt"
    plain = render()
    assert "INSTRUCTREC_KAFKA__SASL_PASSWORD" not in env_of(container(plain.worker, "worker"))


def test_index_job_is_a_post_install_hook_that_creates_topics_first(monkeypatch) -> None:
    assert not render().all("Job")
    rendered = render(EVERYTHING)
    job = rendered.get("Job", f"{FULLNAME}-index")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert hooks == ["post-install", "post-upgrade"]
    once = render(merge(EVERYTHING, {"jobs": {"index": {"onUpgrade": False}}})).get(
        "Job", f"{FULLNAME}-index"
    )
    assert once["metadata"]["annotations"]["helm.sh/hook"] == "post-install"

    index = container(job, "index")
    assert index["command"] == ["instructrec"]
    args = cli.build_parser().parse_args(index["args"])
    assert args.handler is worker_commands.run_index
    assert (args.dataset, args.k_core, args.limit, args.quiet) == ("ml-latest-small", 5, 100, True)
    settings = settings_from(app_env(rendered, index), monkeypatch)
    mount, volume = volume_mount_of(job, index, str(settings.data_root / args.dataset))
    assert volume["persistentVolumeClaim"]["claimName"] == "datasets" and mount["readOnly"] is True

    # the init container's script imports what exists and calls the ensure_topics the worker calls at start
    topics = container(job, "ensure-topics")
    assert topics["command"] == ["python", "-c"]
    tree = ast.parse(topics["args"][0])
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            imported.update({alias.name: getattr(module, alias.name) for alias in node.names})
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    from streams import runner
    from streams.kafka import admin

    assert "ensure_topics" in calls and imported["ensure_topics"] is admin.ensure_topics
    # ... the function the stream worker runs before Faust starts
    assert (
        runner.ensure_topics is admin.ensure_topics and "ensure_topics" in runner.run_worker.__code__.co_names
    )


def test_settings_values_reach_the_configmap_and_chart_owned_keys_are_refused(monkeypatch) -> None:
    rendered = render(EVERYTHING)
    settings = settings_from(rendered.config, monkeypatch)
    assert (settings.stream.batch_size, settings.stream.history_size) == (32, 100)
    assert settings.triton.reranker_version == "3"
    topics = render({"kafka": {"topics": {"queries": "prod.queries", "modelUpdates": "prod.model-updates"}}})
    settings = settings_from(topics.config, monkeypatch)
    assert (settings.kafka.topics.queries, settings.kafka.topics.model_updates) == (
        "prod.queries",
        "prod.model-updates",
    )
    for key in ("KAFKA__BROKER", "WEB__HOST", "stream__store", "STREAM__CANONICAL_URL", "QDRANT__API_KEY"):
        with pytest.raises(helm.HelmError, match="the chart sets"):
            render({"settings": {key: "x"}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"securityProtocol": "SASL_SSL"}}, "kafka.sasl.existingSecret is required"),
        ({"qdrant": {"enabled": False}}, "qdrant.url is required"),
        ({"triton": {"enabled": False}}, "triton.externalUrl is required"),
        ({"jobs": {"index": {"enabled": True}}}, "jobs.index.data.existingClaim is required"),
        ({"kafka": {"securityProtocol": "TLS"}}, "securityProtocol"),
        ({"worker": {"replica": 3}}, "replica"),
        ({"worker": {"probes": {"readiness": {"path": "health"}}}}, "path"),
        ({"triton": {"protocol": "rest"}}, "protocol"),
        ({"triton": {"modelRepository": {"directory": ".models"}}}, "directory"),
        ({"finetune": {"replicas": 2}}, "replicas"),
        ({"finetune": {"settings": {"method": "adapters"}}}, "method"),
        ({"finetune": {"settings": {"lr": 0.1}}}, "lr"),
        ({"finetune": {"enabled": True}}, "worker.artifacts.existingClaim is required when finetune.enabled"),
        (
            merge(FINETUNE, {"triton": {"enabled": False, "externalUrl": "triton:8001"}}),
            "finetune.enabled needs the model repository",
        ),
    ],
)
def test_invalid_values_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# ------------------------------------------------------------------------------------------ fine-tune worker


def test_finetune_worker_is_off_by_default_and_then_renders_nothing() -> None:
    default = render()
    assert not default.has("Deployment", f"{FULLNAME}-finetune")
    assert not default.has("PersistentVolumeClaim", f"{FULLNAME}-finetune-store")
    assert not [k for k in default.config if "FINETUNE" in k or k == "INSTRUCTREC_TRITON__REPOSITORY"]
    # every other fine-tune value, with enabled false, changes nothing (the ConfigMap's checksum included)
    off = render({"finetune": {**EVERYTHING["finetune"], "enabled": False}})
    assert off.files == default.files and off.release["notes"] == default.release["notes"]


@pytest.mark.parametrize("name", ["finetune", "everything"])
def test_finetune_worker_publishes_into_the_repository_triton_serves(name: str, monkeypatch) -> None:
    values = SCENARIOS[name]
    rendered = render(values)
    finetune, triton, worker = rendered.finetune, rendered.triton, rendered.worker
    # one pod, never two at once: the only writer of its store and of new versions
    assert finetune["spec"]["replicas"] == 1
    assert finetune["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = containers(finetune)
    assert c["command"] == ["instructrec"]
    assert cli.build_parser().parse_args(c["args"]).handler is worker_commands.run_finetune
    settings = settings_from(app_env(rendered, c), monkeypatch)

    # the repository is the one Triton serves (--model-repository), on the same claim at the same path
    server = container(triton, "tritonserver")
    (served,) = [
        a.removeprefix("--model-repository=") for a in server["args"] if a.startswith("--model-repository=")
    ]
    assert settings.triton.repository == Path(served)
    version = str(settings.triton.repository / "instructrec_reranker" / "4")
    mount, volume = volume_mount_of(finetune, c, version)
    served_mount, served_volume = volume_mount_of(triton, server, version)
    assert volume == served_volume and "persistentVolumeClaim" in volume
    assert (mount["mountPath"], mount.get("subPath")) == (
        served_mount["mountPath"],
        served_mount.get("subPath"),
    )
    assert not mount.get("readOnly")
    # ... and the staging folder beside it on that volume too: the rename into the repository is atomic
    assert volume_mount_of(finetune, c, str(staging_dir(settings.triton.repository)))[0] == mount
    claim = volume["persistentVolumeClaim"]["claimName"]
    if rendered.has("PersistentVolumeClaim", claim):
        assert "ReadWriteMany" in rendered.get("PersistentVolumeClaim", claim)["spec"]["accessModes"]
    # one owner of the repository's files: Triton's uid, gid and fsGroup
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert pod_spec(finetune)["securityContext"][key] == pod_spec(triton)["securityContext"][key], key
    # it calls the in-chart Triton's Service on the port of the configured protocol
    service = rendered.get("Service", f"{FULLNAME}-triton")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert settings.triton.url == f"{service['metadata']['name']}:{ports[settings.triton.protocol]}"

    # the example store: its own claim, mounted at the store file's folder
    assert settings.finetune.store is not None
    store_mount, store = volume_mount_of(finetune, c, str(settings.finetune.store))
    assert Path(store_mount["mountPath"]) == settings.finetune.store.parent
    store_claim = rendered.get("PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])
    assert store_claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert store_claim["spec"]["resources"]["requests"]["storage"] == "10Gi"

    # the trained artefacts exactly as the stream worker gets them
    w = container(worker, "worker")
    pipeline = str(settings.model.artifacts / settings.stream.dataset)
    assert settings_from(app_env(rendered, w), monkeypatch).model.artifacts == settings.model.artifacts
    assert volume_mount_of(finetune, c, pipeline) == volume_mount_of(worker, w, pipeline)
    assert volume_mount_of(finetune, c, pipeline)[0]["readOnly"] is True

    # the stream worker's image, account, pull secrets, settings, environment and container context
    for key in ("serviceAccountName", "automountServiceAccountToken", "imagePullSecrets"):
        assert pod_spec(finetune).get(key) == pod_spec(worker).get(key), key
    for key in ("image", "imagePullPolicy", "envFrom", "securityContext"):
        assert c[key] == w[key], key
    worker_only = {
        "POD_NAME",
        "POD_NAMESPACE",
        "INSTRUCTREC_STREAM__CANONICAL_URL",
        "INSTRUCTREC_STREAM__INSTANCE_ID",
    }
    assert env_of(c).keys() == env_of(w).keys() - worker_only
    annotations = finetune["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations["checksum/config"]
        == worker["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    )
    # it serves nothing: no port, no probe, no Service selecting it
    assert not {"ports", "livenessProbe", "readinessProbe", "startupProbe"} & c.keys()
    labels = finetune["spec"]["template"]["metadata"]["labels"]
    assert not [s for s in rendered.all("Service") if s["spec"]["selector"].items() <= labels.items()]


def test_finetune_worker_with_an_external_triton_mounts_its_claim(monkeypatch) -> None:
    external = {
        "triton": {
            "enabled": False,
            "externalUrl": "triton.inference.svc:8001",
            "modelRepository": {"persistence": {"existingClaim": "models"}},
        }
    }
    rendered = render(merge(FINETUNE, external))
    finetune = rendered.finetune
    for kube in KUBE_VERSIONS:
        assert kubernetes_problem(finetune, kube) is None
    (c,) = containers(finetune)
    settings = settings_from(app_env(rendered, c), monkeypatch)
    assert settings.triton.url == "triton.inference.svc:8001"
    _, volume = volume_mount_of(finetune, c, str(settings.triton.repository / "instructrec_reranker"))
    assert volume["persistentVolumeClaim"]["claimName"] == "models"
    assert pod_spec(finetune)["securityContext"]["runAsUser"] == 10001  # no Triton here to align with
    override = {"finetune": {"podSecurityContext": {"runAsUser": 2000, "fsGroup": 2000}}}
    security = pod_spec(render(merge(merge(FINETUNE, external), override)).finetune)["securityContext"]
    assert (security["runAsUser"], security["fsGroup"], security["runAsGroup"]) == (2000, 2000, 10001)
    assert security["runAsNonRoot"] is True


@pytest.mark.parametrize("gpu", [True, False])
def test_finetune_gets_gpus_exactly_when_asked(gpu: bool) -> None:
    rendered = render(merge(FINETUNE, {"finetune": {"gpu": {"enabled": gpu, "count": 2}}}))
    (c,) = containers(rendered.finetune)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert ("nvidia.com/gpu" in limits) is gpu and "nvidia.com/gpu" not in requests
    if gpu:
        assert limits["nvidia.com/gpu"] == 2
    assert limits["memory"] and requests["cpu"]
    scheduled = pod_spec(render(EVERYTHING).finetune)
    assert scheduled["nodeSelector"] == EVERYTHING["finetune"]["nodeSelector"]
    assert scheduled["tolerations"] == EVERYTHING["finetune"]["tolerations"]
    assert scheduled["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod_spec(rendered.finetune)


def test_finetune_runs_the_app_image_unless_given_its_own() -> None:
    (c,) = containers(render(FINETUNE).finetune)
    (w,) = containers(render(FINETUNE).worker)
    assert c["image"] == w["image"]
    cuda = {"finetune": {"image": {"repository": "registry/instructrec-stream-cuda"}}}
    (c,) = containers(render(merge(FINETUNE, cuda)).finetune)
    assert (
        c["image"].startswith("registry/instructrec-stream-cuda:")
        and c["image"].split(":")[1] == w["image"].split(":")[1]
    )
    tagged = merge(cuda, {"finetune": {"image": {"tag": "0.3-cu130"}}})
    assert (
        containers(render(merge(FINETUNE, tagged)).finetune)[0]["image"]
        == "registry/instructrec-stream-cuda:0.3-cu130"
    )


def test_finetune_settings_reach_the_configmap_and_the_chart_owns_its_paths(monkeypatch) -> None:
    # values.yaml shows FinetuneSettings' own defaults (but threads: a pod of its own, its CPU request)
    shown = yaml.safe_load((CHART / "values.yaml").read_text())["finetune"]["settings"]
    defaults = FinetuneSettings()
    assert {k: v for k, v in shown.items() if k != "threads"} == {
        k: getattr(defaults, k) for k in shown if k != "threads"
    }
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["finetune"]["properties"]["settings"]["properties"]) == set(shown)

    rendered = render(EVERYTHING)
    settings = settings_from(rendered.config, monkeypatch)  # every key a real field, parsed
    for key, value in EVERYTHING["finetune"]["settings"].items():
        assert getattr(settings.finetune, key) == value, key
    assert settings.finetune.threads == shown["threads"]
    # a whole number arrives as a float64 in Helm: it must still read as an integer
    big = render(merge(FINETUNE, {"finetune": {"settings": {"every_examples": 1_000_000}}}))
    assert big.config["INSTRUCTREC_FINETUNE__EVERY_EXAMPLES"] == "1000000"

    for key in ("TRITON__REPOSITORY", "FINETUNE__STORE"):  # paths the chart's mounts decide
        with pytest.raises(helm.HelmError, match="the chart sets"):
            render({"settings": {key: "/x"}})
    with pytest.raises(helm.HelmError, match="the chart sets"):
        render(merge(FINETUNE, {"settings": {"FINETUNE__HOLDOUT": "50"}}))
    group = render(merge(FINETUNE, {"settings": {"FINETUNE__GROUP_ID": "rec-finetune"}}))
    assert settings_from(group.config, monkeypatch).finetune.group_id == "rec-finetune"


def test_notes_export_the_first_version_into_the_served_repository() -> None:
    rendered = render(FINETUNE)
    (served,) = [
        a.removeprefix("--model-repository=")
        for a in container(rendered.triton, "tritonserver")["args"]
        if a.startswith("--model-repository=")
    ]
    notes = rendered.release["notes"]
    (pod,) = [line for line in notes.splitlines() if line.strip().startswith("FT=")]
    assert "app.kubernetes.io/component=finetune" in pod  # the pod with the application image
    (export,) = [line for line in notes.splitlines() if " exec $FT -- " in line]
    argv = shlex.split(export.split(" -- ", 1)[1])
    assert argv[0] == "instructrec"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.handler is worker_commands.run_export and args.repository == Path(served)
    assert "WARNING" not in notes.split("Fine-tune worker", 1)[1]

    # without it, version 1 is copied into the same repository from Triton's own pod
    plain = render().release["notes"]
    assert not [line for line in plain.splitlines() if "-- instructrec" in line]
    assert f"{served}/instructrec_reranker/1/reranker" in plain
    # what cannot work well is said
    rwo = {"triton": {"replicas": 2, "modelRepository": {"persistence": {"accessModes": ["ReadWriteOnce"]}}}}
    warned = render(merge(FINETUNE, rwo)).release["notes"]
    assert "not ReadWriteMany" in warned and "triton.replicas is 2" in warned
