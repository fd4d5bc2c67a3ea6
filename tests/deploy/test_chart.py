"""The Helm chart, rendered offline through the Helm SDK for each value permutation: lint,
Kubernetes schema validation, policy checks, and consistency with the gateway's CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate as kv
import pytest
import yaml

from services.cli import _parser
from tests.deploy.chart import (
    CHART,
    CRD_KINDS,
    KUBE_VERSION,
    PERMUTATIONS,
    objects,
    of_kind,
    pod_specs,
    render,
)

CASES = list(PERMUTATIONS.items())
IDS = list(PERMUTATIONS)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values: dict[str, Any] = request.param[1]
    return values, objects(render(values))


@pytest.mark.parametrize("values", [v for _, v in CASES], ids=IDS)
def test_lint_passes_for_every_permutation(values: dict[str, Any]) -> None:
    result = helm.lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
    assert result["errors"] == [], result
    serious = [m for m in result["messages"] if m["severity"] > 1]  # 1 = info
    assert serious == [], serious


def test_every_object_is_valid_for_kubernetes(case: tuple[dict[str, Any], list[dict]]) -> None:
    _, docs = case
    assert len(docs) > 8
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate; checked by the tests below
        kv.validate(doc, KUBE_VERSION, strict=True)


def test_kubernetes_validation_catches_a_broken_object() -> None:
    """The schema check can fail: a misspelt field in a rendered Deployment is refused."""
    docs = objects(render({}))
    deployment = of_kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSION, strict=True)


def test_policy_non_root_read_only_limits_pinned(case: tuple[dict[str, Any], list[dict]]) -> None:
    _, docs = case
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        pod_ctx = spec.get("securityContext", {})
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name} container {c['name']}"
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind}"
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag and tag not in ("", "latest"), where


def test_policy_probes_on_every_long_running_container(
        case: tuple[dict[str, Any], list[dict]]) -> None:
    _, docs = case
    for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{d['metadata']['name']}/{c['name']}: no {probe}"


def test_gpu_limits_and_scheduling_follow_the_gpu_switch(
        case: tuple[dict[str, Any], list[dict]]) -> None:
    values, docs = case
    gpu = values.get("triton", {}).get("gpu", {}).get("enabled", True)
    triton = [c for name, spec in pod_specs(docs) if "triton" in name
              for c in spec["containers"] if not name.startswith("Job/")]
    assert triton
    for c in triton:
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) is gpu
    if not values.get("kserve", {}).get("enabled"):
        spec = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
        if gpu:
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:  # the GPU pool's selector and tolerations do not apply to a CPU Triton
            assert "nodeSelector" not in spec and "tolerations" not in spec


def test_triton_image_and_ports(case: tuple[dict[str, Any], list[dict]]) -> None:
    values, docs = case
    if values.get("kserve", {}).get("enabled"):
        assert not of_kind(docs, "Deployment")
        (runtime,) = of_kind(docs, "ServingRuntime")
        (isvc,) = of_kind(docs, "InferenceService")
        assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
        assert runtime["spec"]["containers"][0]["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
        return
    (deployment,) = of_kind(docs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    mode = values.get("triton", {}).get("modelControlMode", "poll")
    assert f"--model-control-mode={mode}" in c["args"]
    service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-triton"))
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}


# The CPU path for an OpenVINO repository: the stock NGC image's openvino backend, selected by
# configs/openvino.pbtxt, with no custom Triton image (values as `bedside deploy` writes them).
OPENVINO_CPU: dict[str, Any] = {
    "triton": {"gpu": {"enabled": False}, "nodeSelector": {}, "tolerations": [],
               "modelConfigName": "openvino"}}


@pytest.mark.parametrize("kserve", [False, True], ids=["deployment", "kserve"])
def test_openvino_cpu_path_runs_the_stock_image_with_the_openvino_config(kserve: bool) -> None:
    values = {**OPENVINO_CPU, "kserve": {"enabled": kserve}}
    result = helm.lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
    assert result["errors"] == [], result
    rendered = render(values)
    docs = objects(rendered)
    if kserve:
        (runtime,) = of_kind(docs, "ServingRuntime")
        (c,) = runtime["spec"]["containers"]
    else:
        (deployment,) = of_kind(docs, "Deployment")
        kv.validate(deployment, KUBE_VERSION, strict=True)
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert c["args"].count("--model-config-name=openvino") == 1
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "configs/openvino.pbtxt" in rendered["bedside/templates/NOTES.txt"]
    # without the setting Triton keeps config.pbtxt: no flag at all
    default = objects(render({"kserve": {"enabled": kserve}}))
    (plain,) = [c for _, spec in pod_specs(default) for c in spec["containers"]
                if c["name"] in ("triton", "kserve-container")]
    assert not any(a.startswith("--model-config-name") for a in plain["args"])


def test_model_repository_source(case: tuple[dict[str, Any], list[dict]]) -> None:
    values, docs = case
    if values.get("kserve", {}).get("enabled"):
        return
    source = values.get("model", {}).get("repository", {}).get("source", "pvc")
    spec = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
    inits = [c["name"] for c in spec.get("initContainers", [])]
    if source == "pvc":
        assert volume["persistentVolumeClaim"]["claimName"] == "bedside-models"
        assert "fetch-models" not in inits and "copy-models" not in inits
    else:
        assert "emptyDir" in volume
        assert ("fetch-models" if source == "objectStore" else "copy-models") in inits


def test_gateway_args_are_accepted_by_the_bedside_cli(
        case: tuple[dict[str, Any], list[dict]]) -> None:
    """The chart and `bedside gateway` cannot drift apart: the rendered command line parses."""
    values, docs = case
    (sts,) = of_kind(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bedside", "gateway"]
    args = _parser().parse_args(["gateway", *c["args"]])
    assert args.model == "cxr-lesion"
    assert args.http_host == "0.0.0.0"
    kserve = values.get("kserve", {}).get("enabled", False)
    expected = ("demo-bedside-triton-predictor.bedside.svc:80" if kserve
                else "demo-bedside-triton.bedside.svc:8001")
    assert args.triton_url == expected, shlex.join(c["args"])
    allowed = values.get("gateway", {}).get("allowedAETitles", [])
    assert list(args.allowed_ae or []) == allowed
    gw = values.get("gateway", {})
    dicom_tls = gw.get("dicomTls", {}).get("enabled", False)
    tls = gw.get("tls", {}).get("enabled", False)
    assert (args.tls_cert is not None) is (tls or dicom_tls)
    assert args.plaintext is not tls
    assert args.dicom_plaintext is (tls and not dicom_tls)
    assert (args.tls_ca is not None) is (gw.get("tls", {}).get("clientCA", False) if tls
                                         else dicom_tls)
    # security is an explicit choice: keys (from a Secret) unless auth is turned off
    auth = gw.get("auth", {}).get("enabled", True)
    assert (args.api_keys is not None, args.no_auth) == (auth, not auth)
    assert args.allowed_source == gw.get("allowedSources", [])
    assert str(args.audit_log) == gw.get("audit", {}).get("log", "-")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for flag in (args.api_keys, args.tls_cert, args.tls_key, args.tls_ca):
        assert flag is None or str(flag.parent) in mounts, flag
    schemes = {c[p]["httpGet"]["scheme"] for p in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert schemes == {"HTTPS" if tls else "HTTP"}
    # the manifest the gateway reads is the one in the values, mounted from a ConfigMap
    cm = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-model"))
    assert json.loads(cm["data"]["manifest.json"])["name"] == "cxr-lesion"


def test_delivery_routes_reach_the_gateway_and_pass_its_validation(
        case: tuple[dict[str, Any], list[dict]], tmp_path: Path) -> None:
    """The routes in the values become the gateway's --routes file, and that file passes the
    gateway's own validation (the Secret's files stood in for by local ones)."""
    from services.gateway.delivery.routing import parse_routes

    values, docs = case
    delivery = values.get("gateway", {}).get("delivery", {})
    (sts,) = of_kind(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    routes_cms = [d for d in of_kind(docs, "ConfigMap")
                  if d["metadata"]["name"].endswith("-routes")]
    if not delivery.get("routes"):
        assert routes_cms == [] and not any(a.startswith("--routes") for a in c["args"])
        return
    assert "--routes=/etc/bedside/routes/routes.yaml" in c["args"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/etc/bedside/routes"]]["configMap"]["name"] == \
        routes_cms[0]["metadata"]["name"]
    assert volumes[mounts["/etc/bedside/delivery"]]["secret"]["secretName"] == \
        delivery["secretName"]
    for name in ("deid.key", "pacs-ca.pem", "research.token"):
        (tmp_path / name).write_text("x" * 32)
    text = routes_cms[0]["data"]["routes.yaml"].replace("/etc/bedside/delivery", str(tmp_path))
    config = parse_routes(yaml.safe_load(text), tmp_path)
    assert set(config.destinations) == set(delivery["routes"]["destinations"])


def test_network_policies_restrict_triton_and_dicom(
        case: tuple[dict[str, Any], list[dict]]) -> None:
    _, docs = case
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    triton = policies["demo-bedside-triton"]["spec"]["ingress"]
    assert triton[0]["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "bedside", "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "gateway"}}}]
    gateway = policies["demo-bedside-gateway"]["spec"]["ingress"]
    dicom_rule = next(r for r in gateway if r["ports"][0]["port"] == 11112)
    assert [f["ipBlock"]["cidr"] for f in dicom_rule["from"]] == ["10.0.0.0/8"]


def test_monitoring_objects(case: tuple[dict[str, Any], list[dict]]) -> None:
    _, docs = case
    assert of_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"] == "/metrics"
    assert of_kind(docs, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"BedsideLatencyP95High", "BedsideErrorRatioHigh", "BedsideQueueTimeHigh",
                      "BedsideTritonDown", "BedsideGatewayDown", "BedsideDeliveryDeadLetters",
                      "BedsideDeliveryStalled", "BedsideShadowAgreementLow",
                      "BedsideShadowDiceLow"}
    dashboard = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith(
        "-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["bedside.json"])["panels"]


def test_engine_build_job_is_a_hook_on_gpu_nodes() -> None:
    docs = objects(render(PERMUTATIONS["gpu, oci, tensorrt engines, autoscaling"]))
    (job,) = of_kind(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    spec = job["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    hook_cm = next(d for d in of_kind(docs, "ConfigMap")
                   if d["metadata"]["name"] == "demo-bedside-triton-engines-hook")
    assert int(hook_cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    pvc = next(d for d in of_kind(docs, "PersistentVolumeClaim"))
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    triton = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in triton["initContainers"]] == ["copy-models", "stage-engines"]
    assert "--model-repository=/served" in triton["containers"][0]["args"]


@pytest.mark.parametrize(("values", "message"), [
    ({"triton": {"image": {"tag": "latest"}}}, "/triton/image/tag"),
    ({"gateway": {"image": {"tag": ""}}}, "/gateway/image/tag"),
    ({"gateway": {"aeTitle": "A-TITLE-LONGER-THAN-16"}}, "/gateway/aeTitle"),
    ({"networkPolicy": {"dicomAllowedCIDRs": ["10.0.0.0"]}}, "/networkPolicy/dicomAllowedCIDRs"),
    # null removes a default (Helm's merge): a container without a CPU limit is refused
    ({"gateway": {"resources": {"limits": {"cpu": None}}}}, "/gateway/resources/limits"),
    ({"triton": {"replica": 2}}, "replica"),
    ({"model": {"repository": {"source": "nfs"}}}, "/model/repository/source"),
    ({"triton": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
    ({"triton": {"modelConfigName": "../openvino"}}, "/triton/modelConfigName"),
    # several gateway replicas need the PostgreSQL job table and one shared spool
    ({"gateway": {"replicas": 2}}, "/gateway/jobTable/backend"),
    ({"gateway": {"replicas": 2, "jobTable": {"backend": "postgresql",
                                               "postgresql": {"host": "db"}}}},
     "/gateway/spool/shared/enabled"),
    ({"gateway": {"autoscaling": {"enabled": True, "maxReplicas": 3}}},
     "/gateway/jobTable/backend"),
    ({"gateway": {"jobTable": {"backend": "postgresql"}}}, "/gateway/jobTable/postgresql/host"),
    ({"gateway": {"jobTable": {"backend": "mysql"}}}, "/gateway/jobTable/backend"),
])
def test_values_schema_refuses_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message.replace("/", ".")):
        render(values)


def test_template_guards() -> None:
    with pytest.raises(helm.HelmError, match=r"objectStore\.uri is required"):
        render({"model": {"repository": {"source": "objectStore"}}})
    with pytest.raises(helm.HelmError, match=r"must equal model\.name"):
        render({"model": {"name": "other"}})


def test_several_models_each_manifest_mounted_and_served() -> None:
    seg = {**yaml.safe_load((CHART / "values.yaml").read_text())["model"]["manifest"],
           "name": "ct-seg", "task": "segmentation"}
    docs = objects(render({"model": {"others": [seg]},
                           "triton": {"modelControlMode": "explicit"},
                           "gateway": {"models": ["ct-seg"],
                                       "versions": {"shadow": ["ct-seg=2"],
                                                    "canary": ["cxr-lesion=3:0.1"]}}}))
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-model")]
    assert json.loads(config["data"]["ct-seg.manifest.json"])["task"] == "segmentation"
    (gateway,) = of_kind(docs, "StatefulSet")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--serve-model=ct-seg" in args and "--shadow=ct-seg=2" in args
    assert "--canary=cxr-lesion=3:0.1" in args
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/bedside/models/ct-seg/manifest.json"]["subPath"] == \
        "ct-seg.manifest.json"
    with pytest.raises(helm.HelmError, match=r"give its manifest in model\.others"):
        render({"gateway": {"models": ["absent"]}})


@pytest.mark.parametrize("versions", [{"shadow": ["cxr-lesion=2"]},
                                      {"canary": ["cxr-lesion=2:0.1"]}])
def test_versions_need_triton_explicit_model_control(versions: dict[str, list[str]]) -> None:
    with pytest.raises(helm.HelmError, match="modelControlMode"):
        render({"gateway": {"versions": versions}})  # the default mode is poll
    docs = objects(render({"gateway": {"versions": versions},
                           "triton": {"modelControlMode": "explicit"}}))
    assert of_kind(docs, "StatefulSet")


def test_two_replicas_share_a_postgresql_job_table_and_one_spool_claim() -> None:
    docs = objects(render(PERMUTATIONS[
        "two gateway replicas on postgresql, an existing shared spool claim"]))
    sts = next(d for d in of_kind(docs, "StatefulSet") if d["spec"]["template"]["spec"][
        "containers"][0]["command"] == ["bedside", "gateway"])
    assert sts["spec"]["replicas"] == 2 and "volumeClaimTemplates" not in sts["spec"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--job-db=postgresql://gw@jobs.db.svc:5432/bedside_jobs" in container["args"]
    assert not [a for a in container["args"] if "password" in a.lower()]
    (env,) = [e for e in container["env"] if e["name"] == "BEDSIDE_JOB_DB_PASSWORD"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "jobs-db", "key": "pw"}
    (spool,) = [v for v in pod["volumes"] if v["name"] == "spool"]
    assert spool["persistentVolumeClaim"]["claimName"] == "spool-rwx"
    assert not [d for d in of_kind(docs, "PersistentVolumeClaim")
                if d["metadata"]["name"].endswith("-spool")]  # the existing claim is used


def test_shared_spool_claim_is_read_write_many_when_the_chart_makes_it() -> None:
    docs = objects(render(PERMUTATIONS["gpu, oci, tensorrt engines, autoscaling"]))
    (pvc,) = [d for d in of_kind(docs, "PersistentVolumeClaim")
              if d["metadata"]["name"] == "demo-bedside-gateway-spool"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    defaults = objects(render({}))
    sts = next(d for d in of_kind(defaults, "StatefulSet")
               if d["metadata"]["name"] == "demo-bedside-gateway")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "--job-db=sqlite" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
