//! RBAC with the real kubectl against a real `fairlead apiserver`:
//! `kubectl auth can-i` answers per bootstrap role, a node identity is
//! refused a Service delete with kube's 403 Status, a RoleBinding grants
//! within its namespace only, and components hold least privilege.

mod common;

use std::path::PathBuf;

use common::server::{client_for, kubectl_cmd, Fairlead};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;

/// A kubeconfig for `user` in `groups`, with a client certificate signed
/// by the server's CA (what a component or a person would be handed).
fn identity(f: &Fairlead, file: &str, user: &str, groups: &[&str]) -> PathBuf {
    let (cert, key) =
        fairlead::apiserver::tls::issue_client_cert(&f.data_dir, user, groups).expect("cert");
    let ca = std::fs::read_to_string(f.data_dir.join("pki/ca.crt")).expect("ca");
    let path = f.data_dir.join(file);
    fairlead::apiserver::tls::write_kubeconfig(&path, &f.url, &ca, &cert, &key).expect("write");
    path
}

/// `kubectl auth can-i <args>` as the admin, impersonating `who` (the
/// `--as`/`--as-group` flags): its answer, checked against its exit code
/// (0 yes, 1 no).
fn can_i(f: &Fairlead, who: &[&str], args: &[&str]) -> bool {
    let out = f.kubectl(&[&["auth", "can-i"], args, who].concat());
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match (said.as_str(), out.status.code()) {
        ("yes", Some(0)) => true,
        ("no", Some(1)) => false,
        _ => panic!("kubectl auth can-i {args:?} {who:?}: {out:?}"),
    }
}

#[tokio::test]
async fn can_i_answers_per_role_and_bindings_grant_per_namespace() {
    let f = Fairlead::start(&[]);
    for ns in ["dev", "prod"] {
        f.kubectl_ok(&["create", "namespace", ns]);
    }
    // The bootstrap policy is there to read.
    let roles = f.kubectl_ok(&["get", "clusterroles", "-o", "name"]);
    for r in [
        "cluster-admin",
        "admin",
        "edit",
        "view",
        "system:node-proxier",
        "system:node",
    ] {
        assert!(
            roles.contains(&format!("clusterrole.rbac.authorization.k8s.io/{r}\n")),
            "{r} in {roles}"
        );
    }

    // Per role, through impersonation (`--as`), which the admin may do.
    let jane = ["--as", "jane"];
    assert!(!can_i(&f, &jane, &["list", "pods", "-n", "dev"]));
    f.kubectl_ok(&[
        "create",
        "rolebinding",
        "jane-edit",
        "--clusterrole=edit",
        "--user=jane",
        "-n",
        "dev",
    ]);
    // A RoleBinding grants within its namespace, and only what the role has.
    assert!(can_i(
        &f,
        &jane,
        &["create", "deployments.apps", "-n", "dev"]
    ));
    assert!(can_i(&f, &jane, &["delete", "pods", "-n", "dev"]));
    assert!(!can_i(&f, &jane, &["list", "pods", "-n", "prod"]));
    assert!(!can_i(&f, &jane, &["list", "pods", "--all-namespaces"]));
    assert!(!can_i(&f, &jane, &["create", "rolebindings", "-n", "dev"]));

    let bob = ["--as", "bob"];
    f.kubectl_ok(&[
        "create",
        "rolebinding",
        "bob-view",
        "--clusterrole=view",
        "--user=bob",
        "-n",
        "dev",
    ]);
    assert!(can_i(&f, &bob, &["list", "pods", "-n", "dev"]));
    assert!(!can_i(&f, &bob, &["delete", "pods", "-n", "dev"]));
    assert!(!can_i(&f, &bob, &["get", "secrets", "-n", "dev"]));

    let ann = ["--as", "ann"];
    f.kubectl_ok(&[
        "create",
        "rolebinding",
        "ann-admin",
        "--clusterrole=admin",
        "--user=ann",
        "-n",
        "dev",
    ]);
    assert!(can_i(&f, &ann, &["create", "rolebindings", "-n", "dev"]));
    assert!(!can_i(&f, &ann, &["delete", "namespaces"]));

    // Escalation: ann (admin in dev) may grant what she holds, not more.
    let ann_kc = identity(&f, "ann.kubeconfig", "ann", &[]);
    let as_ann = |args: &[&str]| kubectl_cmd(&ann_kc, args).output().unwrap();
    let ok = as_ann(&[
        "create",
        "rolebinding",
        "carl-edit",
        "--clusterrole=edit",
        "--user=carl",
        "-n",
        "dev",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    let ok = as_ann(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
        "-n",
        "dev",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    for args in [
        &[
            "create",
            "rolebinding",
            "carl-root",
            "--clusterrole=cluster-admin",
            "--user=carl",
            "-n",
            "dev",
        ][..],
        &[
            "create",
            "role",
            "node-reader",
            "--verb=get",
            "--resource=nodes",
            "-n",
            "dev",
        ][..],
    ] {
        let out = as_ann(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("is attempting to grant RBAC permissions not currently held"),
            "{args:?}: {out:?}"
        );
    }
    assert!(!can_i(&f, &["--as", "carl"], &["get", "nodes"]));

    // A Role (not a ClusterRole) with resource names.
    f.kubectl_ok(&[
        "create",
        "role",
        "one-cm",
        "--verb=get",
        "--resource=configmaps",
        "--resource-name=settings",
        "-n",
        "prod",
    ]);
    f.kubectl_ok(&[
        "create",
        "rolebinding",
        "bob-one-cm",
        "--role=one-cm",
        "--user=bob",
        "-n",
        "prod",
    ]);
    assert!(can_i(
        &f,
        &bob,
        &["get", "configmaps/settings", "-n", "prod"]
    ));
    assert!(!can_i(&f, &bob, &["get", "configmaps/other", "-n", "prod"]));

    // Components.
    let node = ["--as", "system:node:n1", "--as-group", "system:nodes"];
    assert!(can_i(&f, &node, &["watch", "services", "--all-namespaces"]));
    assert!(can_i(
        &f,
        &node,
        &[
            "list",
            "endpointslices.discovery.k8s.io",
            "--all-namespaces"
        ]
    ));
    assert!(!can_i(&f, &node, &["delete", "services", "-n", "default"]));
    assert!(!can_i(&f, &node, &["get", "secrets", "-n", "default"]));
    let cm = ["--as", "system:kube-controller-manager"];
    assert!(can_i(
        &f,
        &cm,
        &["create", "endpointslices.discovery.k8s.io", "-n", "dev"]
    ));
    assert!(!can_i(&f, &cm, &["delete", "namespaces"]));
    let sched = ["--as", "system:kube-scheduler"];
    assert!(can_i(
        &f,
        &sched,
        &["create", "pods", "--subresource=binding", "-n", "dev"]
    ));
    assert!(!can_i(&f, &sched, &["delete", "pods", "-n", "dev"]));

    // The reviews are in discovery, as kube-apiserver lists them.
    let reviews = f.kubectl_ok(&[
        "api-resources",
        "--api-group=authorization.k8s.io",
        "-o",
        "name",
    ]);
    assert!(
        reviews.contains("selfsubjectaccessreviews.authorization.k8s.io"),
        "{reviews}"
    );
    assert!(
        reviews.contains("localsubjectaccessreviews.authorization.k8s.io"),
        "{reviews}"
    );

    // `can-i --list` and `whoami` for a user with a binding.
    let list = f.kubectl_ok(&["auth", "can-i", "--list", "-n", "dev", "--as", "jane"]);
    assert!(list.contains("deployments.apps"), "{list}");
    assert!(
        list.contains("selfsubjectaccessreviews.authorization.k8s.io"),
        "{list}"
    );
    let who = f.kubectl_ok(&[
        "auth",
        "whoami",
        "--as",
        "jane",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, "jane");

    // Without a grant, impersonation itself is refused.
    let jane_kc = identity(&f, "jane.kubeconfig", "jane", &[]);
    let out = kubectl_cmd(&jane_kc, &["get", "pods", "-n", "dev", "--as", "root"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot impersonate resource \"users\""),
        "{out:?}"
    );
    // Jane's own certificate: her binding applies to her requests.
    let out = kubectl_cmd(&jane_kc, &["create", "configmap", "c", "-n", "dev"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = kubectl_cmd(&jane_kc, &["create", "configmap", "c", "-n", "prod"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "configmaps is forbidden: User \"jane\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"prod\""
        ),
        "{out:?}"
    );

    // Deleting the binding takes the rights away.
    f.kubectl_ok(&["delete", "rolebinding", "jane-edit", "-n", "dev"]);
    assert!(!can_i(
        &f,
        &jane,
        &["create", "deployments.apps", "-n", "dev"]
    ));
}

#[tokio::test]
async fn a_node_may_not_delete_a_service_nor_controllers_a_namespace() {
    let f = Fairlead::start(&[]);
    let node_kc = identity(&f, "node.kubeconfig", "system:node:n1", &["system:nodes"]);
    // kubectl shows kube's message.
    let out = kubectl_cmd(&node_kc, &["delete", "service", "kubernetes"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "services \"kubernetes\" is forbidden: User \"system:node:n1\" cannot delete resource \"services\" in API group \"\" in the namespace \"default\""
            ),
        "{out:?}"
    );
    // The raw answer is a 403 Status with reason Forbidden.
    let client = client_for(&node_kc).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    match svcs.delete("kubernetes", &Default::default()).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"), "{e:?}");
        }
        other => panic!("a node deleted a Service: {other:?}"),
    }
    // What a node does need is allowed.
    svcs.list(&Default::default())
        .await
        .expect("a node lists Services");
    // A node writes only its own Node and Lease (kube's NodeRestriction).
    {
        use k8s_openapi::api::coordination::v1::Lease;
        use k8s_openapi::api::core::v1::Node;
        use kube::api::{Patch, PatchParams, PostParams};
        let nodes: Api<Node> = Api::all(client.clone());
        let node = |name: &str| -> Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
        };
        nodes
            .create(&PostParams::default(), &node("n1"))
            .await
            .expect("a node registers itself");
        let label = Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}}));
        nodes
            .patch("n1", &PatchParams::default(), &label)
            .await
            .expect("a node labels itself");
        let status = Patch::Merge(
            serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        nodes
            .patch_status("n1", &PatchParams::default(), &status)
            .await
            .expect("its own status");
        let refused = |r: Result<Node, kube::Error>, what: &str| match r {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 403, "{what}: {e:?}");
                assert!(
                    e.message
                        .contains("node \"n1\" is not allowed to modify node \"n2\""),
                    "{what}: {}",
                    e.message
                );
            }
            other => panic!("{what}: {other:?}"),
        };
        refused(
            nodes.create(&PostParams::default(), &node("n2")).await,
            "create another node",
        );
        let admin: Api<Node> = Api::all(f.client().await);
        admin
            .create(&PostParams::default(), &node("n2"))
            .await
            .unwrap();
        refused(
            nodes.patch("n2", &PatchParams::default(), &label).await,
            "label another node",
        );
        refused(
            nodes
                .patch_status("n2", &PatchParams::default(), &status)
                .await,
            "another node's status",
        );
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let lease = |name: &str| -> Lease {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name}, "spec": {"holderIdentity": name}}),
            )
            .unwrap()
        };
        leases
            .create(&PostParams::default(), &lease("n1"))
            .await
            .expect("its own lease");
        assert!(
            matches!(leases.create(&PostParams::default(), &lease("n2")).await, Err(kube::Error::Api(e)) if e.code == 403),
            "a node wrote another node's lease"
        );
    }
    f.kubectl_ok(&["get", "service", "kubernetes"]);

    let cm_kc = identity(&f, "cm.kubeconfig", "system:kube-controller-manager", &[]);
    let cm = client_for(&cm_kc).await;
    let nss: Api<Namespace> = Api::all(cm);
    nss.list(&Default::default())
        .await
        .expect("controllers list namespaces");
    match nss.delete("default", &Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403),
        other => panic!("the controllers deleted a Namespace: {other:?}"),
    }
    f.kubectl_ok(&["get", "namespace", "default"]);

    // A plain user sees discovery but not the API server's metrics.
    let jane = identity(&f, "jane.kubeconfig", "jane", &[]);
    let ok = kubectl_cmd(&jane, &["get", "--raw", "/apis"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let metrics = kubectl_cmd(&jane, &["get", "--raw", "/metrics"])
        .output()
        .unwrap();
    assert!(
        !metrics.status.success() && String::from_utf8_lossy(&metrics.stderr).contains("Forbidden"),
        "{metrics:?}"
    );
}
