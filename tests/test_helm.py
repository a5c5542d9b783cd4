"""The Helm chart with the real helm binary: lint, render, schema-checked values, the real
apiserver's verdict on every rendered object, a real `helm install`/`upgrade`, and the RBAC it
grants checked with `kubectl auth can-i --as` (everything the operator needs, nothing beyond).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgeline_operator.controller.settings import OperatorSettings

from .conftest import ALL_TOGGLES, CHART, CRDS, Cluster, Release, helm

NAMESPACED_SCOPE = ("rbac.scope=namespaces",)


def _render(
    *sets: str, namespace: str = "forgeline-system", release: str = "forgeline"
) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "-n", namespace]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


# -- lint and render ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        (),
        (ALL_TOGGLES,),
        NAMESPACED_SCOPE,
        (
            "operator.backend=address",
            "operator.rayAddress=http://ray:8265",
            "operator.rayTokenSecret=ray-token",
        ),
    ],
    ids=["defaults", "all-toggles", "namespaced", "address-backend"],
)
def test_helm_lint(sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_default_render_is_the_operator_and_its_rbac() -> None:
    docs = _render()
    assert _kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "forgeline"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["FORGELINE_BACKEND"] == "kuberay" and env["FORGELINE_WATCH_NAMESPACES"] == ""
    assert json.loads(env["FORGELINE_NODE_POOLS"])["h100"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }


def test_cost_and_pool_memory_values_reach_the_operators_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the chart renders is what OperatorSettings reads: the price, the currency and each
    pool's gpuMemory and pricePerGpuHour (floats need --set-json: helm --set makes them strings)."""
    args = ["template", "forgeline", str(CHART), "--set-json", "cost.pricePerGpuHour=2.5"]
    args += ["--set-json", 'nodePools.spot={"gpuMemory": "24Gi", "pricePerGpuHour": 0.9}']
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
        if e["name"].startswith("FORGELINE_") and "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    settings = OperatorSettings()
    assert settings.price_per_gpu_hour == 2.5 and settings.currency == "$"
    assert settings.node_pools["h100"].gpu_memory_bytes() == 80 * 2**30
    assert settings.price_for("spot") == 0.9 and settings.price_for("h100") == 2.5
    defaults = [d for d in _render() if d["kind"] == "Deployment"][0]
    names = {e["name"] for e in defaults["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "FORGELINE_PRICE_PER_GPU_HOUR" not in names  # null: GPU-hours only


def test_every_toggle_on_renders_the_monitoring_objects() -> None:
    docs = _render(ALL_TOGGLES)
    assert _kinds(docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "PodMonitor",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    by_kind = {d["kind"]: d for d in docs}
    dashboard = by_kind["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files/dashboards/forgeline.json").read_text()
    assert json.loads(dashboard["data"]["forgeline.json"]) == json.loads(shipped)
    rules = yaml.safe_load((CHART / "files/alerts/forgeline.rules.yaml").read_text())
    assert by_kind["PrometheusRule"]["spec"] == rules
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert (
        by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
        == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    )
    assert by_kind["PodMonitor"]["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "forgeline"
    }


def test_pod_security_is_restricted() -> None:
    dep = next(d for d in _render() if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctr["readOnlyRootFilesystem"] is True and ctr["allowPrivilegeEscalation"] is False
    assert ctr["capabilities"] == {"drop": ["ALL"]} and "add" not in ctr["capabilities"]
    assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]


@pytest.mark.parametrize("sets", [(), NAMESPACED_SCOPE], ids=["cluster", "namespaced"])
def test_rbac_has_no_wildcards_exec_or_secret_listing(sets: tuple[str, ...]) -> None:
    rules = _rules(_render(*sets))
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        if "pods" in rule["resources"]:  # a finished job's Ray pods, by label (backends.py)
            assert rule["resources"] == ["pods"] and rule["verbs"] == ["deletecollection"], rule
        assert not {
            "pods/exec",
            "pods/attach",
            "deployments",
            "clusterroles",
            "roles",
            "rolebindings",
            "clusterrolebindings",
            "serviceaccounts",
        } & set(rule["resources"]), rule
        if "secrets" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "create", "delete"}, rule
        if rule["resources"] == ["namespaces"] or "customresourcedefinitions" in rule["resources"]:
            assert set(rule["verbs"]) <= {"list", "watch"}, rule


def test_namespaced_scope_grants_nothing_cluster_wide() -> None:
    docs = _render("rbac.scope=namespaces", "watchNamespaces={team-a,team-b}")
    assert _kinds(docs) == [
        "Deployment",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role") == ["team-a", "team-b"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FORGELINE_WATCH_NAMESPACES"] == "team-a,team-b"
    only_release = _render("rbac.scope=namespaces", namespace="ml")
    assert [d["metadata"]["namespace"] for d in only_release if d["kind"] == "Role"] == ["ml"]


def test_chart_crds_are_the_generated_ones() -> None:
    generated = sorted(p.name for p in CRDS.glob("*.yaml"))
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (CRDS / name).read_text(), (
            f"helm/forgeline/crds/{name} drifted from crds/: run `make crds`"
        )


# -- bad values fail at install time, naming the value -----------------------------------------


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (("maxRunningJobs=-1",), "at '/maxRunningJobs': minimum: got -1, want 0"),
        (("rbac.scope=everything",), "at '/rbac/scope': value must be one of 'cluster', 'namespaces'"),
        (("imag.tag=1.0",), "additional properties 'imag' not allowed"),
        (("watchNamespaces={Team_A}",), "at '/watchNamespaces/0': 'Team_A' does not match pattern"),
        (("operator.backend=slurm",), "at '/operator/backend': value must be one of 'kuberay', 'address'"),
        (("metrics.serviceMonitor.interval=soon",), "at '/metrics/serviceMonitor/interval'"),
        (("nodePools.H100.nodeSelector.a=b",), "invalid propertyName 'H100'"),
        (("nodePools.h100.tolerations[0].effect=Never",), "at '/nodePools/h100/tolerations/0/effect'"),
        (("resources.limits.memory=lots",), "at '/resources/limits/memory'"),
        (("operator.backend=address",), "operator.rayAddress is required when operator.backend is address"),
        (
            ("rbac.scope=namespaces", "watchNamespaces={team-*}"),
            'watchNamespaces: "team-*" is a glob; rbac.scope=namespaces needs exact namespace names',
        ),
        (
            ("serviceAccount.create=false",),
            "serviceAccount.name is required when serviceAccount.create is false",
        ),
        (
            ("metrics.service.enabled=false", "metrics.serviceMonitor.enabled=true"),
            "metrics.serviceMonitor.enabled needs metrics.service.enabled=true",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_bad_values_are_rejected(sets: tuple[str, ...], expected: str) -> None:
    args = ["template", "forgeline", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args, check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert expected in proc.stderr, proc.stderr


def test_every_value_is_documented() -> None:
    """KubeRay style: each setting in values.yaml has a `# --` comment above it (maps the schema
    leaves open, like resources or nodeSelector, are documented once, at their key)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node: Any = schema
        closed = True
        for part in path[:-1]:
            if node.get("additionalProperties", True) is not False:
                closed = False
                break
            node = node["properties"][part]
        if not closed or node.get("additionalProperties", True) is not False:
            continue  # inside a free-form map (documented at its key)
        child = node["properties"][key]
        if child.get("type") == "object" and child.get("additionalProperties") is False:
            continue  # a section header; its settings carry the docs
        j = i - 1
        comment = []
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.append(lines[j].strip())
            j -= 1
        if not any(c.startswith("# --") for c in comment):
            undocumented.append(".".join(path))
    assert undocumented == []


# -- the real apiserver and a real install -----------------------------------------------------


@pytest.fixture
def scratch_namespaces(cluster: Cluster) -> Iterator[list[str]]:
    with cluster.scratch_namespace("h") as first, cluster.scratch_namespace("h") as second:
        yield [first, second]


@pytest.mark.cluster
@pytest.mark.parametrize(
    "sets", [(), (ALL_TOGGLES,), NAMESPACED_SCOPE], ids=["defaults", "all-toggles", "namespaced"]
)
def test_every_rendered_object_is_accepted_by_the_apiserver(
    cluster: Cluster, monitoring_crds: None, scratch_namespaces: list[str], sets: tuple[str, ...]
) -> None:
    ns, watched = scratch_namespaces
    extra = (f"watchNamespaces={{{watched}}}",) if sets == NAMESPACED_SCOPE else ()
    args = ["template", f"dry-{ns}", str(CHART), "-n", ns, "--include-crds"]
    for s in (*sets, *extra):
        args += ["--set", s]
    rendered = helm(*args).stdout
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered).stdout
    created = [line for line in out.splitlines() if line.strip()]
    expected = len([d for d in yaml.safe_load_all(rendered) if d])
    assert len(created) == expected, out
    assert all("(server dry run)" in line for line in created), out


@pytest.mark.cluster
def test_helm_install_and_upgrade_for_real(cluster: Cluster, release: Release) -> None:
    assert "kubectl get trainingjobs,finetunejobs -A -w" in release.install_output  # NOTES.txt
    status = json.loads(
        helm(
            "status", release.name, "-n", release.namespace, "-o", "json", kubeconfig=cluster.kubeconfig
        ).stdout
    )
    assert status["info"]["status"] == "deployed" and status["version"] == 1
    for kind in (
        "deployment",
        "serviceaccount",
        "service",
        "servicemonitor",
        "podmonitor",
        "prometheusrule",
        "configmap",
    ):
        got = cluster.kubectl(
            "get", kind, "-n", release.namespace, "-l", "app.kubernetes.io/instance=forgeline", "-o", "name"
        ).stdout
        assert got.strip(), f"no {kind} installed"
    cluster.kubectl("get", "clusterrole/forgeline", "clusterrolebinding/forgeline")

    helm(
        "upgrade",
        release.name,
        str(CHART),
        "-n",
        release.namespace,
        "--reuse-values",
        "--set",
        "maxRunningJobs=3",
        kubeconfig=cluster.kubeconfig,
    )
    dep = json.loads(
        cluster.kubectl("get", "deployment", "forgeline", "-n", release.namespace, "-o", "json").stdout
    )
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FORGELINE_MAX_RUNNING_JOBS"] == "3"
    bad = helm(
        "upgrade",
        release.name,
        str(CHART),
        "-n",
        release.namespace,
        "--reuse-values",
        "--set",
        "maxRunningJobs=-3",
        kubeconfig=cluster.kubeconfig,
        check=False,
    )
    assert bad.returncode != 0 and "maxRunningJobs" in bad.stderr
    history = json.loads(
        helm(
            "history", release.name, "-n", release.namespace, "-o", "json", kubeconfig=cluster.kubeconfig
        ).stdout
    )
    assert [h["status"] for h in history] == ["superseded", "deployed"]


def _can_i(cluster: Cluster, user: str, verb: str, resource: str, *where: str) -> bool:
    out = cluster.kubectl("auth", "can-i", verb, resource, *where, "--as", user, check=False).stdout.strip()
    return out == "yes"


# What the operator does (handlers, backends, kopf) — and must be able to do.
NEEDED = [
    ("watch", "trainingjobs.forgeline.dev"),
    ("list", "finetunejobs.forgeline.dev"),
    ("patch", "trainingjobs.forgeline.dev"),
    ("patch", "finetunejobs.forgeline.dev/status"),
    ("delete", "trainingjobs.forgeline.dev"),
    ("create", "rayclusters.ray.io"),
    ("get", "rayclusters.ray.io"),
    ("delete", "rayclusters.ray.io"),
    ("create", "secrets"),
    ("get", "secrets"),
    ("delete", "secrets"),
    ("create", "events"),
    ("deletecollection", "pods"),
]
# Things it never does.
BEYOND = [
    ("list", "secrets"),
    ("watch", "secrets"),
    ("update", "secrets"),
    ("create", "pods"),
    ("create", "pods/exec"),
    ("get", "pods/log"),
    ("delete", "pods"),
    ("get", "pods"),
    ("list", "pods"),
    ("patch", "pods"),
    ("create", "deployments.apps"),
    ("get", "configmaps"),
    ("create", "serviceaccounts/token"),
    ("update", "trainingjobs.forgeline.dev"),
    ("create", "trainingjobs.forgeline.dev"),
    ("patch", "rayclusters.ray.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("*", "*"),
]


@pytest.mark.cluster
def test_rbac_cluster_scope_grants_what_the_operator_needs_and_nothing_more(
    cluster: Cluster, release: Release, scratch_namespaces: list[str]
) -> None:
    ns = scratch_namespaces[0]
    missing = [f"{v} {r}" for v, r in NEEDED if not _can_i(cluster, release.user, v, r, "-n", ns)]
    assert missing == []
    extra = [f"{v} {r}" for v, r in BEYOND if _can_i(cluster, release.user, v, r, "-n", ns)]
    assert extra == []
    assert _can_i(cluster, release.user, "watch", "trainingjobs.forgeline.dev", "-A")
    assert _can_i(cluster, release.user, "list", "namespaces")
    assert not _can_i(cluster, release.user, "list", "secrets", "-A")
    assert not _can_i(cluster, release.user, "delete", "namespaces")


@pytest.mark.cluster
def test_rbac_namespaced_scope_stays_in_its_namespaces(
    cluster: Cluster, ray_crd: None, scratch_namespaces: list[str], tmp_path: Path
) -> None:
    """rbac.scope=namespaces installed for real: the operator may touch jobs in the watched
    namespace only, has no cluster-wide permission at all, and (run with that token) still
    turns a job there into a RayCluster."""
    from .test_operator import Operator, _apply, _example, _wait

    home, other = scratch_namespaces
    name = "fl-ns"
    helm(
        "install",
        name,
        str(CHART),
        "-n",
        home,
        "--skip-crds",
        "--set",
        "rbac.scope=namespaces",
        kubeconfig=cluster.kubeconfig,
    )
    try:
        user = f"system:serviceaccount:{home}:{name}-forgeline"
        assert all(_can_i(cluster, user, v, r, "-n", home) for v, r in NEEDED)
        assert not any(_can_i(cluster, user, v, r, "-n", other) for v, r in NEEDED)
        assert not _can_i(cluster, user, "list", "namespaces")
        assert not _can_i(cluster, user, "list", "customresourcedefinitions.apiextensions.k8s.io")
        assert not _can_i(cluster, user, "watch", "trainingjobs.forgeline.dev", "-A")

        token = cluster.kubectl("create", "token", f"{name}-forgeline", "-n", home).stdout.strip()
        op = Operator(
            cluster,
            tmp_path,
            tmp_path / "operator.log",
            cluster.token_kubeconfig(token, tmp_path / "kc"),
            FORGELINE_BACKEND="kuberay",
            FORGELINE_WATCH_NAMESPACES=home,
        )
        op.start()
        try:
            _apply(cluster, home, _example("pretrain-tiny-llama"))
            _wait(
                lambda: json.loads(cluster.kubectl("get", "rayclusters", "-n", home, "-o", "json").stdout)[
                    "items"
                ],
                60,
                "the RayCluster",
                op,
            )
            assert op.forbidden() == []
            cluster.kubectl("delete", "tj", "tiny-llama", "-n", home, "--timeout=60s")
        finally:
            op.stop()
    finally:
        helm("uninstall", name, "-n", home, kubeconfig=cluster.kubeconfig, check=False)
