"""Write and watch ConfigMaps through an API server that is killed again
and again (tests/limits.rs), with the official Python `kubernetes` client.

Usage: crash_load.py <kubeconfig> <dir>

* The writer creates `w-<n>` ConfigMaps one after another; each create the
  server acknowledged goes to <dir>/acked as "<name> <resourceVersion>".
  Failed creates (the server is down) are retried as the next name.
* The watcher lists once, then watches from the list's resourceVersion,
  resuming from the last resourceVersion it saw whenever the connection
  drops (on 410 Gone it lists again, counted). Every event's
  resourceVersion must be above the one before: a violation is recorded.

When <dir>/stop appears the writer stops; the watcher goes on until it has
seen every acknowledged write (or 60 s pass), then writes <dir>/result.json:
{"seen": [...names...], "violations": [...], "relists": n, "resumes": n}.
"""

import json
import os
import sys
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

NS = "default"


def api(kubeconfig):
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.retries = False
    return client.CoreV1Api(client.ApiClient(cfg))


def writer(kubeconfig, out, stop):
    v1 = api(kubeconfig)
    n = 0
    with open(os.path.join(out, "acked"), "a", buffering=1) as acked:
        while not os.path.exists(stop):
            name = "w-%06d" % n
            n += 1
            body = client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=name), data={"n": str(n)}
            )
            try:
                cm = v1.create_namespaced_config_map(NS, body, _request_timeout=5)
                acked.write("%s %s\n" % (name, cm.metadata.resource_version))
            except Exception:
                time.sleep(0.05)


def main(kubeconfig, out):
    stop = os.path.join(out, "stop")
    threading.Thread(target=writer, args=(kubeconfig, out, stop), daemon=True).start()
    v1 = api(kubeconfig)
    seen = set()
    violations = []
    relists = resumes = 0
    rv = None
    done_by = None
    while True:
        if os.path.exists(stop) and done_by is None:
            done_by = time.time() + 60
        if done_by is not None:
            acked = set()
            with open(os.path.join(out, "acked")) as f:
                for line in f:
                    acked.add(line.split()[0])
            if acked <= seen or time.time() > done_by:
                break
        try:
            if rv is None:
                lst = v1.list_namespaced_config_map(NS, _request_timeout=5)
                seen.update(i.metadata.name for i in lst.items)
                rv = lst.metadata.resource_version
                relists += 1
                continue
            w = watch.Watch()
            for ev in w.stream(
                v1.list_namespaced_config_map,
                NS,
                resource_version=rv,
                timeout_seconds=2,
                _request_timeout=5,
            ):
                obj = ev["object"]
                new = obj.metadata.resource_version
                if int(new) <= int(rv):
                    violations.append("%s after %s (%s)" % (new, rv, ev["type"]))
                rv = new
                seen.add(obj.metadata.name)
            resumes += 1
        except ApiException as e:
            if e.status == 410:
                rv = None
            else:
                resumes += 1
                time.sleep(0.05)
        except Exception:
            resumes += 1
            time.sleep(0.05)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(
            {
                "seen": sorted(seen),
                "violations": violations,
                "relists": relists,
                "resumes": resumes,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
