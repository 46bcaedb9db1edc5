//! Durability of the API server across restarts and crashes, on both store
//! backends, and two API servers sharing one etcd.
//!
//! * watches resume from a resourceVersion taken before a SIGKILL + restart
//!   (events between that version and the crash, and after the restart);
//! * a watch from a compacted resourceVersion gets one `ERROR` event with a
//!   410 `Expired` Status as its first line, then the stream ends;
//! * SIGKILL during concurrent Service creates loses no acknowledged create,
//!   and leaves every Service with its own ClusterIP and exactly one
//!   allocation key per Service;
//! * two API servers on one etcd never hand out one ClusterIP twice, and of
//!   two updates from the same resourceVersion exactly one wins.
//!
//! Every server is a real `fairlead apiserver` process (tests/common). No
//! sleeps synchronise anything: every wait is a poll with a deadline or a
//! timeout around an awaited event.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::Fairlead;
use common::Etcd;
use fairlead::store::Store;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

/// Upper bound for one API call or one expected watch line.
const WAIT: Duration = Duration::from_secs(20);

/// Where the API server keeps ClusterIP allocations (one key per address,
/// value `{"owner": "<namespace>/<name>"}`).
const IP_ALLOC_PREFIX: &str = "/registry/allocations/serviceips/";
const PORT_ALLOC_PREFIX: &str = "/registry/allocations/servicenodeports/";

// ---------------------------------------------------------------- helpers

/// Await `fut`, panicking with `what` if it takes longer than [`WAIT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// Run blocking harness code (process start/kill, kubectl) off the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `--etcd-servers <endpoint>` for an etcd backend, nothing for embedded.
fn store_flags(etcd: Option<&Etcd>) -> Vec<&str> {
    match etcd {
        Some(e) => vec!["--etcd-servers", e.endpoint.as_str()],
        None => vec![],
    }
}

/// A ClusterIP Service labelled `suite=<suite>`.
fn service(name: &str, suite: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([("suite".to_string(), suite.to_string())])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn rv_of(s: &Service) -> u64 {
    s.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("numeric resourceVersion on {:?}", s.metadata))
}

fn cluster_ip(s: &Service) -> Option<String> {
    s.spec.as_ref().and_then(|sp| sp.cluster_ip.clone())
}

async fn create(api: &Api<Service>, name: &str, suite: &str) -> Service {
    within(
        &format!("create {name}"),
        api.create(&PostParams::default(), &service(name, suite)),
    )
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// The status code and reason of a failed API call.
fn api_status(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

type Lines = futures::io::Lines<std::pin::Pin<Box<dyn futures::AsyncBufRead + Send>>>;

/// Open a raw watch on Services in `default` and return its lines.
async fn raw_watch(client: &kube::Client, query: &str) -> Lines {
    let req = hyper::Request::get(format!(
        "/api/v1/namespaces/default/services?watch=1&timeoutSeconds=120&{query}"
    ))
    .body(Vec::new())
    .unwrap();
    let body = within(&format!("open watch {query}"), client.request_stream(req))
        .await
        .unwrap_or_else(|e| panic!("watch {query}: {e}"));
    let body: std::pin::Pin<Box<dyn futures::AsyncBufRead + Send>> = Box::pin(body);
    body.lines()
}

/// The next watch line as JSON; None when the server ended the stream.
async fn next_line(lines: &mut Lines, what: &str) -> Option<Value> {
    let line = within(what, lines.next()).await?;
    let line = line.unwrap_or_else(|e| panic!("{what}: reading watch: {e}"));
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}")))
}

/// (type, name, resourceVersion) of a watch event line.
fn event_summary(v: &Value) -> (String, String, u64) {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (
        s("/type"),
        s("/object/metadata/name"),
        s("/object/metadata/resourceVersion").parse().unwrap_or(0),
    )
}

/// Open the store the (stopped) API server used, to inspect raw keys.
async fn open_store(server: &Fairlead, etcd: Option<&Etcd>) -> Arc<dyn Store> {
    match etcd {
        Some(e) => Arc::new(
            fairlead::store::etcd::EtcdStore::connect(std::slice::from_ref(&e.endpoint))
                .await
                .expect("connect to etcd"),
        ),
        None => Arc::new(
            fairlead::store::embedded::EmbeddedStore::open(&server.data_dir.join("store.db"))
                .await
                .expect("open embedded store"),
        ),
    }
}

/// Every Service (all namespaces) by `namespace/name`.
async fn all_services(client: &kube::Client) -> BTreeMap<String, Service> {
    let api: Api<Service> = Api::all(client.clone());
    let list = within("list services", api.list(&ListParams::default()))
        .await
        .expect("list services");
    list.items
        .into_iter()
        .map(|s| {
            let key = format!(
                "{}/{}",
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default()
            );
            (key, s)
        })
        .collect()
}

/// Every Service has a valid ClusterIP of its own.
fn assert_distinct_cluster_ips(svcs: &BTreeMap<String, Service>) {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (key, s) in svcs {
        let ip = cluster_ip(s).unwrap_or_else(|| panic!("{key} has no clusterIP"));
        assert!(
            ip.parse::<Ipv4Addr>().is_ok(),
            "{key} has clusterIP {ip:?}, not an address"
        );
        if let Some(other) = seen.insert(ip.clone(), key) {
            panic!("{key} and {other} share ClusterIP {ip}");
        }
    }
}

/// The store holds exactly one ClusterIP allocation key per Service, owned
/// by that Service, and no stray NodePort allocations (all are ClusterIP).
async fn assert_allocations_match(store: &dyn Store, svcs: &BTreeMap<String, Service>) {
    let allocs = within("list allocations", store.list_all(IP_ALLOC_PREFIX))
        .await
        .expect("list allocation keys");
    let mut by_ip = BTreeMap::new();
    for kv in &allocs.kvs {
        let ip = kv.key.strip_prefix(IP_ALLOC_PREFIX).unwrap().to_string();
        let v: Value = serde_json::from_slice(&kv.value).expect("allocation value is JSON");
        let owner = v["owner"].as_str().expect("allocation owner").to_string();
        by_ip.insert(ip, owner);
    }
    let expected: BTreeMap<String, String> = svcs
        .iter()
        .map(|(key, s)| (cluster_ip(s).unwrap(), key.clone()))
        .collect();
    assert_eq!(
        by_ip, expected,
        "ClusterIP allocation keys (ip -> owner) differ from the Services"
    );
    let ports = within("list port allocations", store.list_all(PORT_ALLOC_PREFIX))
        .await
        .expect("list port allocations");
    assert!(
        ports.kvs.is_empty(),
        "NodePort allocations without NodePort Services: {:?}",
        ports.kvs.iter().map(|k| &k.key).collect::<Vec<_>>()
    );
}

// ------------------------------------------------- a. watch across restart

/// Objects changed between a resourceVersion and a SIGKILL, and after the
/// restart, all reach a watch started from that resourceVersion, in order.
async fn watch_resumes_after_restart(etcd: Option<&Etcd>) {
    let mut server = blocking(|| Fairlead::start(&store_flags(etcd)));
    let client = server.client().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let suite = "resume";
    create(&api, "resume-a0", suite).await;
    create(&api, "resume-a1", suite).await;
    let listed = within(
        "list",
        api.list(&ListParams::default().labels("suite=resume")),
    )
    .await
    .expect("list");
    assert_eq!(listed.items.len(), 2);
    let rv0: u64 = listed
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();

    // Changes between rv0 and the crash.
    let b0 = create(&api, "resume-b0", suite).await;
    let a0 = within(
        "patch a0",
        api.patch(
            "resume-a0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"step": "before-crash"}}})),
        ),
    )
    .await
    .expect("patch a0");
    within(
        "delete a1",
        api.delete("resume-a1", &DeleteParams::default()),
    )
    .await
    .expect("delete a1");
    assert!(rv_of(&b0) > rv0 && rv_of(&a0) > rv_of(&b0));

    blocking(|| {
        server.kill9();
        server.restart();
    });
    let client = server.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    // A change after the restart, before the watch opens.
    let c0 = create(&api, "resume-c0", suite).await;

    let mut lines = raw_watch(
        &client,
        &format!("resourceVersion={rv0}&labelSelector=suite%3Dresume"),
    )
    .await;
    let mut got = Vec::new();
    for i in 0..4 {
        let ev = next_line(&mut lines, &format!("replayed event {i}"))
            .await
            .unwrap_or_else(|| panic!("watch ended after {got:?}"));
        got.push(event_summary(&ev));
        if i == 1 {
            assert_eq!(
                ev.pointer("/object/metadata/labels/step"),
                Some(&json!("before-crash")),
                "{ev}"
            );
        }
    }
    // A change while the watch is open.
    let c1 = create(&api, "resume-c1", suite).await;
    let ev = next_line(&mut lines, "live event")
        .await
        .unwrap_or_else(|| panic!("watch ended after {got:?}"));
    got.push(event_summary(&ev));

    let types_names: Vec<(&str, &str)> = got
        .iter()
        .map(|(t, n, _)| (t.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        types_names,
        [
            ("ADDED", "resume-b0"),
            ("MODIFIED", "resume-a0"),
            ("DELETED", "resume-a1"),
            ("ADDED", "resume-c0"),
            ("ADDED", "resume-c1"),
        ],
        "events after rv {rv0}: {got:?}"
    );
    let rvs: Vec<u64> = got.iter().map(|g| g.2).collect();
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]) && rvs[0] > rv0,
        "resourceVersions increase from {rv0}: {rvs:?}"
    );
    assert_eq!(rvs[0], rv_of(&b0));
    assert_eq!(rvs[1], rv_of(&a0));
    assert_eq!(rvs[3], rv_of(&c0));
    assert_eq!(rvs[4], rv_of(&c1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_watch_resumes_after_restart() {
    watch_resumes_after_restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resumes_after_restart() {
    let etcd = blocking(Etcd::start);
    watch_resumes_after_restart(Some(&etcd)).await;
}

// ------------------------------------------------ b. too old: 410 Expired

/// How long compaction (every second, to the revision seen a second
/// earlier) may take to pass an old resourceVersion.
const COMPACTION_DEADLINE: Duration = Duration::from_secs(30);

async fn too_old_resource_version_is_410_expired(etcd: Option<&Etcd>) {
    let mut flags = store_flags(etcd);
    flags.extend(["--compaction-interval-seconds", "1"]);
    let server = blocking(|| Fairlead::start(&flags));
    let client = server.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let old = create(&api, "expire-0", "expire").await;
    let old_rv = rv_of(&old);

    // Keep writing (so the revision moves past old_rv and the compactor
    // catches up) until a watch from old_rv is refused.
    let end = Instant::now() + COMPACTION_DEADLINE;
    let mut attempt = 0u32;
    let (error, mut lines) = loop {
        attempt += 1;
        within(
            "patch",
            api.patch(
                "expire-0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"n": attempt.to_string()}}})),
            ),
        )
        .await
        .expect("patch");
        let mut lines = raw_watch(&client, &format!("resourceVersion={old_rv}")).await;
        let first = next_line(&mut lines, "first line of a watch from an old rv")
            .await
            .expect("a watch from an old rv sends a line (events after it, or ERROR)");
        if first["type"] == "ERROR" {
            eprintln!("410 for rv {old_rv} after {attempt} attempts");
            break (first, lines);
        }
        // Not compacted yet: history replays from old_rv.
        let (ty, name, rv) = event_summary(&first);
        assert_eq!(
            (ty.as_str(), name.as_str()),
            ("MODIFIED", "expire-0"),
            "{first}"
        );
        assert!(rv > old_rv, "{first}");
        assert!(
            Instant::now() < end,
            "no 410 for resourceVersion {old_rv} after {COMPACTION_DEADLINE:?} of \
             compaction every second\nserver log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let status = &error["object"];
    assert_eq!(status["kind"], "Status", "{error}");
    assert_eq!(status["apiVersion"], "v1", "{error}");
    assert_eq!(status["status"], "Failure", "{error}");
    assert_eq!(status["code"], 410, "{error}");
    assert_eq!(status["reason"], "Expired", "{error}");
    let msg = status["message"].as_str().unwrap_or("");
    assert!(
        msg.starts_with(&format!("too old resource version: {old_rv} (")),
        "{error}"
    );
    // kube-apiserver ends the watch after the ERROR event.
    assert!(
        next_line(&mut lines, "end of the expired watch")
            .await
            .is_none(),
        "the watch goes on after the 410 ERROR"
    );

    // What every client does next: relist, watch from the list's version.
    let list = within(
        "relist",
        api.list(&ListParams::default().labels("suite=expire")),
    )
    .await
    .expect("relist");
    let rv = list.metadata.resource_version.clone().unwrap();
    let mut lines = raw_watch(&client, &format!("resourceVersion={rv}")).await;
    let patched = within(
        "patch after relist",
        api.patch(
            "expire-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"n": "after-relist"}}})),
        ),
    )
    .await
    .expect("patch after relist");
    let ev = next_line(&mut lines, "event after relist")
        .await
        .expect("watch from a fresh rv stays open");
    assert_eq!(
        event_summary(&ev),
        (
            "MODIFIED".to_string(),
            "expire-0".to_string(),
            rv_of(&patched)
        ),
        "{ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_too_old_resource_version_is_410_expired() {
    too_old_resource_version_is_410_expired(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_too_old_resource_version_is_410_expired() {
    let etcd = blocking(Etcd::start);
    too_old_resource_version_is_410_expired(Some(&etcd)).await;
}

// ------------------------------------------ c. SIGKILL under create load

/// Concurrent writers.
const WRITERS: usize = 16;
/// SIGKILL once this many creates were acknowledged.
const ACKED_BEFORE_KILL: usize = 120;
/// Bound on each writer's loop (never reached unless the kill fails).
const MAX_PER_WRITER: usize = 1000;
/// How long the writers may take to get ACKED_BEFORE_KILL acknowledgements.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
/// Creates after the restart, to check the allocator state survived.
const AFTER_RESTART: usize = 30;

async fn acknowledged_creates_survive_sigkill(etcd: Option<&Etcd>) {
    let mut server = blocking(|| Fairlead::start(&store_flags(etcd)));
    let client = server.client().await;
    let api: Api<Service> = Api::namespaced(client, "default");

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (api, acked, failed, in_flight, stop) = (
            api.clone(),
            acked.clone(),
            failed.clone(),
            in_flight.clone(),
            stop.clone(),
        );
        writers.push(tokio::spawn(async move {
            for i in 0..MAX_PER_WRITER {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let name = format!("crash-{w}-{i}");
                in_flight.fetch_add(1, Ordering::SeqCst);
                let res = api
                    .create(&PostParams::default(), &service(&name, "crash"))
                    .await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                match res {
                    Ok(s) => {
                        let ip = cluster_ip(&s).unwrap_or_default();
                        acked.lock().unwrap().push((name, ip));
                    }
                    Err(e) => {
                        failed.lock().unwrap().push(format!("{name}: {e}"));
                        return;
                    }
                }
            }
        }));
    }

    let end = Instant::now() + LOAD_DEADLINE;
    loop {
        let n = acked.lock().unwrap().len();
        if n >= ACKED_BEFORE_KILL {
            break;
        }
        assert!(
            failed.lock().unwrap().is_empty(),
            "create failed before the kill: {:?}",
            failed.lock().unwrap()
        );
        assert!(
            Instant::now() < end,
            "only {n} creates acknowledged in {LOAD_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_flight_at_kill = in_flight.load(Ordering::SeqCst);
    blocking(|| server.kill9());
    stop.store(true, Ordering::SeqCst);
    within("writers to stop after the kill", async {
        for w in writers {
            w.await.expect("writer task");
        }
    })
    .await;
    assert!(
        in_flight_at_kill > 0,
        "no create was in flight at the SIGKILL; the test did not kill mid-run"
    );
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    blocking(|| server.restart());
    let client = server.client().await;
    let svcs = all_services(&client).await;
    let mut missing = Vec::new();
    for (name, ip) in &acked {
        match svcs.get(&format!("default/{name}")) {
            None => missing.push(name.clone()),
            Some(s) => assert_eq!(
                cluster_ip(s).as_deref(),
                Some(ip.as_str()),
                "{name} came back with another ClusterIP"
            ),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged creates lost by SIGKILL: {missing:?}",
        missing.len(),
        acked.len()
    );
    eprintln!(
        "{} creates acknowledged, {in_flight_at_kill} in flight at the SIGKILL; \
         {} Services after restart",
        acked.len(),
        svcs.len()
    );
    assert!(svcs.contains_key("default/kubernetes"));
    assert_distinct_cluster_ips(&svcs);

    // kubectl lists the same Services.
    let out = blocking(|| server.kubectl_ok(&["get", "svc", "-A", "--no-headers"]));
    let rows = out.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(rows, svcs.len(), "kubectl get svc -A:\n{out}");
    for (name, _) in acked.iter().take(5) {
        assert!(out.contains(name.as_str()), "{name} in kubectl output");
    }

    // The allocator kept every address: new Services get fresh ones.
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let created: Vec<Service> = within(
        "creates after restart",
        futures::stream::iter(0..AFTER_RESTART)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(
                        &PostParams::default(),
                        &service(&format!("after-{i}"), "crash"),
                    )
                    .await
                }
            })
            .buffer_unordered(8)
            .try_collect(),
    )
    .await
    .expect("create after restart");
    assert_eq!(created.len(), AFTER_RESTART);
    let before = svcs.len();
    let svcs = all_services(&client).await;
    assert_eq!(svcs.len(), before + AFTER_RESTART);
    assert_distinct_cluster_ips(&svcs);

    // One allocation key per Service, owned by it: nothing half-written.
    blocking(|| server.kill9());
    let store = open_store(&server, etcd).await;
    assert_allocations_match(store.as_ref(), &svcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acknowledged_creates_survive_sigkill() {
    acknowledged_creates_survive_sigkill(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_acknowledged_creates_survive_apiserver_sigkill() {
    let etcd = blocking(Etcd::start);
    acknowledged_creates_survive_sigkill(Some(&etcd)).await;
}

// ------------------------------------------ d. two API servers, one etcd

/// Services created through each of the two API servers.
const PER_SERVER: usize = 100;
/// Concurrent creates per server.
const CONCURRENCY: usize = 20;
/// Rounds of the conflicting-update race.
const RACE_ROUNDS: usize = 20;

async fn create_many(api: Api<Service>, prefix: &'static str) -> Vec<Result<Service, kube::Error>> {
    futures::stream::iter(0..PER_SERVER)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &service(&format!("{prefix}-{i}"), "two"),
                )
                .await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apiservers_on_one_etcd_allocate_distinct_cluster_ips() {
    let etcd = blocking(Etcd::start);
    let (a, b) = blocking(|| {
        (
            Fairlead::start(&store_flags(Some(&etcd))),
            Fairlead::start(&store_flags(Some(&etcd))),
        )
    });
    assert_ne!(a.port, b.port);
    let (ca, cb) = (a.client().await, b.client().await);
    let (ra, rb) = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join(
            create_many(Api::namespaced(ca.clone(), "default"), "two-a"),
            create_many(Api::namespaced(cb.clone(), "default"), "two-b"),
        ),
    )
    .await
    .expect("200 creates within 120s");
    let errors: Vec<String> = ra
        .iter()
        .chain(&rb)
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(errors.is_empty(), "creates failed: {errors:?}");
    let mut ips = BTreeSet::new();
    for s in ra.iter().chain(&rb).map(|r| r.as_ref().unwrap()) {
        let ip = cluster_ip(s).expect("clusterIP in the create response");
        assert!(ips.insert(ip.clone()), "ClusterIP {ip} handed out twice");
    }
    assert_eq!(ips.len(), 2 * PER_SERVER);

    // Both servers see all 200, with the addresses they were created with.
    for (who, c) in [("a", &ca), ("b", &cb)] {
        let svcs = all_services(c).await;
        assert_distinct_cluster_ips(&svcs);
        let two: BTreeSet<String> = svcs
            .values()
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("suite"))
                    .map(String::as_str)
                    == Some("two")
            })
            .filter_map(cluster_ip)
            .collect();
        assert_eq!(two, ips, "Services as listed by server {who}");
    }

    // One allocation key per Service.
    let svcs = all_services(&ca).await;
    let store = open_store(&a, Some(&etcd)).await;
    assert_allocations_match(store.as_ref(), &svcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apiservers_on_one_etcd_conflicting_updates_one_wins() {
    let etcd = blocking(Etcd::start);
    let (a, b) = blocking(|| {
        (
            Fairlead::start(&store_flags(Some(&etcd))),
            Fairlead::start(&store_flags(Some(&etcd))),
        )
    });
    let api_a: Api<Service> = Api::namespaced(a.client().await, "default");
    let api_b: Api<Service> = Api::namespaced(b.client().await, "default");
    create(&api_a, "race", "race").await;

    for round in 0..RACE_ROUNDS {
        // Both servers start from the same version of the object.
        let base = within("get race", api_b.get("race")).await.expect("get");
        let with_winner = |who: &str| {
            let mut s = base.clone();
            s.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert("winner".into(), format!("{who}-{round}"));
            s
        };
        let (sa, sb) = (with_winner("a"), with_winner("b"));
        let pp = PostParams::default();
        let (ra, rb) = within(
            "two replaces",
            futures::future::join(
                api_a.replace("race", &pp, &sa),
                api_b.replace("race", &pp, &sb),
            ),
        )
        .await;
        let (winner, won, lost) = match (&ra, &rb) {
            (Ok(w), Err(e)) => ("a", w, e),
            (Err(e), Ok(w)) => ("b", w, e),
            _ => panic!(
                "round {round}: exactly one update from resourceVersion {:?} must win: \
                 a={ra:?} b={rb:?}",
                base.metadata.resource_version
            ),
        };
        assert_eq!(
            api_status(lost),
            Some((409, "Conflict".to_string())),
            "round {round}: the loser gets 409 Conflict: {lost}"
        );
        assert!(rv_of(won) > rv_of(&base));
        // Both servers now serve the winner's write.
        for api in [&api_a, &api_b] {
            let now = within("get after race", api.get("race"))
                .await
                .expect("get");
            assert_eq!(rv_of(&now), rv_of(won), "round {round}");
            assert_eq!(
                now.metadata.labels.as_ref().and_then(|l| l.get("winner")),
                Some(&format!("{winner}-{round}")),
                "round {round}"
            );
        }
    }
}
