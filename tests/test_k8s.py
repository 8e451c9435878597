"""deploy/k8s renders, validates against the Kubernetes API schemas, and hangs together (#9).

Rendering: kustomize itself is not guaranteed where tests run (pykustomize, its Python binding
on PyPI, needs Python >= 3.14), so `render` below is a small kustomize limited to exactly the
features deploy/k8s/kustomization.yaml uses: `resources` (files), `namespace`, `labels` (pairs,
metadata only: no includeSelectors/includeTemplates) and `images` (newName/newTag). Any other
kustomization field is refused, so using one means extending `render` first. Where
`kubectl kustomize` is on PATH, its output must equal ours (test_matches_kubectl_kustomize).

Validation: every rendered object against kubernetes-validate's strict schemas (unknown fields
are errors) for KUBERNETES_VERSION, offline. Then the cross-references no schema sees: Service
selectors and target ports, probe ports, the addresses the gateway and the backends dial, the
cache's volume, the autoscalers' targets, config references, resource requests.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

KUSTOMIZATION_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"  # pinned: schemas ship inside kubernetes-validate
COMPONENTS = ("cache", "encoder", "decoder", "gateway")
GRPC_PORTS = {"cache": 50053, "encoder": 50051, "decoder": 50052}
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
# Kinds that live outside namespaces (the `namespace` field leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
Obj = dict[str, Any]


# --- the renderer ------------------------------------------------------------------------------


def _set_image(image: str, rules: list[Obj]) -> str:
    name, _, tag = image.partition(":")  # no digests or registry ports in deploy/k8s
    for rule in rules:
        if rule["name"] == name:
            name, tag = rule.get("newName", name), rule.get("newTag", tag)
            break
    return f"{name}:{tag}" if tag else name


def _pod_specs(obj: Obj) -> Iterator[Obj]:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield obj["spec"]["template"]["spec"]


def render(directory: Path = KUSTOMIZATION_DIR) -> list[Obj]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    assert not unsupported, f"render() does not implement {sorted(unsupported)}: extend it"
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        assert path.is_file(), f"{resource}: only files are supported as resources"
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    namespace = kustomization.get("namespace")
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        for entry in kustomization.get("labels", []):
            assert set(entry) == {"pairs"}, "only plain `pairs` labels are implemented"
            meta.setdefault("labels", {}).update(entry["pairs"])
        for pod in _pod_specs(obj):
            for container in pod.get("initContainers", []) + pod["containers"]:
                container["image"] = _set_image(container["image"], kustomization.get("images", []))
    return objects


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return render()


def find(objects: list[Obj], kind: str, name: str) -> Obj | None:
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def containers(obj: Obj) -> list[Obj]:
    return [c for pod in _pod_specs(obj) for c in pod["containers"]]


def flag(container: Obj, name: str) -> str | None:
    argv = container.get("command", []) + container.get("args", [])
    return argv[argv.index(name) + 1] if name in argv else None


# --- cross-reference checks (each returns its problems, so the live test can break them) -------


def selector_problems(objects: list[Obj]) -> list[str]:
    problems = []
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for d in deployments:
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        wanted = d["spec"]["selector"]["matchLabels"]
        if any(pod_labels.get(k) != v for k, v in wanted.items()):
            problems.append(f"Deployment {d['metadata']['name']}: selector misses its pods")
    for svc in (o for o in objects if o["kind"] == "Service"):
        name, selector = svc["metadata"]["name"], svc["spec"].get("selector", {})
        matched = [
            d
            for d in deployments
            if selector
            and all(
                d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
        ]
        if len(matched) != 1:
            problems.append(f"Service {name} selects {len(matched)} Deployments, not 1")
            continue
        ports = {
            p.get("name"): p["containerPort"] for c in containers(matched[0]) for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if target not in ports and target not in ports.values():
                problems.append(f"Service {name}: targetPort {target} is no container port")
    return problems


def probe_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for d in (o for o in objects if o["kind"] == "Deployment"):
        component = d["metadata"]["name"]
        for c in containers(d):
            declared = {p["containerPort"] for p in c["ports"]}
            names = {p.get("name"): p["containerPort"] for p in c["ports"]}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    problems.append(f"{component}: no {kind}")
                    continue
                action = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket") or {}
                port = names.get(action.get("port"), action.get("port"))
                if port not in declared:
                    problems.append(f"{component} {kind}: port {port} is not a container port")
                if (
                    component in GRPC_PORTS
                    and probe.get("grpc", {}).get("port") != GRPC_PORTS[component]
                ):
                    problems.append(f"{component} {kind}: not a grpc probe on its gRPC port")
    return problems


def address_problems(objects: list[Obj]) -> list[str]:
    """Every `--encoder/--decoder/--cache host:port` names a Service exposing that port."""
    problems = []
    flags = {"gateway": ("--encoder", "--decoder", "--cache"), "encoder": ("--cache",)}
    flags["decoder"] = ("--cache",)
    for component, names in flags.items():
        deployment = find(objects, "Deployment", component)
        if deployment is None:
            problems.append(f"no Deployment {component}")
            continue
        for name in names:
            value = flag(containers(deployment)[0], name)
            if value is None:
                problems.append(f"{component}: no {name}")
                continue
            host, _, port = value.removeprefix("dns:///").rpartition(":")
            svc = find(objects, "Service", host)
            if svc is None or int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
                problems.append(f"{component} {name} {value}: no such Service port")
            elif name in ("--encoder", "--decoder") and svc["spec"].get("clusterIP") != "None":
                problems.append(f"Service {host} must be headless (clusterIP: None)")
    return problems


def volume_problems(objects: list[Obj]) -> list[str]:
    problems = []
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    cache = find(objects, "Deployment", "cache")
    assert cache is not None
    pod = cache["spec"]["template"]["spec"]
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    disk_path = flag(container, "--disk-path")
    if disk_path not in mounts or mounts[disk_path] not in volumes:
        problems.append(f"cache --disk-path {disk_path} is not on a PersistentVolumeClaim")
    elif volumes[mounts[disk_path]] not in claims:
        problems.append(f"cache mounts claim {volumes[mounts[disk_path]]}, which is not defined")
    if (
        cache["spec"].get("strategy", {}).get("type") != "Recreate"
        or cache["spec"]["replicas"] != 1
    ):
        problems.append("cache: one replica with a Recreate strategy (ReadWriteOnce disk)")
    return problems


def autoscaler_problems(objects: list[Obj]) -> list[str]:
    problems = []
    hpas = {o["metadata"]["name"]: o for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    for component in ("encoder", "decoder"):
        hpa = hpas.get(component)
        if hpa is None:
            problems.append(f"no HorizontalPodAutoscaler for {component}")
            continue
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(objects, ref["kind"], ref["name"])
        if target is None or ref["name"] != component:
            problems.append(f"HPA {component} targets {ref['kind']}/{ref['name']}")
            continue
        resources = {
            m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
        }
        for c in containers(target):
            missing = resources - set(c.get("resources", {}).get("requests", {}))
            if missing:
                problems.append(f"HPA {component} scales on {missing} the pods do not request")
    return problems


def config_problems(objects: list[Obj]) -> list[str]:
    """Requests on every container; config references resolve; $(VAR) in argv is defined."""
    problems = []
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for d in (o for o in objects if o["kind"] == "Deployment"):
        for pod in _pod_specs(d):
            for c in pod.get("initContainers", []) + pod["containers"]:
                where = f"{d['metadata']['name']}/{c['name']}"
                if c in pod["containers"]:
                    requests = c.get("resources", {}).get("requests", {})
                    if not {"cpu", "memory"} <= set(requests):
                        problems.append(f"{where}: no cpu and memory requests")
                env_names = {e["name"] for e in c.get("env", [])}
                for source in c.get("envFrom", []):
                    ref = source.get("configMapRef", {}).get("name")
                    if ref is not None:
                        if ref not in maps:
                            problems.append(f"{where}: envFrom ConfigMap {ref} is not defined")
                        env_names |= set(maps.get(ref, {}))
                for e in c.get("env", []):
                    key_ref = e.get("valueFrom", {}).get("configMapKeyRef")
                    if key_ref and key_ref["key"] not in maps.get(key_ref["name"], {}):
                        problems.append(f"{where}: {key_ref['name']}.{key_ref['key']} undefined")
                for arg in c.get("command", []) + c.get("args", []):
                    if arg.startswith("$(") and arg[2:-1] not in {
                        e["name"] for e in c.get("env", [])
                    }:
                        problems.append(f"{where}: {arg} is not an env entry of the container")
    return problems


CHECKS: list[Callable[[list[Obj]], list[str]]] = [
    selector_problems,
    probe_problems,
    address_problems,
    volume_problems,
    autoscaler_problems,
    config_problems,
]


# --- tests -------------------------------------------------------------------------------------


def test_renders_every_component(objects: list[Obj]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    for component in COMPONENTS:
        assert ("Deployment", component) in kinds and ("Service", component) in kinds
    assert ("PersistentVolumeClaim", "cache-disk") in kinds
    assert [n for k, n in kinds if k == "HorizontalPodAutoscaler"] == ["decoder", "encoder"]
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "prism"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "prism"
        for c in (c for pod in _pod_specs(obj) for c in pod["containers"]):
            assert c["image"] == "prism:local"


def test_every_object_validates_strictly(objects: list[Obj]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:  # an unknown kind is a failure
            errors.append(e.message)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_cross_references(objects: list[Obj], check: Callable[[list[Obj]], list[str]]) -> None:
    assert check(objects) == []


def _break(objects: list[Obj], kind: str, name: str, edit: Callable[[Obj], None]) -> list[Obj]:
    broken = copy.deepcopy(objects)
    target = find(broken, kind, name)
    assert target is not None
    edit(target)
    return broken


def test_checks_are_live(objects: list[Obj]) -> None:
    """Each check and the schema validation catch a mistake made on purpose."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    def first(obj: Obj) -> Obj:
        return containers(obj)[0]

    def set_flag(name: str, value: str) -> Callable[[Obj], None]:
        def edit(obj: Obj) -> None:
            argv = first(obj)["command"]
            argv[argv.index(name) + 1] = value

        return edit

    mistakes: list[tuple[Callable[[list[Obj]], list[str]], list[Obj]]] = [
        (selector_problems, _break(objects, "Service", "decoder",
                                   lambda o: o["spec"]["selector"].update(component="x"))),
        (selector_problems, _break(objects, "Service", "gateway",
                                   lambda o: o["spec"]["ports"][0].update(targetPort="web"))),
        (probe_problems, _break(objects, "Deployment", "encoder",
                                lambda o: first(o)["livenessProbe"]["grpc"].update(port=50052))),
        (probe_problems, _break(objects, "Deployment", "gateway",
                                lambda o: first(o).pop("readinessProbe"))),
        (address_problems, _break(objects, "Deployment", "gateway",
                                  set_flag("--decoder", "decoders:50052"))),
        (address_problems, _break(objects, "Deployment", "gateway",
                                  set_flag("--cache", "cache:50051"))),
        (address_problems, _break(objects, "Service", "encoder",
                                  lambda o: o["spec"].pop("clusterIP"))),
        (volume_problems, _break(objects, "Deployment", "cache",
                                 set_flag("--disk-path", "/tmp/cache"))),
        (autoscaler_problems, _break(objects, "HorizontalPodAutoscaler", "decoder",
                                     lambda o: o["spec"]["scaleTargetRef"].update(name="dec"))),
        (autoscaler_problems, _break(objects, "Deployment", "encoder",
                                     lambda o: first(o)["resources"]["requests"].pop("cpu"))),
        (config_problems, _break(objects, "Deployment", "decoder",
                                 lambda o: first(o)["env"].clear())),
    ]  # fmt: skip
    for check, broken in mistakes:
        assert check(broken), f"{check.__name__} missed a mistake"
    typo = _break(objects, "Deployment", "decoder", lambda o: o["spec"].update(replica=2))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(find(typo, "Deployment", "decoder"), KUBERNETES_VERSION, True)
    bad_port = _break(objects, "Deployment", "cache",
                      lambda o: first(o)["readinessProbe"]["grpc"].update(port="grpc"))  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            find(bad_port, "Deployment", "cache"), KUBERNETES_VERSION, True
        )


def test_renderer_refuses_unknown_fields(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(AssertionError, match="patches"):
        render(tmp_path)


def _key(obj: Obj) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def test_matches_kubectl_kustomize(objects: list[Obj]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the built-in renderer alone is used")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATION_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=_key)
    assert sorted(objects, key=_key) == theirs
