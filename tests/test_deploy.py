"""deploy/k8s: every manifest lints (yamllint) and is a valid object of its Kubernetes API
kind (the kubernetes package's models: no unknown field, every required one); the
ConfigMap's TOML loads as the worker would; probes, grace period, resources and the
KEDA thresholds agree with the config and the measured figures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import load_config
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
KINDS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
         ("v1", "ConfigMap"): "V1ConfigMap",
         ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def strict(model: str, value: Any, where: str) -> list[str]:
    """What in `value` the kubernetes model `model` does not allow (unknown fields,
    wrong types), recursively."""
    from kubernetes import client

    if model.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: a list is expected"]
        return [p for i, v in enumerate(value) for p in strict(model[5:-1], v, f"{where}[{i}]")]
    if model.startswith("dict("):
        inner = model[model.index(",") + 1:-1].strip()
        if not isinstance(value, dict):
            return [f"{where}: a map is expected"]
        return [p for k, v in value.items() for p in strict(inner, v, f"{where}.{k}")]
    if model == "object":  # IntOrString, quantities, raw extensions
        return [] if isinstance(value, (str, int, float, dict)) else [f"{where}: {value!r}"]
    if model in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[model]) and not (
            model != "bool" and isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not {model}"]
    cls = getattr(client, model)
    if not isinstance(value, dict):
        return [f"{where}: an object ({model}) is expected"]
    fields = {json_key: python for python, json_key in cls.attribute_map.items()}
    problems = [f"{where}.{k}: not a field of {model}" for k in value if k not in fields]
    return problems + [p for k, v in value.items() if k in fields
                       for p in strict(cls.openapi_types[fields[k]], v, f"{where}.{k}")]


def test_the_manifests_lint_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    rules = YamlLintConfig("extends: default\nrules:\n  line-length: {max: 100}\n"
                           "  document-start: disable\n  comments: {min-spaces-from-content: 1}\n"
                           "  braces: {max-spaces-inside: 1}\n")
    problems = [f"{path.name}:{p.line}: {p.message}" for path in sorted(K8S.glob("*.yaml"))
                for p in linter.run(path.read_text(), rules)]
    assert problems == []


def test_every_manifest_is_of_a_kind_checked_here():
    kinds = {(d["apiVersion"], d["kind"]) for d in manifests()}
    # KEDA's ScaledObject is a custom resource: test_keda_scales_on_in_flight_jobs_...
    assert kinds - set(KINDS) == {("keda.sh/v1alpha1", "ScaledObject")}


@pytest.mark.parametrize("doc", [d for d in manifests() if (d["apiVersion"], d["kind"]) in KINDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_is_a_valid_object_of_its_kind(doc):
    from kubernetes import client

    model = KINDS[(doc["apiVersion"], doc["kind"])]
    assert strict(model, doc, doc["kind"]) == []
    # The models' own checks: required fields present, enums and formats right. (The
    # client's public deserialize wants an HTTP response; this is what it calls.)
    api = client.ApiClient()
    parsed = api._ApiClient__deserialize(json.loads(json.dumps(doc)), model)
    assert parsed.metadata.name == doc["metadata"]["name"]


def test_the_mistakes_it_catches():
    # The checker itself: an unknown field, a wrong type, a missing required field.
    from kubernetes import client

    bad = by_kind("Deployment", "chat-actors-worker")
    bad = json.loads(json.dumps(bad))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    bad["spec"]["replicas"] = "2"
    assert strict("V1Deployment", bad, "d") == [
        "d.spec.replicas: '2' is not int",
        "d.spec.template.spec.containers[0].livenessprobe: not a field of V1Container"]
    del bad["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        client.ApiClient()._ApiClient__deserialize(bad, "V1Deployment")


def shipped_config(tmp_path: Path):
    text = by_kind("ConfigMap", "chat-actors-config")["data"]["chat-actors.toml"]
    path = tmp_path / "chat-actors.toml"
    path.write_text(text)
    return load_config(path, environ={})


def test_the_config_map_loads_as_the_worker_would(tmp_path):
    config = shipped_config(tmp_path)
    assert config.postgres.prepare_after is None  # behind PgBouncer: prepare nothing
    assert config.log.format == "json"


@pytest.mark.parametrize("name", ["chat-actors-worker", "chat-actors-gateway"])
def test_probes_grace_and_resources_follow_the_config_and_the_measurements(name, tmp_path):
    config = shipped_config(tmp_path)
    deployment = by_kind("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = config.health.port if name.endswith("worker") else config.gateway.port
    assert list(ports.values()) == [port]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert ports[container[probe]["httpGet"]["port"]] == port
    assert container["args"] == ["--config", "/etc/chat-actors/chat-actors.toml"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    budget = next(d for d in manifests() if d["kind"] == "PodDisruptionBudget"
                  and d["spec"]["selector"]["matchLabels"] == selector)
    assert budget["spec"]["maxUnavailable"] == 1
    if name.endswith("worker"):
        # SIGKILL only after the drain: the grace period is above shutdown.grace_s.
        assert pod["terminationGracePeriodSeconds"] > config.shutdown.grace_s + 5
        measured = json.loads((ROOT / "bench/results/perf.json").read_text())["results"]
        loaded_mb = measured["chat-actors"]["memory_1000"]["loaded_rss_mb"]
        request = container["resources"]["requests"]["memory"]
        assert int(re.fullmatch(r"(\d+)Mi", request).group(1)) > loaded_mb


def test_keda_scales_on_in_flight_jobs_and_on_lag_above_what_runs(tmp_path):
    config = shipped_config(tmp_path)
    scaled = by_kind("ScaledObject", "chat-actors-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "chat-actors-worker"
    by_deployment = by_kind("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert by_deployment["kind"] == "Deployment"
    assert scaled["spec"]["maxReplicaCount"] <= config.kafka.partitions
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    metric = re.search(r"\b(chat_actors_\w+)", triggers["prometheus"]["query"]).group(1)
    assert metric == "chat_actors_jobs_in_flight"
    from actors.metrics import Metrics

    assert metric in {m.name for m in Metrics().registry.collect()}
    # In flight: a target under max_in_flight, so workers are added before any is full.
    assert 0 < int(triggers["prometheus"]["threshold"]) < config.jobs.max_in_flight
    # Lag counts running jobs (offsets commit when a job ends): above max_in_flight.
    assert int(triggers["kafka"]["lagThreshold"]) > config.jobs.max_in_flight
    assert triggers["kafka"]["topic"] == config.kafka.request_topic
    assert triggers["kafka"]["consumerGroup"] == config.kafka.group_id


def test_the_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def test_the_compose_images_match_the_pinned_clients():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    pins = dict(re.findall(r'"([a-z0-9-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    images = {s["image"].split(":")[0]: s["image"].split(":")[1]
              for s in compose["services"].values() if "image" in s}
    assert images["chromadb/chroma"] == pins["chromadb"]
