//! Watch streams: newline-delimited JSON `WatchEvent`s over a chunked
//! response (HTTP/1.1) or a stream (HTTP/2).
//!
//! Semantics follow kube-apiserver, because every informer depends on them:
//!
//! * `resourceVersion` unset or `"0"`: synthetic `ADDED` events for the
//!   current state, then changes after it.
//! * `resourceVersion=N`: changes after N; if N was compacted, one `ERROR`
//!   event carrying a 410 `Expired` Status (clients then relist).
//! * selectors are applied to both the old and the new object, so an object
//!   that leaves the selection is reported as `DELETED`, one that enters as
//!   `ADDED`.
//! * `allowWatchBookmarks`: store progress is reported as `BOOKMARK` events
//!   (an object of the watched kind holding only `resourceVersion`).
//! * `sendInitialEvents=true`: the initial events end with a bookmark
//!   annotated `k8s.io/initial-events-end` (WatchList).
//!
//! Several components watch the same resources (every node, the
//! controllers, twice over for slices), so a change is decoded once and
//! its plain-JSON watch line encoded once, for all of them
//! ([`DecodedEvents`]); each watch only evaluates its own selectors. Without
//! that, every write cost the API server one JSON decode and encode per
//! watcher, which in `fairlead up` made a bulk load half as fast as with no
//! one watching. A plain-JSON line is not even decoded: it is the stored
//! bytes with the resourceVersion spliced into `metadata` (checked, not
//! parsed into values, by `serde_json`'s raw values); only watches with
//! selectors (or Table output) decode the object.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::resources::ResourceDef;
use crate::api::status::ApiError;
use crate::store::{EventKind, KeyValue, Revision, StoreError, WatchItem};

use super::objects::decode;
use super::rest::{parse_selectors, render, selected, Body, Output, Query, ResourceRoute};
use super::{table, Server};

/// Watches end after this long unless `timeoutSeconds` says otherwise
/// (clients reconnect from their last resourceVersion).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A watcher whose queue has been full this long is closed, as
/// kube-apiserver closes unresponsive watchers: its client stopped reading
/// (or reads slower than the cluster changes), and holding its events
/// would grow without bound. A queue is [`WATCH_QUEUE`] lines; past it,
/// only the kernel's socket buffers hold more. The client sees its stream
/// end and watches again from the last resourceVersion it read (or, if
/// that was compacted meanwhile, gets a 410 and re-lists).
const SLOW_WATCHER: Duration = Duration::from_secs(5);
/// Watch lines queued per watcher before it must keep up.
const WATCH_QUEUE: usize = 64;

/// Queue a line for the watcher; false when it is gone or too slow (then
/// the watch ends, counted in `apiserver_terminated_watchers_total`).
async fn deliver(tx: &mpsc::Sender<Bytes>, line: Bytes, resource: &'static str) -> bool {
    match tx.send_timeout(line, SLOW_WATCHER).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            metrics::counter!("apiserver_terminated_watchers_total", "resource" => resource)
                .increment(1);
            tracing::info!(resource, "closing a watcher that stopped reading");
            false
        }
    }
}

struct WatchGauge(&'static str);
impl WatchGauge {
    fn new(resource: &'static str) -> Self {
        metrics::gauge!("apiserver_registered_watchers", "resource" => resource).increment(1.0);
        WatchGauge(resource)
    }
}
impl Drop for WatchGauge {
    fn drop(&mut self) {
        metrics::gauge!("apiserver_registered_watchers", "resource" => self.0).decrement(1.0);
    }
}

/// Formats events for one watch (plain objects or Table rows).
struct Encoder {
    def: &'static ResourceDef,
    out: Output,
    q: Query,
    first: bool,
}

impl Encoder {
    /// The watch line of a decoded version: shared with other watches for
    /// plain JSON, built here for other outputs.
    fn shared_event(&mut self, ty: &'static str, d: &Decoded) -> Option<Bytes> {
        let i = match (self.out, ty) {
            (Output::Object, "ADDED") => 0,
            (Output::Object, "MODIFIED") => 1,
            (Output::Object, "DELETED") => 2,
            _ => return Some(self.event(ty, d.obj()?.clone())),
        };
        d.lines[i]
            .get_or_init(|| {
                spliced_line(ty, &d.kv)
                    .or_else(|| d.obj().map(|obj| line(&json!({"type": ty, "object": obj}))))
            })
            .clone()
    }

    fn event(&mut self, ty: &str, obj: Value) -> Bytes {
        let object = match self.out {
            Output::Table => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(json!(""));
                let t = table::table(
                    self.def.kind,
                    &[obj],
                    self.q
                        .get("includeObject")
                        .map_or("Metadata", String::as_str),
                    self.first,
                    json!({"resourceVersion": rv}),
                );
                self.first = false;
                t
            }
            out => render(self.def, obj, out, &self.q),
        };
        line(&json!({"type": ty, "object": object}))
    }

    fn bookmark(&self, rev: Revision, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(&json!({"type": "BOOKMARK", "object": {
            "kind": self.def.kind_name, "apiVersion": self.def.api_version, "metadata": meta}}))
    }
}

/// One stored version of an object: decoded (on first use), and its
/// plain-JSON watch lines (built on first use). `None`: the stored bytes
/// are not a valid object (logged once).
pub(super) struct Decoded {
    kv: KeyValue,
    obj: OnceLock<Option<Value>>,
    /// `{"metadata": <its metadata>}` only: enough for label selectors and
    /// `metadata.*` field selectors, at a fraction of a whole decode (an
    /// EndpointSlice's endpoints are skipped, not built).
    meta: OnceLock<Option<Value>>,
    /// `{"type": <ADDED|MODIFIED|DELETED>, "object": obj}` + newline.
    lines: [OnceLock<Option<Bytes>>; 3],
}

impl Decoded {
    fn obj(&self) -> Option<&Value> {
        self.obj
            .get_or_init(|| match decode(&self.kv) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(key = %self.kv.key, error = ?e, "watch: skipping an undecodable object");
                    None
                }
            })
            .as_ref()
    }

    /// What a selector that reads only metadata needs (see `meta`); the
    /// whole object when the bytes cannot be split cheaply.
    fn meta_view(&self) -> Option<&Value> {
        self.meta
            .get_or_init(|| {
                use serde_json::value::RawValue;
                let top: HashMap<&str, &RawValue> = serde_json::from_slice(&self.kv.value).ok()?;
                let meta: Value = serde_json::from_str(top.get("metadata")?.get()).ok()?;
                Some(json!({ "metadata": meta }))
            })
            .as_ref()
            .or_else(|| self.obj())
    }

    /// The view `sel` needs to be judged.
    fn view(&self, sel: Selection) -> Option<&Value> {
        match sel {
            Selection::Metadata => self.meta_view(),
            Selection::Object => self.obj(),
        }
    }
}

/// What a filtered watch's selectors read.
#[derive(Clone, Copy)]
enum Selection {
    /// Labels and `metadata.*` fields only.
    Metadata,
    /// Other fields (e.g. a Pod's `spec.nodeName`).
    Object,
}

/// The watch line of a stored object without decoding it:
/// `{"type":<ty>,"object":<stored JSON with "resourceVersion":"<rev>" first
/// in its metadata>}`. `None` when the bytes are not an object with a
/// `metadata` object free of a resourceVersion (the caller then decodes).
fn spliced_line(ty: &str, kv: &KeyValue) -> Option<Bytes> {
    use serde_json::value::RawValue;
    // Borrowed keys: a key with escapes fails here and takes the slow path.
    let top: HashMap<&str, &RawValue> = serde_json::from_slice(&kv.value).ok()?;
    let meta = top.get("metadata")?.get();
    if !meta.starts_with('{') || meta.contains("\"resourceVersion\"") {
        return None;
    }
    // `meta` points into `kv.value`: where its `{` is.
    let at = meta.as_ptr() as usize - kv.value.as_ptr() as usize;
    let rv = format!("\"resourceVersion\":\"{}\"", kv.mod_revision);
    let empty = meta[1..].trim_start().starts_with('}');
    let mut b = Vec::with_capacity(kv.value.len() + rv.len() + ty.len() + 32);
    b.extend_from_slice(b"{\"type\":\"");
    b.extend_from_slice(ty.as_bytes());
    b.extend_from_slice(b"\",\"object\":");
    b.extend_from_slice(&kv.value[..=at]);
    b.extend_from_slice(rv.as_bytes());
    if !empty {
        b.push(b',');
    }
    b.extend_from_slice(&kv.value[at + 1..]);
    b.extend_from_slice(b"}\n");
    Some(Bytes::from(b))
}

/// How many decoded versions are kept: enough for every watcher to pass by
/// a burst of changes (watches of one resource receive a change within
/// moments of each other).
const DECODED_KEPT: usize = 4096;

/// The cache and its keys, oldest first.
type DecodedInner = (
    HashMap<(String, Revision), Arc<Decoded>>,
    VecDeque<(String, Revision)>,
);

/// Decoded versions of objects by (key, revision of the version), shared by
/// every watch of this API server; the oldest go first.
#[derive(Default)]
pub(super) struct DecodedEvents {
    inner: Mutex<DecodedInner>,
}

impl DecodedEvents {
    /// The shared entry of `kv`, from the cache or new.
    fn get(&self, kv: &KeyValue) -> Arc<Decoded> {
        let k = (kv.key.clone(), kv.mod_revision);
        if let Some(d) = self.inner.lock().unwrap().0.get(&k) {
            return d.clone();
        }
        let d = Arc::new(Decoded {
            kv: kv.clone(),
            obj: OnceLock::new(),
            meta: OnceLock::new(),
            lines: Default::default(),
        });
        let mut g = self.inner.lock().unwrap();
        let (map, order) = &mut *g;
        if map.insert(k.clone(), d.clone()).is_none() {
            order.push_back(k);
            while order.len() > DECODED_KEPT {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        d
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": e.to_status()}))
}

fn expired(requested: Revision, compacted: Revision) -> ApiError {
    ApiError::gone(format!(
        "too old resource version: {requested} ({compacted})"
    ))
}

impl Server {
    pub(super) async fn watch(
        &self,
        r: &ResourceRoute,
        q: &Query,
        out: Output,
    ) -> Result<Response<Body>, ApiError> {
        let def = r.def;
        let mut q = q.clone();
        if let Some(name) = &r.name {
            // /watch/.../name: a watch of one object.
            let fs = match q.get("fieldSelector").filter(|s| !s.is_empty()) {
                Some(f) => format!("{f},metadata.name={name}"),
                None => format!("metadata.name={name}"),
            };
            q.insert("fieldSelector".into(), fs);
        }
        let (labels, fields) = parse_selectors(def, &q)?;
        // Unfiltered watches need not decode previous values.
        let filtered = !labels.is_empty() || !fields.is_empty();
        let selection = if fields.fields().iter().all(|f| f.starts_with("metadata.")) {
            Selection::Metadata
        } else {
            Selection::Object
        };
        let bookmarks = matches!(
            q.get("allowWatchBookmarks").map(String::as_str),
            Some("true" | "1")
        );
        let send_initial = q.get("sendInitialEvents").map(String::as_str);
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT)
            .min(DEFAULT_TIMEOUT);
        let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
        let prefix = def.prefix(r.namespace.as_deref());

        let mut enc = Encoder {
            def,
            out,
            q: q.clone(),
            first: true,
        };
        let (tx, rx) = mpsc::channel::<Bytes>(WATCH_QUEUE);
        // Initial state.
        let initial = send_initial == Some("true")
            || (send_initial.is_none() && (rv.is_empty() || rv == "0"));
        let mut start: Revision;
        let mut initial_frames = Vec::new();
        if initial {
            if send_initial == Some("true") && !bookmarks {
                return Err(ApiError::invalid(
                    "ListOptions",
                    "",
                    vec![crate::api::status::FieldError::forbidden(
                        "allowWatchBookmarks",
                        "allowWatchBookmarks required when sendInitialEvents is true",
                    )],
                ));
            }
            let page = self.store.list_all(&prefix).await?;
            start = page.revision;
            for kv in page.kvs {
                let obj = decode(&kv)?;
                if selected(&obj, &labels, &fields) {
                    initial_frames.push(enc.event("ADDED", obj));
                }
            }
            if send_initial == Some("true") {
                initial_frames.push(enc.bookmark(start, true));
            }
        } else {
            start = rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: {rv:?}: must be a non-negative integer"
                ))
            })?;
        }

        let watch = match self.store.watch(&prefix, start).await {
            Ok(w) => Some(w),
            Err(StoreError::Compacted { compacted, .. }) => {
                initial_frames.push(error_event(&expired(start, compacted)));
                None
            }
            Err(e) => return Err(e.into()),
        };
        let gauge = WatchGauge::new(def.plural);
        let decoded = self.decoded.clone();
        tokio::spawn(async move {
            let _gauge = gauge;
            let resource = def.plural;
            for f in initial_frames {
                if !deliver(&tx, f, resource).await {
                    return;
                }
            }
            let Some(mut watch) = watch else { return };
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut last_bookmark = tokio::time::Instant::now();
            loop {
                let item = tokio::select! {
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    item = watch.next() => item,
                };
                let frame = match item {
                    None => return,
                    Some(Err(StoreError::Compacted { compacted, .. })) => {
                        let _ = tx.send(error_event(&expired(start, compacted))).await;
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(error_event(&ApiError::from(e))).await;
                        return;
                    }
                    Some(Ok(WatchItem::Progress(rev))) => {
                        if !bookmarks
                            || rev <= start
                            || last_bookmark.elapsed() < Duration::from_secs(1)
                        {
                            continue;
                        }
                        last_bookmark = tokio::time::Instant::now();
                        start = rev;
                        enc.bookmark(rev, false)
                    }
                    Some(Ok(WatchItem::Event(ev))) => {
                        start = ev.kv.mod_revision;
                        let d = decoded.get(&ev.kv);
                        let is = if filtered {
                            let Some(obj) = d.view(selection) else {
                                continue;
                            };
                            selected(obj, &labels, &fields)
                        } else {
                            true
                        };
                        // Whether the watcher saw the object before this
                        // event. A delete carries the last value itself.
                        // An update without its previous value (compacted
                        // in etcd), or on an unfiltered watch, is judged
                        // by whether the key existed before.
                        let existed = ev.kv.create_revision != ev.kv.mod_revision;
                        let was = match ev.kind {
                            EventKind::Delete => is,
                            EventKind::Put if !filtered => existed,
                            EventKind::Put => {
                                let prev = ev.prev.as_ref().map(|p| decoded.get(p));
                                match prev.as_ref().and_then(|p| p.view(selection)) {
                                    Some(o) => selected(o, &labels, &fields),
                                    None => existed && is,
                                }
                            }
                        };
                        let ty = match (ev.kind, was, is) {
                            (EventKind::Delete, true, _) => "DELETED",
                            (EventKind::Put, true, true) => "MODIFIED",
                            (EventKind::Put, false, true) => "ADDED",
                            (EventKind::Put, true, false) => "DELETED",
                            _ => continue,
                        };
                        let Some(frame) = enc.shared_event(ty, &d) else {
                            continue;
                        };
                        frame
                    }
                };
                if !deliver(&tx, frame, resource).await {
                    return;
                }
            }
        });
        let stream = coalesced(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
        let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }
}

/// At most this many bytes of watch lines go out as one body frame.
const COALESCE_BYTES: usize = 64 * 1024;

/// The watch lines of `rx` as body frames, each holding every line that
/// was already waiting when the connection asked for data (up to
/// [`COALESCE_BYTES`]). Nothing waits for more: a line alone goes out at
/// once. Under a burst of writes (a bulk load fans out several events
/// per store commit to every watcher) this turns one socket write, one
/// wake-up and one read on the client per event into one per burst.
fn coalesced(rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut more = match rx.try_recv() {
            Ok(b) => b,
            Err(_) => return Some((first, rx)),
        };
        let mut buf = bytes::BytesMut::with_capacity((first.len() + more.len()) * 2);
        buf.extend_from_slice(&first);
        loop {
            buf.extend_from_slice(&more);
            if buf.len() >= COALESCE_BYTES {
                break;
            }
            match rx.try_recv() {
                Ok(b) => more = b,
                Err(_) => break,
            }
        }
        Some((buf.freeze(), rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn coalesced_sends_waiting_lines_together_and_a_lone_line_at_once() {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let mut s = std::pin::pin!(coalesced(rx));
        tx.send(Bytes::from_static(b"a\n")).await.unwrap();
        tx.send(Bytes::from_static(b"b\n")).await.unwrap();
        tx.send(Bytes::from_static(b"c\n")).await.unwrap();
        assert_eq!(s.next().await.unwrap(), Bytes::from_static(b"a\nb\nc\n"));
        tx.send(Bytes::from_static(b"d\n")).await.unwrap();
        assert_eq!(s.next().await.unwrap(), Bytes::from_static(b"d\n"));
        drop(tx);
        assert!(s.next().await.is_none());
    }

    fn kv(value: &str) -> KeyValue {
        KeyValue {
            key: "/registry/services/default/web".into(),
            value: value.as_bytes().to_vec(),
            create_revision: 3,
            mod_revision: 7,
        }
    }

    /// The spliced line is the decoded line, as JSON; shapes it cannot
    /// splice take the decoding path.
    #[test]
    fn spliced_lines_equal_decoded_lines() {
        for stored in [
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","labels":{"a":"b"}},"spec":{"ports":[{"port":80}]}}"#,
            r#"{"metadata":{},"kind":"Service"}"#,
            r#"{"kind":"Service","metadata": { } }"#,
            r#"{"kind":"Service","spec":{"metadata":{"x":1}},"metadata":{"name":"n\"q"}}"#,
        ] {
            let kv = kv(stored);
            let spliced = spliced_line("MODIFIED", &kv).expect(stored);
            assert!(spliced.ends_with(b"\n"));
            let got: Value = serde_json::from_slice(&spliced).unwrap();
            let want = json!({"type": "MODIFIED", "object": decode(&kv).unwrap()});
            assert_eq!(got, want, "{stored}");
        }
        for stored in [
            r#"{"kind":"Service"}"#,
            r#"{"metadata":{"resourceVersion":"1"}}"#,
            r#"{"metadata":[]}"#,
            r#"{"meta\u0064ata":{}}"#,
            r#"{"metadata":{}"#,
            "",
        ] {
            assert_eq!(spliced_line("ADDED", &kv(stored)), None, "{stored}");
        }
    }

    /// A selector reading only metadata judges the metadata view as it
    /// judges the whole object.
    #[test]
    fn metadata_view_selects_like_the_object() {
        use crate::api::selector::{FieldSelector, LabelSelector};
        let stored = [
            r#"{"kind":"EndpointSlice","metadata":{"name":"web-1","namespace":"default","labels":{"kubernetes.io/service-name":"web","endpointslice.kubernetes.io/managed-by":"fairlead"}},"endpoints":[{"addresses":["10.0.0.1"]}]}"#,
            r#"{"kind":"EndpointSlice","metadata":{"name":"bulk","namespace":"b","labels":{"x":"y"}},"endpoints":[]}"#,
            r#"{"kind":"EndpointSlice","metadata":{"name":"nolabels","namespace":"b"}}"#,
            r#"{"kind":"EndpointSlice","metadata":[]}"#,
        ];
        let selectors = [
            ("endpointslice.kubernetes.io/managed-by=fairlead", ""),
            ("kubernetes.io/service-name in (web,db),x!=y", ""),
            ("!x", "metadata.namespace=b"),
            ("", "metadata.name=web-1"),
        ];
        for s in stored {
            let d = Decoded {
                kv: kv(s),
                obj: OnceLock::new(),
                meta: OnceLock::new(),
                lines: Default::default(),
            };
            for (l, f) in selectors {
                let (l, f) = (
                    LabelSelector::parse(l).unwrap(),
                    FieldSelector::parse(f).unwrap(),
                );
                let full = d.obj().map(|o| selected(o, &l, &f));
                let meta = d.view(Selection::Metadata).map(|o| selected(o, &l, &f));
                assert_eq!(full, meta, "{s} {l:?} {f:?}");
            }
        }
    }
}
