//! Role-based access control (`rbac.authorization.k8s.io/v1`), pure.
//!
//! A [`Policy`] is compiled from the stored Roles, ClusterRoles and their
//! bindings (the API server keeps one current, see
//! `apiserver::authz`); [`Policy::decide`] answers one request. The rules
//! are Kubernetes': a request is allowed when some binding names the user
//! (by user name, group, or ServiceAccount) and its role has a rule whose
//! verbs, API groups, resources (`pods`, `pods/status`, `*`, `*/status`)
//! and resource names (empty: all) match; a RoleBinding only grants within
//! its namespace. Nothing denies: RBAC is a union of grants.
//!
//! ClusterRoles with an `aggregationRule` get the rules of every
//! ClusterRole its selectors match, to a fixed point, as kube's
//! clusterrole-aggregation controller writes them (here they are
//! computed when the policy is compiled, so a newly labelled role counts
//! at once).
//!
//! [`bootstrap`] is the data the API server creates on first start: the
//! user-facing roles (`cluster-admin`, `admin`, `edit`, `view`) and one
//! least-privilege role per component identity:
//!
//! | identity (certificate CN / O) | ClusterRoles |
//! |---|---|
//! | group `system:masters` | `cluster-admin` |
//! | `system:kube-controller-manager` | `system:kube-controller-manager` (every controller's rights; no Namespace deletes, no Secrets) |
//! | `system:kube-scheduler` | `system:kube-scheduler` |
//! | group `system:nodes` (`system:node:<name>`) | `system:node`, `system:node-proxier`, `fairlead:cluster-dns` (a fairlead node is kubelet, proxy and DNS in one) |
//! | `system:kube-proxy` | `system:node-proxier`, `fairlead:cluster-dns` |
//! | group `system:bootstrappers` | `system:node-bootstrapper` |
//! | every authenticated user | `system:basic-user` (access reviews), `system:discovery` |
//! | group `system:monitoring` | `system:monitoring` (`/metrics`) |

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::rbac::v1::{
    AggregationRule, ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef,
    Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

/// The request being authorized (kube's `authorizer.Attributes`).
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
    /// get, list, watch, create, update, patch, delete, deletecollection,
    /// or a special verb (impersonate, bind, escalate).
    pub verb: &'a str,
    pub target: Target<'a>,
}

/// What a request acts on.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Resource {
        group: &'a str,
        resource: &'a str,
        subresource: Option<&'a str>,
        name: Option<&'a str>,
        /// `None`: cluster-scoped, or all namespaces.
        namespace: Option<&'a str>,
    },
    /// A non-resource URL path (`/metrics`, `/apis`).
    Path(&'a str),
}

/// Whether a request is allowed, and why (the access review's `reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed(String),
    Denied,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }
}

/// A binding, compiled: who, and which role (already resolved to rules).
struct Grant {
    /// `ClusterRoleBinding "x"` or `RoleBinding "ns/x"`, for reasons.
    from: String,
    role: String,
    subjects: Vec<Subject>,
}

/// Every RBAC object, compiled for [`Policy::decide`].
#[derive(Default)]
pub struct Policy {
    /// Effective (aggregated) rules per ClusterRole.
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    /// Rules per (namespace, Role).
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_grants: Vec<Grant>,
    /// RoleBindings per namespace.
    grants: HashMap<String, Vec<Grant>>,
}

impl Policy {
    /// Compile stored objects. Bindings to roles that do not exist grant
    /// nothing (until the role appears).
    pub fn new(
        cluster_roles: &[ClusterRole],
        roles: &[Role],
        cluster_bindings: &[ClusterRoleBinding],
        bindings: &[RoleBinding],
    ) -> Policy {
        let roles = roles
            .iter()
            .map(|r| {
                (
                    (
                        r.metadata.namespace.clone().unwrap_or_default(),
                        r.metadata.name.clone().unwrap_or_default(),
                    ),
                    r.rules.clone().unwrap_or_default(),
                )
            })
            .collect();
        let cluster_grants = cluster_bindings
            .iter()
            .filter(|b| b.role_ref.kind == "ClusterRole")
            .map(|b| Grant {
                from: format!(
                    "ClusterRoleBinding {:?}",
                    b.metadata.name.as_deref().unwrap_or_default()
                ),
                role: b.role_ref.name.clone(),
                subjects: b.subjects.clone().unwrap_or_default(),
            })
            .collect();
        let mut grants: HashMap<String, Vec<Grant>> = HashMap::new();
        for b in bindings {
            let ns = b.metadata.namespace.clone().unwrap_or_default();
            grants.entry(ns.clone()).or_default().push(Grant {
                from: format!(
                    "RoleBinding \"{ns}/{}\"",
                    b.metadata.name.as_deref().unwrap_or_default()
                ),
                role: format!("{}/{}", b.role_ref.kind, b.role_ref.name),
                subjects: b.subjects.clone().unwrap_or_default(),
            });
        }
        Policy {
            cluster_roles: aggregate(cluster_roles),
            roles,
            cluster_grants,
            grants,
        }
    }

    /// The rules a RoleBinding's `Kind/name` role reference resolves to.
    fn binding_rules(&self, ns: &str, role: &str) -> &[PolicyRule] {
        let found = match role.split_once('/') {
            Some(("ClusterRole", name)) => self.cluster_roles.get(name),
            Some(("Role", name)) => self.roles.get(&(ns.to_string(), name.to_string())),
            _ => None,
        };
        found.map_or(&[], Vec::as_slice)
    }

    /// Every grant that applies to `user`/`groups` in `namespace` (all
    /// ClusterRoleBindings, plus the namespace's RoleBindings), with its
    /// rules.
    fn applicable<'s>(
        &'s self,
        user: &'s str,
        groups: &'s [String],
        namespace: Option<&'s str>,
    ) -> impl Iterator<Item = (&'s Grant, &'s [PolicyRule])> + 's {
        let cluster = self.cluster_grants.iter().map(|g| {
            let rules = self
                .cluster_roles
                .get(&g.role)
                .map_or(&[][..], Vec::as_slice);
            (g, rules)
        });
        let local = namespace
            .and_then(|ns| self.grants.get(ns).map(|gs| (ns, gs)))
            .into_iter()
            .flat_map(move |(ns, gs)| gs.iter().map(move |g| (g, self.binding_rules(ns, &g.role))));
        cluster
            .chain(local)
            .filter(move |(g, _)| g.subjects.iter().any(|s| subject_matches(s, user, groups)))
    }

    /// Kubernetes' RBAC decision for one request.
    pub fn decide(&self, a: &Attributes<'_>) -> Decision {
        let namespace = match a.target {
            Target::Resource { namespace, .. } => namespace,
            Target::Path(_) => None,
        };
        for (grant, rules) in self.applicable(a.user, a.groups, namespace) {
            if rules.iter().any(|r| rule_allows(r, a.verb, &a.target)) {
                return Decision::Allowed(format!(
                    "RBAC: allowed by {} of {}",
                    grant.from,
                    role_name(&grant.role)
                ));
            }
        }
        Decision::Denied
    }

    /// The effective rules of a ClusterRole (none if it does not exist).
    pub fn cluster_role_rules(&self, name: &str) -> Vec<PolicyRule> {
        self.cluster_roles.get(name).cloned().unwrap_or_default()
    }

    /// The rules of a Role in `namespace` (none if it does not exist).
    pub fn role_rules(&self, namespace: &str, name: &str) -> Vec<PolicyRule> {
        self.roles
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Every rule that applies to the user in `namespace` (what
    /// SelfSubjectRulesReview lists), resource rules and non-resource
    /// rules alike.
    pub fn rules_for(&self, user: &str, groups: &[String], namespace: &str) -> Vec<PolicyRule> {
        let mut out: Vec<PolicyRule> = Vec::new();
        for (_, rules) in self.applicable(user, groups, Some(namespace)) {
            for r in rules {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

/// `ClusterRole "view"` from a grant's role reference.
fn role_name(role: &str) -> String {
    match role.split_once('/') {
        Some((kind, name)) => format!("{kind} {name:?}"),
        None => format!("ClusterRole {role:?}"),
    }
}

/// Whether a binding's subject is this user.
pub fn subject_matches(s: &Subject, user: &str, groups: &[String]) -> bool {
    match s.kind.as_str() {
        "User" => s.name == user,
        "Group" => groups.contains(&s.name),
        "ServiceAccount" => {
            let ns = s.namespace.as_deref().unwrap_or_default();
            user.strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .is_some_and(|(n, name)| n == ns && name == s.name)
        }
        _ => false,
    }
}

fn has(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

/// Whether one rule covers one request.
pub fn rule_allows(r: &PolicyRule, verb: &str, target: &Target<'_>) -> bool {
    if !has(&r.verbs, verb) {
        return false;
    }
    match *target {
        Target::Resource {
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            let groups = r.api_groups.as_deref().unwrap_or_default();
            let resources = r.resources.as_deref().unwrap_or_default();
            let names = r.resource_names.as_deref().unwrap_or_default();
            let resource_ok = match subresource {
                None => has(resources, resource),
                Some(sub) => resources.iter().any(|x| {
                    x == "*"
                        || x.split_once('/')
                            .is_some_and(|(r, s)| (r == resource || r == "*") && s == sub)
                }),
            };
            has(groups, group)
                && resource_ok
                && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
        }
        Target::Path(path) => r
            .non_resource_urls
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|u| {
                u == "*"
                    || u == path
                    || u.strip_suffix('*')
                        .is_some_and(|prefix| path.starts_with(prefix))
            }),
    }
}

/// The effective rules of every ClusterRole: its own, plus (for one with
/// an `aggregationRule`) those of every ClusterRole a selector matches,
/// repeated until nothing changes (aggregated roles may themselves
/// aggregate; cycles end because rules are only ever added once).
pub fn aggregate(cluster_roles: &[ClusterRole]) -> HashMap<String, Vec<PolicyRule>> {
    let mut rules: HashMap<String, Vec<PolicyRule>> = cluster_roles
        .iter()
        .map(|r| {
            (
                r.metadata.name.clone().unwrap_or_default(),
                r.rules.clone().unwrap_or_default(),
            )
        })
        .collect();
    let selectors: Vec<(String, Vec<super::selector::LabelSelector>)> = cluster_roles
        .iter()
        .filter_map(|r| {
            let agg = r.aggregation_rule.as_ref()?;
            let sels = agg
                .cluster_role_selectors
                .iter()
                .flatten()
                .filter_map(|s| {
                    let v = serde_json::to_value(s).ok()?;
                    super::selector::LabelSelector::from_json(&v).ok()
                })
                .collect();
            Some((r.metadata.name.clone().unwrap_or_default(), sels))
        })
        .collect();
    loop {
        let mut changed = false;
        for (name, sels) in &selectors {
            for source in cluster_roles {
                let labels = serde_json::to_value(&source.metadata.labels).unwrap_or_default();
                let source_name = source.metadata.name.as_deref().unwrap_or_default();
                if source_name == name || !sels.iter().any(|s| s.matches(Some(&labels))) {
                    continue;
                }
                let add: Vec<PolicyRule> = rules.get(source_name).cloned().unwrap_or_default();
                let target = rules.entry(name.clone()).or_default();
                for r in add {
                    if !target.contains(&r) {
                        target.push(r);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            return rules;
        }
    }
}

/// Whether `owner`'s rules cover every request `requested` could allow
/// (kube's escalation check: creating a role or binding that grants more
/// than its author holds needs the `escalate`/`bind` verb). Returns the
/// first uncovered piece, as `verb group/resource[name]` or `verb path`.
pub fn uncovered(owner: &[PolicyRule], requested: &[PolicyRule]) -> Option<String> {
    for r in requested {
        let groups = r.api_groups.as_deref().unwrap_or_default();
        let resources = r.resources.as_deref().unwrap_or_default();
        let names: Vec<Option<&str>> = match r.resource_names.as_deref() {
            None | Some([]) => vec![None],
            Some(ns) => ns.iter().map(|n| Some(n.as_str())).collect(),
        };
        for verb in &r.verbs {
            // Wildcards in the request must be wildcards in the owner's
            // rule: a literal "*" only matches "*" (`has` does that).
            for g in groups {
                for res in resources {
                    let (resource, subresource) = match res.split_once('/') {
                        Some((a, b)) => (a, Some(b)),
                        None => (res.as_str(), None),
                    };
                    for name in &names {
                        let t = Target::Resource {
                            group: g,
                            resource,
                            subresource,
                            name: *name,
                            namespace: None,
                        };
                        let covered = owner.iter().any(|o| {
                            rule_allows(o, verb, &t)
                                && (name.is_some()
                                    || o.resource_names.as_deref().is_none_or(<[_]>::is_empty))
                        });
                        if !covered {
                            let n = name.map(|n| format!("[{n}]")).unwrap_or_default();
                            return Some(format!("{verb} {g}/{res}{n}"));
                        }
                    }
                }
            }
            for u in r.non_resource_urls.iter().flatten() {
                if !owner.iter().any(|o| rule_allows(o, verb, &Target::Path(u))) {
                    return Some(format!("{verb} {u}"));
                }
            }
        }
    }
    None
}

// ---- bootstrap policy ------------------------------------------------------

const READ: &str = "get list watch";
const WRITE: &str = "create update patch delete deletecollection";

/// A rule from space-separated verbs, API groups (`core` is the core
/// group "") and resources.
fn rule(verbs: &str, groups: &str, resources: &str) -> PolicyRule {
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    PolicyRule {
        verbs: words(verbs),
        api_groups: Some(
            groups
                .split_whitespace()
                .map(|g| {
                    if g == "core" {
                        String::new()
                    } else {
                        g.to_string()
                    }
                })
                .collect(),
        ),
        resources: Some(words(resources)),
        ..Default::default()
    }
}

/// A rule for non-resource URLs.
fn urls(verbs: &str, paths: &str) -> PolicyRule {
    PolicyRule {
        verbs: verbs.split_whitespace().map(String::from).collect(),
        non_resource_urls: Some(paths.split_whitespace().map(String::from).collect()),
        ..Default::default()
    }
}

/// The annotation that tells a server it may reconcile a bootstrap object.
pub const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";
const AGGREGATE_TO: &str = "rbac.authorization.k8s.io/aggregate-to-";

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    let mut l: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.insert("kubernetes.io/bootstrapping".into(), "rbac-defaults".into());
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(l),
        annotations: Some([(AUTOUPDATE.to_string(), "true".to_string())].into()),
        ..Default::default()
    }
}

fn cluster_role(name: &str, labels: &[(&str, &str)], rules: Vec<PolicyRule>) -> ClusterRole {
    ClusterRole {
        metadata: meta(name, labels),
        rules: Some(rules),
        aggregation_rule: None,
    }
}

/// A ClusterRole that aggregates every role labelled
/// `rbac.authorization.k8s.io/aggregate-to-<from>: "true"`.
fn aggregated(name: &str, labels: &[(&str, &str)], from: &str) -> ClusterRole {
    let sel = LabelSelector {
        match_labels: Some([(format!("{AGGREGATE_TO}{from}"), "true".to_string())].into()),
        ..Default::default()
    };
    ClusterRole {
        metadata: meta(name, labels),
        rules: Some(Vec::new()),
        aggregation_rule: Some(AggregationRule {
            cluster_role_selectors: Some(vec![sel]),
        }),
    }
}

fn binding(name: &str, role: &str, subjects: &[(&str, &str)]) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(name, &[]),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(
            subjects
                .iter()
                .map(|(kind, name)| Subject {
                    kind: kind.to_string(),
                    name: name.to_string(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    namespace: None,
                })
                .collect(),
        ),
    }
}

/// The ClusterRoles and ClusterRoleBindings every cluster starts with
/// (see the module docs for who gets what). `admin`, `edit` and `view`
/// are aggregated, as in Kubernetes, so users extend them by labelling
/// their own ClusterRoles.
pub fn bootstrap() -> (Vec<ClusterRole>, Vec<ClusterRoleBinding>) {
    let agg_view = ("rbac.authorization.k8s.io/aggregate-to-view", "true");
    let agg_edit = ("rbac.authorization.k8s.io/aggregate-to-edit", "true");
    let agg_admin = ("rbac.authorization.k8s.io/aggregate-to-admin", "true");
    let roles = vec![
        cluster_role(
            "cluster-admin",
            &[],
            vec![rule("*", "*", "*"), urls("*", "*")],
        ),
        aggregated("admin", &[], "admin"),
        aggregated("edit", &[agg_admin], "edit"),
        aggregated("view", &[agg_edit], "view"),
        cluster_role(
            "system:aggregate-to-view",
            &[agg_view],
            vec![
                rule(
                    READ,
                    "core",
                    "pods pods/log pods/status services services/status endpoints configmaps \
                     events serviceaccounts namespaces namespaces/status",
                ),
                rule(
                    READ,
                    "apps",
                    "deployments deployments/status deployments/scale replicasets \
                     replicasets/status replicasets/scale",
                ),
                rule(READ, "discovery.k8s.io", "endpointslices"),
                rule(
                    READ,
                    "policy",
                    "poddisruptionbudgets poddisruptionbudgets/status",
                ),
            ],
        ),
        cluster_role(
            "system:aggregate-to-edit",
            &[agg_edit],
            vec![
                rule(
                    WRITE,
                    "core",
                    "pods services endpoints configmaps secrets serviceaccounts",
                ),
                rule(READ, "core", "secrets"),
                rule("create", "core", "pods/eviction serviceaccounts/token"),
                rule(
                    WRITE,
                    "apps",
                    "deployments deployments/scale replicasets replicasets/scale",
                ),
                rule(WRITE, "policy", "poddisruptionbudgets"),
                rule(WRITE, "discovery.k8s.io", "endpointslices"),
            ],
        ),
        cluster_role(
            "system:aggregate-to-admin",
            &[agg_admin],
            vec![
                rule(
                    &format!("{READ} {WRITE}"),
                    "rbac.authorization.k8s.io",
                    "roles rolebindings",
                ),
                rule(
                    "create",
                    "authorization.k8s.io",
                    "localsubjectaccessreviews",
                ),
            ],
        ),
        cluster_role(
            "system:basic-user",
            &[],
            vec![
                rule(
                    "create",
                    "authorization.k8s.io",
                    "selfsubjectaccessreviews selfsubjectrulesreviews",
                ),
                rule("create", "authentication.k8s.io", "selfsubjectreviews"),
            ],
        ),
        cluster_role(
            "system:discovery",
            &[],
            vec![urls(
                "get",
                "/api /api/* /apis /apis/* /openapi /openapi/* /version /version/ /healthz \
                 /livez /readyz",
            )],
        ),
        cluster_role(
            "system:monitoring",
            &[],
            vec![urls(
                "get",
                "/metrics /healthz /livez /readyz /healthz/* /livez/* /readyz/*",
            )],
        ),
        cluster_role(
            "system:node-bootstrapper",
            &[],
            vec![rule(
                "create get list watch",
                "certificates.k8s.io",
                "certificatesigningrequests",
            )],
        ),
        cluster_role(
            "system:node",
            &[],
            vec![
                rule(READ, "core", "nodes pods services endpoints"),
                rule("create update patch", "core", "nodes nodes/status"),
                rule("update patch", "core", "pods/status"),
                rule("delete", "core", "pods"),
                rule("create update patch", "core events.k8s.io", "events"),
                rule("create", "core", "serviceaccounts/token"),
                rule(
                    &format!("{READ} create update patch"),
                    "coordination.k8s.io",
                    "leases",
                ),
                rule(
                    "create get list watch",
                    "certificates.k8s.io",
                    "certificatesigningrequests",
                ),
            ],
        ),
        cluster_role(
            "system:node-proxier",
            &[],
            vec![
                rule("list watch", "core", "endpoints services"),
                rule(READ, "core", "nodes"),
                rule("create update patch", "core events.k8s.io", "events"),
                rule("list watch", "discovery.k8s.io", "endpointslices"),
            ],
        ),
        cluster_role(
            "fairlead:cluster-dns",
            &[],
            vec![
                rule("list watch", "core", "services namespaces"),
                rule("list watch", "discovery.k8s.io", "endpointslices"),
            ],
        ),
        cluster_role(
            "system:kube-scheduler",
            &[],
            vec![
                rule(READ, "core", "pods nodes namespaces services"),
                rule("create", "core", "pods/binding bindings"),
                rule("update patch", "core", "pods/status"),
                rule("create update patch", "core events.k8s.io", "events"),
                rule(
                    &format!("{READ} create update"),
                    "coordination.k8s.io",
                    "leases",
                ),
                rule(READ, "apps", "replicasets"),
                rule(READ, "policy", "poddisruptionbudgets"),
            ],
        ),
        cluster_role(
            "system:kube-controller-manager",
            &[],
            vec![
                // What the controllers watch.
                rule(
                    READ,
                    "core",
                    "pods services endpoints nodes namespaces serviceaccounts",
                ),
                rule(READ, "apps", "replicasets deployments"),
                rule(READ, "discovery.k8s.io", "endpointslices"),
                rule(READ, "policy", "poddisruptionbudgets"),
                rule(READ, "coordination.k8s.io", "leases"),
                rule(READ, "certificates.k8s.io", "certificatesigningrequests"),
                // EndpointSlices and Endpoints (endpointslice controller).
                rule(WRITE, "core", "endpoints"),
                rule(WRITE, "discovery.k8s.io", "endpointslices"),
                // Pods (ReplicaSets, garbage collection, node lifecycle).
                rule(WRITE, "core", "pods"),
                rule("update patch", "core", "pods/status"),
                // Workloads.
                rule(WRITE, "apps", "replicasets deployments"),
                rule(
                    "update patch",
                    "apps",
                    "replicasets/status deployments/status",
                ),
                rule("update patch", "policy", "poddisruptionbudgets/status"),
                // Node IPAM and lifecycle (taints, conditions); never delete.
                rule("update patch", "core", "nodes nodes/status"),
                // ServiceAccounts for new namespaces; events.
                rule("create", "core", "serviceaccounts"),
                rule("create update patch", "core events.k8s.io", "events"),
                // Leader election.
                rule("create update patch", "coordination.k8s.io", "leases"),
                // The CSR approver and signer.
                rule(
                    "update patch",
                    "certificates.k8s.io",
                    "certificatesigningrequests/approval certificatesigningrequests/status",
                ),
            ],
        ),
    ];
    let all = ("Group", "system:authenticated");
    let nodes = ("Group", "system:nodes");
    let proxy = ("User", "system:kube-proxy");
    let bindings = vec![
        binding(
            "cluster-admin",
            "cluster-admin",
            &[("Group", "system:masters")],
        ),
        binding("system:basic-user", "system:basic-user", &[all]),
        binding("system:discovery", "system:discovery", &[all]),
        binding(
            "system:monitoring",
            "system:monitoring",
            &[("Group", "system:monitoring")],
        ),
        binding(
            "system:node-bootstrapper",
            "system:node-bootstrapper",
            &[("Group", crate::api::token::BOOTSTRAPPERS)],
        ),
        binding("system:node", "system:node", &[nodes]),
        binding(
            "system:node-proxier",
            "system:node-proxier",
            &[proxy, nodes],
        ),
        binding(
            "fairlead:cluster-dns",
            "fairlead:cluster-dns",
            &[proxy, nodes],
        ),
        binding(
            "system:kube-scheduler",
            "system:kube-scheduler",
            &[("User", "system:kube-scheduler")],
        ),
        binding(
            "system:kube-controller-manager",
            "system:kube-controller-manager",
            &[("User", "system:kube-controller-manager")],
        ),
    ];
    // Store admin/edit/view with their aggregated rules filled in, as
    // kube's aggregation controller would, so `kubectl describe
    // clusterrole view` shows them.
    let effective = aggregate(&roles);
    let roles = roles
        .into_iter()
        .map(|mut r| {
            if r.aggregation_rule.is_some() {
                r.rules = effective
                    .get(r.metadata.name.as_deref().unwrap_or(""))
                    .cloned();
            }
            r
        })
        .collect();
    (roles, bindings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap_policy(extra_roles: &[Role], extra: &[RoleBinding]) -> Policy {
        let (roles, bindings) = bootstrap();
        Policy::new(&roles, extra_roles, &bindings, extra)
    }

    fn can(
        p: &Policy,
        user: &str,
        groups: &[&str],
        verb: &str,
        resource: &str,
        ns: Option<&str>,
    ) -> bool {
        let groups: Vec<String> = groups
            .iter()
            .map(|g| g.to_string())
            .chain(["system:authenticated".to_string()])
            .collect();
        let (resource, sub) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (resource, None),
        };
        let group = crate::api::resources::RESOURCES
            .iter()
            .find(|d| d.plural == resource)
            .map_or("authorization.k8s.io", |d| d.group);
        p.decide(&Attributes {
            user,
            groups: &groups,
            verb,
            target: Target::Resource {
                group,
                resource,
                subresource: sub,
                name: None,
                namespace: ns,
            },
        })
        .allowed()
    }

    #[test]
    fn masters_may_do_anything() {
        let p = bootstrap_policy(&[], &[]);
        assert!(can(
            &p,
            "admin",
            &["system:masters"],
            "delete",
            "namespaces",
            None
        ));
        assert!(can(
            &p,
            "admin",
            &["system:masters"],
            "list",
            "secrets",
            Some("x")
        ));
        let d = p.decide(&Attributes {
            user: "admin",
            groups: &["system:masters".into()],
            verb: "get",
            target: Target::Path("/metrics"),
        });
        assert_eq!(
            d,
            Decision::Allowed(
                "RBAC: allowed by ClusterRoleBinding \"cluster-admin\" of ClusterRole \"cluster-admin\""
                    .into()
            )
        );
    }

    #[test]
    fn components_have_least_privilege() {
        let p = bootstrap_policy(&[], &[]);
        let node = ("system:node:a", &["system:nodes"][..]);
        assert!(can(&p, node.0, node.1, "watch", "services", None));
        assert!(can(&p, node.0, node.1, "list", "endpointslices", None));
        assert!(can(&p, node.0, node.1, "patch", "pods/status", Some("x")));
        assert!(can(
            &p,
            node.0,
            node.1,
            "create",
            "serviceaccounts/token",
            Some("x")
        ));
        assert!(!can(&p, node.0, node.1, "delete", "services", Some("x")));
        assert!(!can(&p, node.0, node.1, "get", "secrets", Some("x")));
        assert!(!can(&p, node.0, node.1, "create", "pods", Some("x")));

        let cm = "system:kube-controller-manager";
        assert!(can(&p, cm, &[], "create", "endpointslices", Some("x")));
        assert!(can(&p, cm, &[], "delete", "pods", Some("x")));
        assert!(can(&p, cm, &[], "patch", "deployments/status", Some("x")));
        assert!(!can(&p, cm, &[], "delete", "namespaces", None));
        assert!(!can(&p, cm, &[], "get", "secrets", Some("x")));
        assert!(!can(&p, cm, &[], "delete", "nodes", None));

        let s = "system:kube-scheduler";
        assert!(can(&p, s, &[], "create", "pods/binding", Some("x")));
        assert!(!can(&p, s, &[], "delete", "pods", Some("x")));

        let b = "system:bootstrap:abcdef";
        assert!(can(
            &p,
            b,
            &["system:bootstrappers"],
            "create",
            "certificatesigningrequests",
            None
        ));
        assert!(!can(&p, b, &["system:bootstrappers"], "list", "pods", None));
    }

    #[test]
    fn plain_users_get_nothing_but_reviews_and_discovery() {
        let p = bootstrap_policy(&[], &[]);
        assert!(!can(&p, "jane", &[], "list", "pods", Some("default")));
        assert!(can(
            &p,
            "jane",
            &[],
            "create",
            "selfsubjectaccessreviews",
            None
        ));
        let groups = ["system:authenticated".to_string()];
        let at = |path| Attributes {
            user: "jane",
            groups: &groups,
            verb: "get",
            target: Target::Path(path),
        };
        assert!(p.decide(&at("/apis/apps/v1")).allowed());
        assert!(!p.decide(&at("/metrics")).allowed());
    }

    fn role_binding(ns: &str, role: (&str, &str), subject: Subject) -> RoleBinding {
        RoleBinding {
            metadata: ObjectMeta {
                name: Some("b".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: role.0.into(),
                name: role.1.into(),
            },
            subjects: Some(vec![subject]),
        }
    }

    fn user(name: &str) -> Subject {
        Subject {
            kind: "User".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_role_binding_grants_only_in_its_namespace() {
        let b = role_binding("dev", ("ClusterRole", "edit"), user("jane"));
        let p = bootstrap_policy(&[], &[b]);
        assert!(can(&p, "jane", &[], "create", "deployments", Some("dev")));
        assert!(can(&p, "jane", &[], "list", "pods", Some("dev")));
        assert!(!can(&p, "jane", &[], "list", "pods", Some("prod")));
        assert!(!can(&p, "jane", &[], "list", "pods", None));
        // edit does not manage RBAC; admin does.
        assert!(!can(&p, "jane", &[], "create", "rolebindings", Some("dev")));
    }

    #[test]
    fn roles_resource_names_and_service_accounts() {
        let role = Role {
            metadata: ObjectMeta {
                name: Some("one-cm".into()),
                namespace: Some("dev".into()),
                ..Default::default()
            },
            rules: Some(vec![PolicyRule {
                resource_names: Some(vec!["settings".into()]),
                ..rule("get", "core", "configmaps")
            }]),
        };
        let sa = Subject {
            kind: "ServiceAccount".into(),
            name: "app".into(),
            namespace: Some("dev".into()),
            ..Default::default()
        };
        let p = bootstrap_policy(&[role], &[role_binding("dev", ("Role", "one-cm"), sa)]);
        let who = "system:serviceaccount:dev:app";
        let get = |name| {
            p.decide(&Attributes {
                user: who,
                groups: &[],
                verb: "get",
                target: Target::Resource {
                    group: "",
                    resource: "configmaps",
                    subresource: None,
                    name,
                    namespace: Some("dev"),
                },
            })
            .allowed()
        };
        assert!(get(Some("settings")));
        assert!(!get(Some("other")));
        assert!(!get(None));
        assert!(!can(
            &p,
            "system:serviceaccount:dev:other",
            &[],
            "get",
            "configmaps",
            Some("dev")
        ));
    }

    #[test]
    fn aggregation_follows_labels_transitively() {
        let (mut roles, bindings) = bootstrap();
        let mut mine = cluster_role(
            "widgets-view",
            &[("rbac.authorization.k8s.io/aggregate-to-view", "true")],
            vec![rule(READ, "example.com", "widgets")],
        );
        mine.metadata.annotations = None;
        roles.push(mine);
        let p = Policy::new(&roles, &[], &bindings, &[]);
        let rules = &p.cluster_roles["admin"];
        assert!(rules
            .iter()
            .any(|r| r.resources.as_deref() == Some(&["widgets".to_string()][..])));
        assert!(p.cluster_roles["view"].len() < p.cluster_roles["edit"].len());
    }

    #[test]
    fn escalation_check() {
        let view = bootstrap()
            .0
            .into_iter()
            .find(|r| r.metadata.name.as_deref() == Some("view"))
            .unwrap();
        let view = view.rules.unwrap();
        assert_eq!(uncovered(&view, &[rule("get list", "core", "pods")]), None);
        assert_eq!(
            uncovered(&view, &[rule("delete", "core", "pods")]),
            Some("delete /pods".into())
        );
        assert_eq!(
            uncovered(&view, &[rule("get", "*", "pods")]),
            Some("get */pods".into())
        );
        assert_eq!(
            uncovered(&[rule("*", "*", "*")], &[rule("get", "*", "*")]),
            None
        );
    }
}
