//! Who may do what: a small, fixed authorizer until RBAC lands.
//!
//! It follows the roles Kubernetes bootstraps for the same identities, so
//! each component already runs with the rights it will keep under RBAC:
//!
//! | identity | may |
//! |---|---|
//! | group `system:masters` | everything (cluster-admin) |
//! | group `system:bootstrappers` | create and read CertificateSigningRequests, nothing else (`system:node-bootstrapper`) |
//! | group `system:nodes` | read everything but Secrets; write Nodes, Leases, Events, Pod status, delete Pods, create CSRs and ServiceAccount tokens (`system:node`, as the Node authorizer narrows it) |
//! | anyone else authenticated (ServiceAccounts too) | read everything but Secrets (`view`; for a ServiceAccount of fairlead's DaemonSet, what `system:node-proxier` needs) |
//!
//! Secrets are masters-only because bootstrap tokens live there: a node
//! that could read them could mint more nodes.

use super::Identity;

/// What a request wants to do.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete,
    /// deletecollection.
    pub verb: &'a str,
    /// Plural resource name (`pods`).
    pub resource: &'a str,
    /// Subresource (`status`), if any.
    pub subresource: Option<&'a str>,
}

fn in_group(ident: &Identity, group: &str) -> bool {
    ident.groups.iter().any(|g| g == group)
}

fn is_read(verb: &str) -> bool {
    matches!(verb, "get" | "list" | "watch")
}

/// Whether `ident` may do `attrs`.
pub fn allowed(ident: &Identity, attrs: Attributes<'_>) -> bool {
    if in_group(ident, "system:masters") {
        return true;
    }
    let Attributes {
        verb,
        resource,
        subresource,
    } = attrs;
    if in_group(ident, crate::api::token::BOOTSTRAPPERS) {
        return resource == "certificatesigningrequests"
            && subresource.is_none()
            && (is_read(verb) || verb == "create");
    }
    if resource == "secrets" {
        return false;
    }
    if is_read(verb) {
        return true;
    }
    if in_group(ident, "system:nodes") {
        return match (resource, subresource) {
            ("nodes", None | Some("status")) => verb != "deletecollection",
            ("leases", None) => verb != "deletecollection",
            ("events", None) => matches!(verb, "create" | "update" | "patch"),
            ("pods", Some("status")) => matches!(verb, "update" | "patch"),
            ("pods", None) => verb == "delete",
            ("certificatesigningrequests", None) => verb == "create",
            // Tokens for the pods it runs (projected volumes).
            ("serviceaccounts", Some("token")) => verb == "create",
            _ => false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn can(i: &Identity, verb: &str, resource: &str, sub: Option<&str>) -> bool {
        allowed(
            i,
            Attributes {
                verb,
                resource,
                subresource: sub,
            },
        )
    }

    #[test]
    fn masters_may_do_anything() {
        let admin = who("fairlead-admin", &["system:masters"]);
        assert!(can(&admin, "delete", "namespaces", None));
        assert!(can(&admin, "list", "secrets", None));
    }

    #[test]
    fn bootstrappers_may_only_ask_for_certificates() {
        let b = who("system:bootstrap:abcdef", &["system:bootstrappers"]);
        assert!(can(&b, "create", "certificatesigningrequests", None));
        assert!(can(&b, "get", "certificatesigningrequests", None));
        assert!(!can(
            &b,
            "update",
            "certificatesigningrequests",
            Some("status")
        ));
        assert!(!can(&b, "list", "pods", None));
        assert!(!can(&b, "create", "nodes", None));
    }

    #[test]
    fn nodes_write_their_own_kinds_only() {
        let n = who("system:node:a", &["system:nodes"]);
        assert!(can(&n, "create", "nodes", None));
        assert!(can(&n, "patch", "nodes", Some("status")));
        assert!(can(&n, "update", "leases", None));
        assert!(can(&n, "patch", "pods", Some("status")));
        assert!(can(&n, "delete", "pods", None));
        assert!(can(&n, "create", "events", None));
        assert!(can(&n, "watch", "services", None));
        assert!(!can(&n, "delete", "services", None));
        assert!(!can(&n, "create", "pods", None));
        assert!(!can(&n, "get", "secrets", None));
        assert!(!can(
            &n,
            "update",
            "certificatesigningrequests",
            Some("status")
        ));
    }

    #[test]
    fn others_only_read_and_never_secrets() {
        let u = who("jane", &[]);
        assert!(can(&u, "list", "pods", None));
        assert!(!can(&u, "create", "pods", None));
        assert!(!can(&u, "list", "secrets", None));
    }
}
