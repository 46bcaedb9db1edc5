"""Drive a fairlead API server with the official Python `kubernetes` client.

Usage: client_ops.py <kubeconfig>

Runs create / list / watch / patch / stale replace / delete / read against
Services in `default` and prints ONE JSON line with what it observed; the
Rust test (tests/python_client.rs) asserts on it. Exits 0 when every step ran
(the JSON says what each step saw), 1 with {"error": ...} when a step raised
something unexpected.

Nothing here sleeps to synchronise: the watch starts from the list's
resourceVersion, so it replays every change after the list no matter when
its request reaches the server, and every wait has a timeout.
"""

import json
import sys
import threading
import traceback
import uuid

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

NS = "default"
# Upper bound for the watch to deliver everything (the server ends the watch
# itself after WATCH_SECONDS).
WATCH_SECONDS = 30
JOIN_SECONDS = WATCH_SECONDS + 15


def status_of(exc):
    """The Kubernetes Status in an ApiException's body, or {}."""
    try:
        return json.loads(exc.body or "{}")
    except ValueError:
        return {}


def main(kubeconfig):
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()
    out = {}
    name = "py-" + uuid.uuid4().hex[:10]
    selector = "fairlead-test=" + name

    # create
    body = client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels={"fairlead-test": name}),
        spec=client.V1ServiceSpec(
            selector={"app": name},
            ports=[client.V1ServicePort(name="http", port=80, target_port=8080)],
        ),
    )
    created = v1.create_namespaced_service(NS, body)
    out["created"] = {
        "name": created.metadata.name,
        "uid": created.metadata.uid,
        "resourceVersion": created.metadata.resource_version,
        "clusterIP": created.spec.cluster_ip,
        "type": created.spec.type,
        "ports": [
            {"port": p.port, "targetPort": p.target_port, "protocol": p.protocol}
            for p in created.spec.ports
        ],
    }

    # list with a label selector (and one that matches nothing)
    listed = v1.list_namespaced_service(NS, label_selector=selector)
    out["list"] = {
        "names": [s.metadata.name for s in listed.items],
        "resourceVersion": listed.metadata.resource_version,
    }
    other = v1.list_namespaced_service(NS, label_selector="fairlead-test=nothing-" + name)
    out["list_other_names"] = [s.metadata.name for s in other.items]

    # watch from the list's resourceVersion, in a thread
    events = []
    watch_error = []
    w = watch.Watch()

    def watcher():
        try:
            for ev in w.stream(
                v1.list_namespaced_service,
                NS,
                label_selector=selector,
                resource_version=listed.metadata.resource_version,
                timeout_seconds=WATCH_SECONDS,
            ):
                obj = ev["object"]
                events.append(
                    {
                        "type": ev["type"],
                        "name": obj.metadata.name,
                        "resourceVersion": obj.metadata.resource_version,
                        "labels": obj.metadata.labels or {},
                    }
                )
                if ev["type"] == "DELETED":
                    w.stop()
                    return
        except Exception as e:  # reported in the JSON, asserted on by Rust
            watch_error.append("%s: %s" % (type(e).__name__, e))

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()

    # read the current object: its resourceVersion goes stale below
    before = v1.read_namespaced_service(name, NS)
    stale_rv = before.metadata.resource_version

    # merge patch, strategic merge patch, JSON patch
    merged = v1.patch_namespaced_service(
        name,
        NS,
        {"metadata": {"labels": {"merge": "yes"}}},
        _content_type="application/merge-patch+json",
    )
    strategic = v1.patch_namespaced_service(
        name,
        NS,
        {"metadata": {"labels": {"strategic": "yes"}}},
        _content_type="application/strategic-merge-patch+json",
    )
    jsonpatch = v1.patch_namespaced_service(
        name,
        NS,
        [{"op": "add", "path": "/metadata/annotations", "value": {"json": "yes"}}],
        _content_type="application/json-patch+json",
    )
    out["patches"] = {
        "merge": {
            "resourceVersion": merged.metadata.resource_version,
            "labels": merged.metadata.labels,
        },
        "strategic": {
            "resourceVersion": strategic.metadata.resource_version,
            "labels": strategic.metadata.labels,
        },
        "json": {
            "resourceVersion": jsonpatch.metadata.resource_version,
            "annotations": jsonpatch.metadata.annotations,
        },
    }

    # replace with the stale resourceVersion: 409 Conflict
    before.metadata.labels = {"fairlead-test": name, "stale": "yes"}
    before.metadata.resource_version = stale_rv
    try:
        v1.replace_namespaced_service(name, NS, before)
        out["stale_replace"] = {"raised": False}
    except ApiException as e:
        st = status_of(e)
        out["stale_replace"] = {
            "raised": True,
            "status": e.status,
            "http_reason": e.reason,
            "body_kind": st.get("kind"),
            "body_reason": st.get("reason"),
            "body_code": st.get("code"),
        }
    after_stale = v1.read_namespaced_service(name, NS)
    out["after_stale"] = {
        "resourceVersion": after_stale.metadata.resource_version,
        "labels": after_stale.metadata.labels,
    }

    # delete
    deleted = v1.delete_namespaced_service(name, NS)
    out["delete"] = {
        "kind": getattr(deleted, "kind", None),
        "name": getattr(getattr(deleted, "metadata", None), "name", None),
    }

    thread.join(JOIN_SECONDS)
    out["watch"] = {
        "finished": not thread.is_alive(),
        "error": watch_error[0] if watch_error else None,
        "events": events,
    }

    # read after delete: 404 NotFound
    try:
        v1.read_namespaced_service(name, NS)
        out["read_deleted"] = {"raised": False}
    except ApiException as e:
        st = status_of(e)
        out["read_deleted"] = {
            "raised": True,
            "status": e.status,
            "body_reason": st.get("reason"),
            "body_code": st.get("code"),
        }

    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(json.dumps({"error": "usage: client_ops.py <kubeconfig>"}))
        sys.exit(2)
    try:
        main(sys.argv[1])
    except Exception as e:
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e), "trace": traceback.format_exc()}))
        sys.exit(1)
