//! HTTP front: routing, authentication, authorization, request decoding and
//! response encoding for every endpoint. One generic handler per verb, driven
//! by the resource table.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::api::patch::{self, PatchError};
use crate::api::protobuf;
use crate::api::resources::{self, Kind, ResourceDef};
use crate::api::selector::{FieldSelector, LabelSelector};
use crate::api::status::{ApiError, FieldError};
use crate::store::{ListOptions, Revision};

use super::objects::{self, resource_ref, DeleteOpts, Propagation, WriteOpts, Written};
use super::{discovery, openapi, table, Identity, Server};
use crate::api::rbac::Target;

/// Response body: whole JSON documents or a watch stream.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A response body that holds its request's seat ([`super::fairness`])
/// until it has been sent (or dropped).
struct Seated {
    body: Body,
    _seat: super::fairness::Seat,
}

impl hyper::body::Body for Seated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Largest accepted request body (as kube-apiserver: 3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(code: u16, v: &Value, warnings: &[String]) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for w in warnings {
        if let Ok(h) = HeaderValue::from_str(&format!(
            "299 - {}",
            serde_json::to_string(w).unwrap_or_default()
        )) {
            resp.headers_mut().append("warning", h);
        }
    }
    resp
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = json_response(e.code, &e.to_status(), &[]);
    // A 429 that says when to retry (fairness's, not an eviction refused
    // by a disruption budget, which kubectl drain retries on its own
    // schedule) also says it in the header, which client-go honours.
    let retry = e
        .details
        .as_ref()
        .and_then(|d| d["retryAfterSeconds"].as_u64());
    if let (429, Some(secs)) = (e.code, retry) {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert("retry-after", v);
        }
    }
    resp
}

fn bytes_response(content_type: &'static str, body: &'static [u8]) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Where a request goes.
#[derive(Debug)]
enum Route {
    Version,
    Health,
    /// The cluster CA, public (`/cacerts`, as k3s serves it).
    CaCerts,
    Metrics,
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    OpenApiIndex,
    OpenApi(String),
    /// `authorization.k8s.io` / `authentication.k8s.io` reviews: created,
    /// answered, never stored.
    /// The review, and the namespace of a local one.
    Review(&'static discovery::ReviewDef, Option<String>),
    Resource(ResourceRoute),
}

/// A request for objects of one resource.
#[derive(Debug)]
pub struct ResourceRoute {
    pub def: &'static ResourceDef,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// Legacy `/watch/` path prefix.
    pub watch_path: bool,
}

fn route(path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["healthz" | "livez" | "readyz", ..] => return Ok(Route::Health),
        ["metrics"] => return Ok(Route::Metrics),
        ["cacerts"] => return Ok(Route::CaCerts),
        ["api"] => return Ok(Route::Api),
        ["apis"] => return Ok(Route::Apis),
        ["openapi", "v3"] => return Ok(Route::OpenApiIndex),
        ["openapi", "v3", rest @ ..] => return Ok(Route::OpenApi(rest.join("/"))),
        ["apis", g, v, plural]
            if discovery::review(g, v, plural).is_some_and(|d| !d.namespaced) =>
        {
            return Ok(Route::Review(
                discovery::review(g, v, plural).expect("matched"),
                None,
            ))
        }
        ["apis", g, v, "namespaces", ns, plural]
            if discovery::review(g, v, plural).is_some_and(|d| d.namespaced) =>
        {
            let def = discovery::review(g, v, plural).expect("matched");
            return Ok(Route::Review(def, Some(ns.to_string())));
        }
        ["apis", g] => return Ok(Route::Group(g.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    if rest.is_empty() {
        return Ok(Route::GroupVersion(group.into(), version.into()));
    }
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let find =
        |plural: &str| resources::find(group, version, plural).ok_or_else(ApiError::path_not_found);
    let (def, namespace, name, sub) = match rest {
        // The namespace object itself (and its subresources).
        ["namespaces"] => (find("namespaces")?, None, None, None),
        ["namespaces", n] => (find("namespaces")?, None, Some(*n), None),
        ["namespaces", n, s @ ("status" | "finalize")] => {
            (find("namespaces")?, None, Some(*n), Some(*s))
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let def = find(plural)?;
            if !def.namespaced {
                return Err(ApiError::path_not_found());
            }
            match tail {
                [] => (def, Some(*ns), None, None),
                [n] => (def, Some(*ns), Some(*n), None),
                [n, s] => (def, Some(*ns), Some(*n), Some(*s)),
                _ => return Err(ApiError::path_not_found()),
            }
        }
        [plural, tail @ ..] => {
            let def = find(plural)?;
            match (def.namespaced, tail) {
                (_, []) => (def, None, None, None),
                (false, [n]) => (def, None, Some(*n), None),
                (false, [n, s]) => (def, None, Some(*n), Some(*s)),
                _ => return Err(ApiError::path_not_found()),
            }
        }
        [] => return Err(ApiError::path_not_found()),
    };
    if let Some(s) = sub {
        let ok = (s == "status" && def.has_status)
            || (s == "finalize" && def.plural == "namespaces")
            || (s == "binding" && def.plural == "pods")
            || (s == "eviction" && def.plural == "pods")
            || (s == "token" && def.plural == "serviceaccounts")
            || (s == "log" && def.plural == "pods")
            || (s == "scale" && matches!(def.kind, Kind::ReplicaSet | Kind::Deployment));
        if !ok {
            return Err(ApiError::path_not_found());
        }
    }
    Ok(Route::Resource(ResourceRoute {
        def,
        namespace: namespace.map(String::from),
        name: name.map(String::from),
        sub: sub.map(String::from),
        watch_path,
    }))
}

/// Query parameters (last value wins).
pub type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn truthy(q: &Query, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

/// What the client wants back (from `Accept`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Object,
    Table,
    Metadata,
}

fn output(req: &Request<Incoming>) -> Output {
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Clients list preferences in order; take the first we can serve.
    for part in accept.split(',') {
        let p = part.replace(' ', "");
        if p.contains("as=Table") && p.contains("g=meta.k8s.io") {
            return Output::Table;
        }
        if p.contains("as=PartialObjectMetadata") {
            return Output::Metadata;
        }
        if p.starts_with("application/json") || p.starts_with("*/*") {
            return Output::Object;
        }
    }
    Output::Object
}

/// Parse `labelSelector` and `fieldSelector`; a field the kind does not
/// support is a 400.
pub(super) fn parse_selectors(
    def: &ResourceDef,
    q: &Query,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("invalid field selector: {e}")))?;
    for f in fields.fields() {
        if !def.allows_field(f) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {f}"
            )));
        }
    }
    Ok((labels, fields))
}

/// Whether an object passes both selectors.
pub fn selected(obj: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches(obj.pointer("/metadata/labels"))
        && fields.matches(&|f| resources::field_value(obj, f))
}

/// The object as the client asked for it.
pub fn render(def: &ResourceDef, obj: Value, out: Output, q: &Query) -> Value {
    match out {
        Output::Object => obj,
        Output::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
        Output::Table => {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            table::table(
                def.kind,
                &[obj],
                q.get("includeObject").map_or("Metadata", String::as_str),
                true,
                json!({"resourceVersion": rv}),
            )
        }
    }
}

fn metric_verb(method: &Method, r: &ResourceRoute, q: &Query) -> &'static str {
    let watch = r.watch_path || truthy(q, "watch");
    match *method {
        Method::GET if watch => "WATCH",
        Method::GET if r.name.is_none() => "LIST",
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE if r.name.is_none() => "DELETECOLLECTION",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

impl Server {
    /// Serve one request; never fails (errors become `Status` responses).
    pub async fn handle(self, req: Request<Incoming>, cert: Option<Identity>) -> Response<Body> {
        let start = Instant::now();
        let route = route(req.uri().path());
        let q = parse_query(req.uri().query());
        let (verb, group, version, resource, sub, scope) = match &route {
            Ok(Route::Resource(r)) => (
                metric_verb(req.method(), r, &q),
                r.def.group,
                r.def.version,
                r.def.plural,
                r.sub.clone().unwrap_or_default(),
                if r.name.is_some() {
                    "resource"
                } else if r.namespace.is_some() {
                    "namespace"
                } else {
                    "cluster"
                },
            ),
            _ => (
                match *req.method() {
                    Method::GET => "GET",
                    _ => "OTHER",
                },
                "",
                "",
                "",
                String::new(),
                "",
            ),
        };
        let resp = match self.dispatch(req, route, q, cert).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        if !resource.is_empty() {
            let code = resp.status().as_u16().to_string();
            metrics::counter!("apiserver_request_total",
                "verb" => verb, "group" => group, "version" => version, "resource" => resource,
                "subresource" => sub.clone(), "scope" => scope, "component" => "apiserver", "code" => code)
            .increment(1);
            if verb != "WATCH" {
                metrics::histogram!("apiserver_request_duration_seconds",
                    "verb" => verb, "group" => group, "version" => version, "resource" => resource,
                    "subresource" => sub, "scope" => scope, "component" => "apiserver")
                .record(start.elapsed().as_secs_f64());
            }
        }
        resp
    }

    /// The requester: a bearer token (static, ServiceAccount or bootstrap) if one is
    /// sent, else the verified client certificate. A bootstrap token that
    /// fails says why (unknown, wrong secret, expired) in the 401, so a
    /// joining host can print the reason.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        cert: Option<Identity>,
    ) -> Result<Identity, ApiError> {
        // Everyone who authenticates is in system:authenticated (what
        // the discovery and basic-user roles are bound to).
        let mut ident = self.authenticate_as(req, cert).await?;
        if !ident.groups.iter().any(|g| g == "system:authenticated") {
            ident.groups.push("system:authenticated".into());
        }
        Ok(ident)
    }

    async fn authenticate_as(
        &self,
        req: &Request<Incoming>,
        cert: Option<Identity>,
    ) -> Result<Identity, ApiError> {
        let Some(token) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return cert.ok_or_else(ApiError::unauthorized);
        };
        let token = token.trim();
        if let Some(ident) = self.token_identity(token) {
            return Ok(ident);
        }
        if crate::api::satoken::looks_like_jwt(token) {
            return self.service_account_identity(token).await;
        }
        if let Some(t) = crate::api::token::Token::parse(token) {
            return self.bootstrap_identity(&t).await;
        }
        Err(ApiError::unauthorized())
    }

    /// Check a bootstrap token against its Secret in the store.
    async fn bootstrap_identity(&self, t: &crate::api::token::Token) -> Result<Identity, ApiError> {
        use crate::api::token;
        let def = crate::api::resources::by_kind(crate::api::resources::Kind::Secret);
        let key = def.key(Some(token::NAMESPACE), &t.secret_name());
        let secret = match self.store.get(&key).await? {
            Some(kv) => Some(super::objects::decode(&kv)?),
            None => None,
        };
        let now = jiff::Timestamp::now().as_second();
        match token::authenticate(t, secret.as_ref(), now) {
            Ok((user, mut groups)) => {
                groups.push("system:authenticated".into());
                Ok(Identity { user, groups })
            }
            Err(why) => Err(ApiError::new(
                401,
                "Unauthorized",
                format!("Unauthorized: {why}"),
            )),
        }
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        route: Result<Route, ApiError>,
        q: Query,
        cert: Option<Identity>,
    ) -> Result<Response<Body>, ApiError> {
        // Health and version are public, as with Kubernetes' default
        // system:public-info-viewer role; everything else needs credentials.
        match &route {
            Ok(Route::Health) => return Ok(json_ok_text("ok")),
            Ok(Route::Version) => return Ok(json_response(200, &discovery::version(), &[])),
            _ => {}
        }
        // The CA is public (k3s serves it at the same path), so a joining
        // host can fetch it and check it against its token's hash.
        if matches!(&route, Ok(Route::CaCerts)) {
            let mut resp = Response::new(full(Bytes::from(self.ca_pem.to_string())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return Ok(resp);
        }
        let ident = self.authenticate(&req, cert).await?;
        let ident = self.impersonate(&req, ident)?;
        let route = route?;
        match &route {
            Route::Metrics
            | Route::Api
            | Route::Apis
            | Route::Group(_)
            | Route::GroupVersion(..)
            | Route::OpenApiIndex
            | Route::OpenApi(_) => {
                let path = req.uri().path();
                let verb = if req.method() == Method::GET {
                    "get"
                } else {
                    "post"
                };
                if !self
                    .authz
                    .decide(&ident, verb, Target::Path(path))
                    .allowed()
                {
                    return Err(ApiError::forbidden(format!(
                        "forbidden: User \"{}\" cannot {verb} path \"{path}\"",
                        ident.user
                    )));
                }
            }
            _ => {}
        }
        // A seat for the request (see `fairness`), held until its handler
        // returns; long-running requests and the exempt level need none.
        let long_running = matches!(&route, Route::Resource(r)
            if metric_verb(req.method(), r, &q) == "WATCH" || r.sub.as_deref() == Some("log"));
        let seat = if long_running || ident.groups.iter().any(|g| g == super::tls::ADMIN_GROUP) {
            super::fairness::Fairness::exempt()
        } else {
            self.fairness.admit(&ident.user).await?
        };
        // Every other request ends within --request-timeout, or the
        // client's shorter `timeout` (kubectl --request-timeout), as in
        // kube-apiserver: a stuck store must not pile requests up.
        let limit = q
            .get("timeout")
            .and_then(|t| crate::node::config::parse_duration(t).ok())
            .filter(|t| !t.is_zero())
            .map_or(self.config.request_timeout, |t| {
                t.min(self.config.request_timeout)
            });
        let result = async {
            if let Route::Review(def, ns) = route {
                return self.review(req, def, ns, &ident).await;
            }
            if req.method() != Method::GET && !matches!(route, Route::Resource(_)) {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            match route {
                Route::Health | Route::Version | Route::CaCerts | Route::Review(..) => {
                    unreachable!("handled above")
                }
                Route::Metrics => {
                    let mut resp = Response::new(full(crate::metrics::render()));
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok(resp)
                }
                Route::Api => Ok(json_response(
                    200,
                    &discovery::api_versions(&self.config),
                    &[],
                )),
                Route::Apis => Ok(json_response(200, &discovery::group_list(), &[])),
                Route::Group(g) => discovery::group(&g)
                    .map(|v| json_response(200, &v, &[]))
                    .ok_or_else(ApiError::path_not_found),
                Route::GroupVersion(g, v) => discovery::resource_list(&g, &v)
                    .map(|v| json_response(200, &v, &[]))
                    .ok_or_else(ApiError::path_not_found),
                Route::OpenApiIndex => Ok(bytes_response("application/json", openapi::index())),
                Route::OpenApi(path) => openapi::document(&path)
                    .map(|d| bytes_response("application/json", d))
                    .ok_or_else(ApiError::path_not_found),
                Route::Resource(r) => {
                    let kind = r.def.kind;
                    let rbac_write = req.method() != Method::GET
                        && matches!(
                            kind,
                            Kind::Role
                                | Kind::ClusterRole
                                | Kind::RoleBinding
                                | Kind::ClusterRoleBinding
                        );
                    let resp = self.resource(req, r, q, ident).await;
                    if rbac_write && resp.as_ref().is_ok_and(|r| r.status().is_success()) {
                        self.authz.caught_up(kind).await;
                    }
                    resp
                }
            }
        };
        let result: Result<Response<Body>, ApiError> = if long_running {
            result.await
        } else {
            tokio::time::timeout(limit, result)
                .await
                .unwrap_or_else(|_| {
                    Err(ApiError::timeout(
                        "Timeout: request did not complete within the allotted timeout",
                    ))
                })
        };
        // The seat goes with the response body: writing a large answer is
        // part of the request's cost.
        result.map(|resp| resp.map(|body| Seated { body, _seat: seat }.boxed_unsync()))
    }

    async fn resource(
        &self,
        req: Request<Incoming>,
        r: ResourceRoute,
        q: Query,
        ident: Identity,
    ) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        let verb = match metric_verb(&method, &r, &q) {
            "WATCH" => "watch",
            "LIST" => "list",
            "GET" => "get",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            "DELETECOLLECTION" => "deletecollection",
            _ => {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ))
            }
        };
        if r.sub.as_deref() == Some("log") {
            if verb != "get" {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            return self
                .pod_log(
                    r.namespace.as_deref().unwrap_or("default"),
                    r.name.as_deref().unwrap_or(""),
                    &q,
                )
                .await;
        }
        if r.sub.as_deref() == Some("scale") {
            return self.scale(&r, verb, req, &opts_of(&q)).await;
        }
        if matches!(r.sub.as_deref(), Some("binding" | "eviction" | "token")) && verb != "create" {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
        let target = Target::Resource {
            group: r.def.group,
            resource: r.def.plural,
            subresource: r.sub.as_deref(),
            name: r.name.as_deref(),
            namespace: r.namespace.as_deref(),
        };
        if !self.authz.decide(&ident, verb, target).allowed() {
            tracing::debug!(user = %ident.user, groups = ?ident.groups, verb,
                resource = r.def.plural, sub = ?r.sub, ns = ?r.namespace, "RBAC: forbidden");
            return Err(forbidden(&ident, verb, &r));
        }
        let out = output(&req);
        let ns = r.namespace.as_deref();
        let opts = WriteOpts {
            requester: Some(ident.clone()),
            dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
            field_validation: q
                .get("fieldValidation")
                .cloned()
                .unwrap_or_else(|| "Warn".into()),
        };
        if let Some(dr) = q.get("dryRun") {
            if dr != "All" {
                return Err(ApiError::bad_request(format!(
                    "dryRun: Unsupported value: {dr:?}: supported values: \"All\""
                )));
            }
        }
        match verb {
            "watch" => self.watch(&r, &q, out).await,
            "list" => {
                let list = self.list(r.def, ns, &q).await?;
                Ok(json_response(
                    200,
                    &self.render_list(r.def, list, out, &q),
                    &[],
                ))
            }
            "get" => {
                let (obj, _) = self
                    .get_object(r.def, ns, r.name.as_deref().unwrap())
                    .await?;
                Ok(json_response(200, &render(r.def, obj, out, &q), &[]))
            }
            "create" if r.sub.as_deref() == Some("binding") => {
                let body = read_object(req).await?;
                let status = self
                    .bind_pod(
                        ns.unwrap_or_default(),
                        r.name.as_deref().unwrap_or(""),
                        body,
                        &opts,
                    )
                    .await?;
                Ok(json_response(201, &status, &[]))
            }
            "create" if r.sub.as_deref() == Some("token") => {
                let body = read_object(req).await?;
                let issued = self
                    .create_token(
                        ns.unwrap_or_default(),
                        r.name.as_deref().unwrap_or(""),
                        body,
                    )
                    .await?;
                Ok(json_response(201, &issued, &[]))
            }
            "create" if r.sub.as_deref() == Some("eviction") => {
                let body = read_object(req).await?;
                let status = self
                    .evict(
                        ns.unwrap_or_default(),
                        r.name.as_deref().unwrap_or(""),
                        body,
                    )
                    .await?;
                Ok(json_response(201, &status, &[]))
            }
            "create" => {
                if r.sub.is_some() {
                    return Err(ApiError::method_not_allowed(
                        "create is not allowed on a subresource",
                    ));
                }
                let mut body = read_object(req).await?;
                if r.def.kind == crate::api::resources::Kind::CertificateSigningRequest {
                    // Who asked is the server's to say, not the client's.
                    body["spec"]["username"] = json!(ident.user);
                    body["spec"]["groups"] = json!(ident.groups);
                }
                let Written { obj, warnings } = self.create_object(r.def, ns, body, &opts).await?;
                Ok(json_response(201, &render(r.def, obj, out, &q), &warnings))
            }
            "update" => {
                let body = read_object(req).await?;
                let name = r.name.as_deref().unwrap();
                let sub = r.sub.as_deref().filter(|s| *s == "status");
                let created_before = self.store.get(&r.def.key(ns, name)).await?.is_none();
                let Written { obj, warnings } = self
                    .update_object(r.def, ns, name, body, sub, &opts)
                    .await?;
                let code = if created_before { 201 } else { 200 };
                Ok(json_response(code, &render(r.def, obj, out, &q), &warnings))
            }
            "patch" => {
                let ct = content_type(&req);
                let body = read_body(req).await?;
                let Written { obj, warnings } = self.patch(&r, &ct, &body, &opts).await?;
                Ok(json_response(200, &render(r.def, obj, out, &q), &warnings))
            }
            "delete" => {
                let body = read_body(req).await?;
                let delete = delete_opts(&q, &body, opts.dry_run)?;
                let obj = self
                    .delete_object_with_grace(r.def, ns, r.name.as_deref().unwrap(), delete)
                    .await?;
                Ok(json_response(200, &render(r.def, obj, out, &q), &[]))
            }
            "deletecollection" => {
                let body = read_body(req).await?;
                let delete = DeleteOpts {
                    // Preconditions name one object: not for a collection.
                    preconditions: (None, None),
                    ..delete_opts(&q, &body, opts.dry_run)?
                };
                let list = self.list(r.def, ns, &q).await?;
                let mut deleted = Vec::new();
                for item in list.items {
                    let name = item
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let item_ns = item.pointer("/metadata/namespace").and_then(Value::as_str);
                    match self
                        .delete_object_with_grace(r.def, item_ns, name, delete.clone())
                        .await
                    {
                        Ok(o) => deleted.push(o),
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                let list = ListResult {
                    items: deleted,
                    revision: self.store.current_revision().await?,
                    continue_token: None,
                };
                Ok(json_response(
                    200,
                    &self.render_list(r.def, list, Output::Object, &q),
                    &[],
                ))
            }
            _ => unreachable!(),
        }
    }

    async fn patch(
        &self,
        r: &ResourceRoute,
        content_type: &str,
        body: &[u8],
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let kind = match content_type {
            "application/merge-patch+json" => 0,
            "application/json-patch+json" => 1,
            "application/strategic-merge-patch+json" => 2,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json; got {other:?}"),
                ))
            }
        };
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let name = r.name.as_deref().unwrap();
        let ns = r.namespace.as_deref();
        let sub = r.sub.as_deref().filter(|s| *s == "status");
        // A patch carrying a resourceVersion is a precondition; otherwise
        // the patch is re-applied to the latest version on conflicts.
        let pinned = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
        for _ in 0..32 {
            let key = r.def.key(ns, name);
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::not_found(&resource_ref(r.def), name))?;
            let current = objects::decode(&kv)?;
            let patched = match kind {
                0 => patch::merge_patch(&current, &patch),
                1 => patch::json_patch(&current, &patch),
                _ => patch::strategic_merge_patch(&current, &patch, &|p| r.def.list_strategy(p)),
            }
            .map_err(|e| match e {
                PatchError::Invalid(m) => ApiError::bad_request(m),
                PatchError::TestFailed(m) => ApiError::new(422, "Invalid", m),
            })?;
            if let Some(rv) = &pinned {
                if *rv != kv.mod_revision.to_string() {
                    return Err(ApiError::stale(&resource_ref(r.def), name));
                }
            }
            let mut patched = patched;
            if !patched.is_object() {
                return Err(ApiError::bad_request("the patch produced a non-object"));
            }
            // Identity fields cannot be patched away.
            patched["apiVersion"] = json!(r.def.api_version);
            patched["kind"] = json!(r.def.kind_name);
            let m = crate::api::meta::meta_mut(&mut patched);
            m.insert("name".into(), json!(name));
            if let Some(ns) = ns {
                m.insert("namespace".into(), json!(ns));
            }
            let Written {
                obj: normalized,
                warnings,
            } = objects::normalize(r.def, patched, opts)?;
            match self
                .write_update(r.def, ns, name, &kv, current, normalized, sub, opts)
                .await?
            {
                Some(mut w) => {
                    w.warnings.extend(warnings);
                    return Ok(w);
                }
                None if pinned.is_none() => continue,
                None => return Err(ApiError::stale(&resource_ref(r.def), name)),
            }
        }
        Err(ApiError::stale(&resource_ref(r.def), name))
    }

    /// List objects with selectors, paging and resourceVersion semantics.
    pub async fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        q: &Query,
    ) -> Result<ListResult, ApiError> {
        let (labels, fields) = parse_selectors(def, q)?;
        let limit: usize = match q.get("limit") {
            None => 0,
            Some(l) => l
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        };
        let prefix = def.prefix(ns);
        let rv = q
            .get("resourceVersion")
            .map(String::as_str)
            .filter(|s| !s.is_empty());
        let rvm = q
            .get("resourceVersionMatch")
            .map(String::as_str)
            .filter(|s| !s.is_empty());
        let parse_rv = |s: &str| -> Result<Revision, ApiError> {
            s.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: {s:?}: must be a non-negative integer"
                ))
            })
        };
        let mut at: Option<Revision> = None;
        let mut after: Option<String> = None;
        if let Some(token) = q.get("continue").filter(|s| !s.is_empty()) {
            if rv.is_some_and(|v| v != "0") {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rev, start) = decode_continue(token)?;
            if !start.starts_with(&prefix) {
                return Err(ApiError::bad_request(
                    "continue key is not valid: wrong resource or namespace",
                ));
            }
            at = Some(rev);
            after = Some(start);
        } else {
            match (rv, rvm) {
                (None, Some(_)) => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ))
                }
                (Some(v), Some("Exact")) => {
                    let r = parse_rv(v)?;
                    if r == 0 {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    at = Some(r);
                }
                (Some(v), None | Some("NotOlderThan")) => {
                    let r = parse_rv(v)?;
                    if r > 0 {
                        self.wait_for_revision(r).await?;
                    }
                }
                (Some(_), Some(other)) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                    )))
                }
                (None, None) => {}
            }
        }
        let chunk = if limit == 0 {
            1000
        } else {
            limit.clamp(1, 1000)
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = false;
        loop {
            let page = self
                .store
                .list(&prefix, ListOptions { limit: chunk, after: after.clone(), revision: at })
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::Compacted { .. } if q.contains_key("continue") => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    other => other.into(),
                })?;
            at = Some(page.revision);
            let page_more = page.more;
            for kv in page.kvs {
                after = Some(kv.key.clone());
                // Objects of a sibling namespace never match a namespace
                // prefix, but a cluster-wide prefix contains every namespace.
                let obj = objects::decode(&kv)?;
                // Decoding is the CPU of a list: let the worker run other
                // tasks (and poll for I/O) between objects once the
                // task's budget is spent, so a flood of big lists cannot
                // hold back another user's request for many polls.
                tokio::task::consume_budget().await;
                if selected(&obj, &labels, &fields) {
                    items.push(obj);
                    last_key = Some(kv.key.clone());
                    if limit > 0 && items.len() == limit {
                        break;
                    }
                }
            }
            if limit > 0 && items.len() == limit {
                more = true;
                break;
            }
            if !page_more {
                break;
            }
        }
        // Every page after the first is read at the first one's revision.
        let revision = at.unwrap_or(0);
        // Only hand out a continue token if something may follow.
        let continue_token = if more {
            let lk = last_key.clone().unwrap_or_default();
            let rest = self
                .store
                .list(
                    &prefix,
                    ListOptions {
                        limit: 1,
                        after: Some(lk.clone()),
                        revision: Some(revision),
                    },
                )
                .await?;
            (!rest.kvs.is_empty()).then(|| encode_continue(revision, &lk))
        } else {
            None
        };
        Ok(ListResult {
            items,
            revision,
            continue_token,
        })
    }

    /// Wait (briefly) until the store has reached `rev`, as kube-apiserver
    /// does for "not older than" reads; then 504 "Too large resource version".
    pub async fn wait_for_revision(&self, rev: Revision) -> Result<(), ApiError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let current = self.store.current_revision().await?;
            if current >= rev {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(crate::store::StoreError::FutureRevision {
                    requested: rev,
                    current,
                }
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn render_list(&self, def: &ResourceDef, list: ListResult, out: Output, q: &Query) -> Value {
        let mut meta = json!({"resourceVersion": list.revision.to_string()});
        if let Some(c) = &list.continue_token {
            meta["continue"] = json!(c);
        }
        match out {
            Output::Table => table::table(
                def.kind,
                &list.items,
                q.get("includeObject").map_or("Metadata", String::as_str),
                true,
                meta,
            ),
            Output::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": meta,
                "items": list.items.into_iter().map(|o| json!({
                    "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or(json!({}))})).collect::<Vec<_>>(),
            }),
            Output::Object => json!({
                "kind": def.list_kind,
                "apiVersion": def.api_version,
                "metadata": meta,
                "items": list.items,
            }),
        }
    }
}

/// A list read: items, the revision they were read at, and a continue
/// token when a limit cut the list.
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub continue_token: Option<String>,
}

pub(crate) fn encode_continue(rev: Revision, key: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": "meta.k8s.io/v1", "rv": rev, "start": key}).to_string())
}

pub(crate) fn decode_continue(token: &str) -> Result<(Revision, String), ApiError> {
    use base64::Engine;
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    let rev = v
        .get("rv")
        .and_then(Value::as_i64)
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("bad rv"))?;
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("bad start"))?;
    Ok((rev, start.to_string()))
}

fn json_ok_text(s: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(s.as_bytes())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn content_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let mut body = req.into_body();
    let mut buf = bytes::BytesMut::new();
    let mut too_large = false;
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > MAX_BODY {
                too_large = true;
                // Keep reading (and discarding) so the client, still
                // writing, gets to read our 413 instead of a broken pipe;
                // beyond DRAIN_LIMIT it is not worth it.
                if seen > DRAIN_LIMIT {
                    break;
                }
                buf.clear();
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    if too_large {
        return Err(ApiError::too_large());
    }
    Ok(buf.freeze())
}

/// Oversized bodies up to this size are drained before the 413 is sent.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Read a JSON, YAML or (for the kinds kubectl's imperative commands send
/// that way) Kubernetes protobuf object body.
async fn read_object(req: Request<Incoming>) -> Result<Value, ApiError> {
    let ct = content_type(&req);
    let body = read_body(req).await?;
    let v: Value = match ct.as_str() {
        protobuf::CONTENT_TYPE => protobuf::decode_object(&body).map_err(|e| match e {
            protobuf::DecodeError::Malformed(m) => {
                ApiError::bad_request(format!("the object provided is unrecognized: {m}"))
            }
            protobuf::DecodeError::Unsupported(m) => ApiError::new(415, "UnsupportedMediaType", m),
        })?,
        "application/json" | "" => serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the object provided is unrecognized: json parse error: {e}"
            ))
        })?,
        "application/yaml" => serde_yaml::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the object provided is unrecognized: yaml parse error: {e}"
            ))
        })?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the object provided is unrecognized: expected a JSON object",
        ));
    }
    Ok(v)
}

/// DeleteOptions from a DELETE's body (JSON, may be empty) and query
/// (`gracePeriodSeconds`, `propagationPolicy`): preconditions, dry run,
/// grace period and propagation.
fn delete_opts(q: &Query, body: &[u8], dry_run: bool) -> Result<DeleteOpts, ApiError> {
    let mut v: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let dry_run = dry_run
        || v.get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
    let preconditions = (
        text("/preconditions/uid"),
        text("/preconditions/resourceVersion"),
    );
    let grace = match v.get("gracePeriodSeconds") {
        Some(g) if !g.is_null() => Some(g.as_i64().ok_or_else(|| {
            ApiError::bad_request("invalid DeleteOptions: gracePeriodSeconds must be an integer")
        })?),
        _ => q
            .get("gracePeriodSeconds")
            .map(|g| {
                g.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))
            })
            .transpose()?,
    };
    if let Some(p) = q.get("propagationPolicy") {
        v["propagationPolicy"] = json!(p);
    }
    Ok(DeleteOpts {
        preconditions,
        dry_run,
        grace,
        propagation: Propagation::from_options(&v)?,
    })
}

/// Write options from the query (`dryRun`, `fieldValidation`).
fn opts_of(q: &Query) -> WriteOpts {
    WriteOpts {
        requester: None,
        dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
        field_validation: q
            .get("fieldValidation")
            .cloned()
            .unwrap_or_else(|| "Warn".into()),
    }
}

/// The `autoscaling/v1` Scale of a ReplicaSet or Deployment.
fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": crate::api::workload::selector_string(&obj["spec"]["selector"]),
        },
    })
}

impl Server {
    /// `GET`, `PUT` and `PATCH` of `<workload>/scale`: the replicas as a
    /// Scale, written back as a merge patch of `spec.replicas`.
    async fn scale(
        &self,
        r: &ResourceRoute,
        verb: &str,
        req: Request<Incoming>,
        opts: &WriteOpts,
    ) -> Result<Response<Body>, ApiError> {
        let ns = r.namespace.as_deref();
        let name = r.name.as_deref().unwrap_or("");
        let (obj, _) = self.get_object(r.def, ns, name).await?;
        let current = scale_of(&obj);
        let wanted = match verb {
            "get" => return Ok(json_response(200, &current, &[])),
            "update" => {
                let body = read_body(req).await?;
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::bad_request(format!("invalid Scale: {e}")))?
            }
            "patch" => {
                let ct = content_type(&req);
                let body = read_body(req).await?;
                let patch: Value = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                let applied = if ct == "application/json-patch+json" {
                    crate::api::patch::json_patch(&current, &patch)
                } else {
                    crate::api::patch::merge_patch(&current, &patch)
                };
                applied.map_err(|e| ApiError::bad_request(e.to_string()))?
            }
            _ => {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ))
            }
        };
        let replicas = wanted["spec"]["replicas"].as_i64().ok_or_else(|| {
            ApiError::invalid(
                "Scale",
                name,
                vec![FieldError::required("spec.replicas", "")],
            )
        })?;
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                name,
                vec![FieldError::invalid(
                    "spec.replicas",
                    replicas,
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let main = ResourceRoute {
            def: r.def,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            sub: None,
            watch_path: false,
        };
        let body = serde_json::to_vec(&json!({"spec": {"replicas": replicas}})).unwrap_or_default();
        let Written { obj, warnings } = self
            .patch(&main, "application/merge-patch+json", &body, opts)
            .await?;
        Ok(json_response(200, &scale_of(&obj), &warnings))
    }
}

/// Where a refused request acted, as kube-apiserver's 403 says it.
fn scope(namespace: Option<&str>) -> String {
    namespace.map_or(" at the cluster scope".into(), |n| {
        format!(" in the namespace \"{n}\"")
    })
}

/// kube-apiserver's 403 for a resource request.
fn forbidden(ident: &Identity, verb: &str, r: &ResourceRoute) -> ApiError {
    let ns = scope(r.namespace.as_deref());
    let res = match &r.sub {
        Some(s) => format!("{}/{s}", r.def.plural),
        None => r.def.plural.to_string(),
    };
    ApiError::forbidden(format!(
        "{}{} is forbidden: User \"{}\" cannot {verb} resource \"{res}\" in API group \"{}\"{ns}",
        resource_ref(r.def),
        r.name
            .as_deref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default(),
        ident.user,
        r.def.group,
    ))
}

fn header_values(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(String::from)
        .collect()
}

impl Server {
    /// Apply `Impersonate-User` / `Impersonate-Group` (kubectl `--as`,
    /// `--as-group`): allowed when the requester may `impersonate` that
    /// user (or ServiceAccount) and each group, as in Kubernetes.
    fn impersonate(&self, req: &Request<Incoming>, ident: Identity) -> Result<Identity, ApiError> {
        let users = header_values(req, "impersonate-user");
        let groups = header_values(req, "impersonate-group");
        let Some(user) = users.first() else {
            if groups.is_empty() {
                return Ok(ident);
            }
            return Err(ApiError::bad_request(format!(
                "requested {groups:?} without impersonating a user"
            )));
        };
        let sa = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'));
        let (resource, namespace, name) = match sa {
            Some((ns, name)) => ("serviceaccounts", Some(ns), name),
            None => ("users", None, user.as_str()),
        };
        let targets = std::iter::once((resource, namespace, name))
            .chain(groups.iter().map(|g| ("groups", None, g.as_str())));
        for (resource, namespace, name) in targets {
            let t = Target::Resource {
                group: "",
                resource,
                subresource: None,
                name: Some(name),
                namespace,
            };
            if !self.authz.decide(&ident, "impersonate", t).allowed() {
                return Err(ApiError::forbidden(format!(
                    "{resource} \"{name}\" is forbidden: User \"{}\" cannot impersonate resource \"{resource}\" in API group \"\"{}",
                    ident.user,
                    scope(namespace)
                )));
            }
        }
        let mut all = groups;
        if let Some((ns, _)) = sa {
            all.push("system:serviceaccounts".into());
            all.push(format!("system:serviceaccounts:{ns}"));
        }
        if !all.iter().any(|g| g == "system:authenticated") {
            all.push("system:authenticated".into());
        }
        Ok(Identity {
            user: user.clone(),
            groups: all,
        })
    }

    /// Answer an access review (never stored): whether the requester
    /// (self reviews) or the named subject may do something, the rules
    /// it has in a namespace, or who it is.
    async fn review(
        &self,
        req: Request<Incoming>,
        def: &'static discovery::ReviewDef,
        namespace: Option<String>,
        ident: &Identity,
    ) -> Result<Response<Body>, ApiError> {
        use discovery::ReviewKind;
        if req.method() != Method::POST {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
        let (group, resource) = (def.group, def.plural);
        let namespace = namespace.as_deref();
        let t = Target::Resource {
            group,
            resource,
            subresource: None,
            name: None,
            namespace,
        };
        if !self.authz.decide(ident, "create", t).allowed() {
            return Err(ApiError::forbidden(format!(
                "{resource}.{group} is forbidden: User \"{}\" cannot create resource \"{resource}\" in API group \"{group}\"{}",
                ident.user,
                scope(namespace)
            )));
        }
        let mut obj = read_object(req).await?;
        if !obj.is_object() {
            return Err(ApiError::bad_request("the review must be an object"));
        }
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let status = match def.review {
            ReviewKind::WhoAmI => json!({"userInfo": {
                "username": ident.user, "groups": ident.groups}}),
            ReviewKind::SelfRules => {
                let ns = spec["namespace"].as_str().unwrap_or("");
                self.rules_review(ident, ns)
            }
            ReviewKind::SelfAccess => self.access_review(ident, &spec, None)?,
            ReviewKind::Access => {
                let Some(user) = spec["user"].as_str().filter(|u| !u.is_empty()) else {
                    return Err(ApiError::invalid(
                        "SubjectAccessReview",
                        "",
                        vec![FieldError::invalid(
                            "spec.user",
                            "\"\"",
                            "at least one of user or group must be specified",
                        )],
                    ));
                };
                let subject = Identity {
                    user: user.to_string(),
                    groups: spec["groups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|g| g.as_str().map(String::from))
                        .collect(),
                };
                self.access_review(&subject, &spec, namespace)?
            }
        };
        obj["status"] = status;
        let m = crate::api::meta::meta_mut(&mut obj);
        m.insert(
            "creationTimestamp".into(),
            json!(jiff::Timestamp::now().to_string()),
        );
        Ok(json_response(201, &obj, &[]))
    }

    /// `status` of an access review for `who` and `spec`'s attributes;
    /// `force_ns` is a local review's namespace.
    fn access_review(
        &self,
        who: &Identity,
        spec: &Value,
        force_ns: Option<&str>,
    ) -> Result<Value, ApiError> {
        let s = |v: &Value| v.as_str().filter(|x| !x.is_empty()).map(String::from);
        let decision = if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
            let verb = s(&ra["verb"]).unwrap_or_default();
            let resource = s(&ra["resource"]).unwrap_or_default();
            let group = s(&ra["group"]).unwrap_or_default();
            let sub = s(&ra["subresource"]);
            let name = s(&ra["name"]);
            let namespace = force_ns.map(String::from).or_else(|| s(&ra["namespace"]));
            self.authz.decide(
                who,
                &verb,
                Target::Resource {
                    group: &group,
                    resource: &resource,
                    subresource: sub.as_deref(),
                    name: name.as_deref(),
                    namespace: namespace.as_deref(),
                },
            )
        } else if let Some(nra) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
            let verb = s(&nra["verb"]).unwrap_or_default();
            let path = s(&nra["path"]).unwrap_or_default();
            self.authz.decide(who, &verb, Target::Path(&path))
        } else {
            return Err(ApiError::invalid(
                "SelfSubjectAccessReview",
                "",
                vec![FieldError::required(
                    "spec.resourceAttributes",
                    "exactly one of nonResourceAttributes or resourceAttributes must be specified",
                )],
            ));
        };
        Ok(match decision {
            crate::api::rbac::Decision::Allowed(reason) => {
                json!({"allowed": true, "reason": reason})
            }
            crate::api::rbac::Decision::Denied => json!({"allowed": false}),
        })
    }

    /// `status` of a rules review: every rule that applies in `ns`, split
    /// into resource and non-resource rules, as kubectl prints them.
    fn rules_review(&self, ident: &Identity, ns: &str) -> Value {
        let mut rules = self
            .authz
            .policy()
            .rules_for(&ident.user, &ident.groups, ns);
        // system:masters may do everything, binding or not.
        if ident.groups.iter().any(|g| g == super::tls::ADMIN_GROUP) {
            let (roles, _) = crate::api::rbac::bootstrap();
            let admin = roles
                .into_iter()
                .find(|r| r.metadata.name.as_deref() == Some("cluster-admin"))
                .and_then(|r| r.rules)
                .unwrap_or_default();
            for r in admin {
                if !rules.contains(&r) {
                    rules.push(r);
                }
            }
        }
        let mut resource_rules = Vec::new();
        let mut non_resource_rules = Vec::new();
        for r in rules {
            if let Some(urls) = r.non_resource_urls.filter(|u| !u.is_empty()) {
                non_resource_rules.push(json!({"verbs": r.verbs, "nonResourceURLs": urls}));
            } else {
                let mut v = json!({"verbs": r.verbs,
                    "apiGroups": r.api_groups.unwrap_or_default(),
                    "resources": r.resources.unwrap_or_default()});
                if let Some(n) = r.resource_names.filter(|n| !n.is_empty()) {
                    v["resourceNames"] = json!(n);
                }
                resource_rules.push(v);
            }
        }
        json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
            "incomplete": false})
    }
}
