//! A fake Kubernetes API server, at the HTTP level.
//!
//! **This is the one fake in the suite.** No real API server (etcd,
//! kube-apiserver) can run on the test machines, so the gateway's Kubernetes
//! discovery and mirror controller are tested against this server, as
//! kube-rs's own `mock_tests.rs` test against a fake at the HTTP layer. It
//! speaks the parts of the API those clients use, over plain HTTP on
//! loopback (the gateway reads it through a kubeconfig file the test writes,
//! [`FakeKube::write_kubeconfig`]):
//! - list (`GET /api/v1/services`, `.../namespaces/NS/endpointslices`...)
//!   with a list `resourceVersion`, paged as kube-apiserver pages: with
//!   `limit=N` at most N items and a `continue` token for the rest, each
//!   page from the same snapshot (the first page's `resourceVersion`); a
//!   token older than the compacted history is `410 Expired`
//!   ([`FakeKube::expire_watches`]). kube-runtime's watcher asks for pages
//!   of 500, so a large cluster is never one response;
//! - watch (`?watch=true&resourceVersion=N`): chunked JSON events, one per
//!   line (`ADDED`, `MODIFIED`, `DELETED`), replaying history after `N`
//!   then following changes; a version older than the compacted history is
//!   answered with an `ERROR` event carrying a `410 Gone` Status, as the
//!   real server does;
//! - create, replace and delete (`POST`, `PUT`, `DELETE`) with `409`
//!   conflicts on a stale `resourceVersion` or an existing name, and `404`;
//! - metadata-only lists and watches (`Accept: ...;as=PartialObjectMetadata`)
//!   answered with the objects' metadata;
//! - label selectors on lists and watches (`labelSelector=k=v,k!=v,k,!k`;
//!   an object whose labels change out of a watch's selector is not turned
//!   into a `DELETED` as kube-apiserver does).
//!
//! It counts lists and watches per path, so a test can tell which
//! namespaces a client watches ([`FakeKube::lists_in`],
//! [`FakeKube::open_watches_in`]).
//!
//! Kinds: Services, Pods (core/v1), EndpointSlices (discovery.k8s.io/v1),
//! ServiceExports (multicluster.x-k8s.io/v1alpha1) and Leases
//! (coordination.k8s.io/v1, with the same 409s on a stale
//! `resourceVersion` that leader election relies on). Namespaces are
//! checked on create once a test declares them
//! ([`FakeKube::set_namespace`]): missing is `404`, terminating is `403`
//! with the cause `NamespaceTerminating`, as kube-apiserver answers. Users
//! are checked once a test declares them ([`FakeKube::grant`]): a bearer
//! token per user, read-only or read-write, with RBAC's `401` and `403`
//! answers. Field selectors, bookmarks, admission, defaulting (beyond a
//! ClusterIP for Services) and garbage collection are not implemented.
//!
//! A test changes objects with [`FakeKube::apply`] and [`FakeKube::delete`],
//! restarts the server on the same port mid-watch ([`FakeKube::stop`],
//! [`FakeKube::start_again`]), forces every open watch to `410 Gone`
//! ([`FakeKube::expire_watches`]) and slows lists down
//! ([`FakeKube::set_list_delay`]) to widen the relist window.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A kind the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Pod,
    EndpointSlice,
    ServiceExport,
    Lease,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::Pod,
        Kind::EndpointSlice,
        Kind::ServiceExport,
        Kind::Lease,
    ];

    /// (API prefix, plural, apiVersion, kind).
    fn info(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Kind::Service => ("/api/v1", "services", "v1", "Service"),
            Kind::Pod => ("/api/v1", "pods", "v1", "Pod"),
            Kind::EndpointSlice => (
                "/apis/discovery.k8s.io/v1",
                "endpointslices",
                "discovery.k8s.io/v1",
                "EndpointSlice",
            ),
            Kind::ServiceExport => (
                "/apis/multicluster.x-k8s.io/v1alpha1",
                "serviceexports",
                "multicluster.x-k8s.io/v1alpha1",
                "ServiceExport",
            ),
            Kind::Lease => (
                "/apis/coordination.k8s.io/v1",
                "leases",
                "coordination.k8s.io/v1",
                "Lease",
            ),
        }
    }

    fn of_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.info().3 == kind)
    }
}

/// A change, as a watch sends it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    lists: BTreeMap<Kind, u64>,
    watches: BTreeMap<Kind, u64>,
    /// Lists by (kind, namespace or "" for every namespace, label selector).
    lists_at: BTreeMap<(Kind, String, String), u64>,
    /// Watches open now, by the same key.
    open_at: BTreeMap<(Kind, String, String), u64>,
    writes: u64,
    writes_by_kind: BTreeMap<Kind, u64>,
    list_delay: Duration,
    /// Once a test declares namespaces: each one's phase (`Active`,
    /// `Terminating`); a create elsewhere is refused as a real server does.
    namespaces: Option<BTreeMap<String, String>>,
    /// Creates refused because of their namespace, by namespace.
    refused: BTreeMap<String, u64>,
    /// Once a test declares identities ([`FakeKube::grant`]): bearer token
    /// → (user name, whether it may write). Requests without a known
    /// token are `401`, writes by a read-only user `403`, as RBAC answers.
    identities: Option<BTreeMap<String, (String, bool)>>,
    /// Writes refused by RBAC, by user.
    forbidden: BTreeMap<String, u64>,
    /// Paged lists in progress, by token id: the snapshot's version and the
    /// items not served yet.
    pagers: BTreeMap<u64, (u64, Vec<Value>)>,
    next_pager: u64,
    /// Pages served, and the most items in one list response, per kind.
    pages: BTreeMap<Kind, u64>,
    largest_page: BTreeMap<Kind, usize>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch with 410 Gone.
    expire: watch::Sender<u64>,
    uid: AtomicU64,
}

impl State {
    fn count_write(&mut self, kind: Kind) {
        self.writes += 1;
        *self.writes_by_kind.entry(kind).or_default() += 1;
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeKube {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
}

impl FakeKube {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1,
                ..Default::default()
            }),
            changes,
            expire: watch::channel(0).0,
            uid: AtomicU64::new(1),
        });
        let mut me = FakeKube {
            inner,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop: None,
        };
        me.listen().await;
        me
    }

    async fn listen(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        socket
            .set_reuseaddr(true)
            .unwrap_or_else(|e| panic!("SO_REUSEADDR: {e}"));
        // The same port after a restart: retry while the old socket lingers.
        let mut tries = 0;
        loop {
            match socket.bind(self.addr) {
                Ok(()) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("fake API server cannot bind {}: {e}", self.addr),
            }
        }
        let listener = socket
            .listen(128)
            .unwrap_or_else(|e| panic!("fake API server cannot listen: {e}"));
        self.addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let (stop_tx, stop_rx) = watch::channel(false);
        self.stop = Some(stop_tx);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (inner, mut stop) = (inner.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    // A stop drops the connection mid-watch, like a crash.
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
    }

    /// The address it listens on (the same after [`FakeKube::start_again`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig that points at this server over plain HTTP.
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_user(path, "{}");
    }

    /// Writes a kubeconfig whose user presents `token` (see
    /// [`FakeKube::grant`]).
    pub fn write_kubeconfig_as(&self, path: &Path, token: &str) {
        self.write_kubeconfig_user(path, &format!("{{token: {token}}}"));
    }

    fn write_kubeconfig_user(&self, path: &Path, user: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {user}\n",
            self.addr
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Stops serving: the listener closes and every open connection (and
    /// watch) is dropped. Objects and history are kept.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
    }

    /// Serves again on the same port.
    pub async fn start_again(&mut self) {
        self.stop();
        self.listen().await;
    }

    /// Ends every open watch with `410 Gone` and compacts history, so that
    /// resuming from any version seen so far is refused and clients relist.
    pub fn expire_watches(&self) {
        {
            let mut s = self.inner.lock();
            s.compacted = s.rv + 1;
            s.history.clear();
        }
        self.inner.expire.send_modify(|n| *n += 1);
    }

    /// Delays every list response by `d` (0 to stop).
    pub fn set_list_delay(&self, d: Duration) {
        self.inner.lock().list_delay = d;
    }

    /// How many lists of `kind` were served.
    pub fn lists(&self, kind: Kind) -> u64 {
        self.inner.lock().lists.get(&kind).copied().unwrap_or(0)
    }

    /// How many list responses (pages) of `kind` were served.
    pub fn pages(&self, kind: Kind) -> u64 {
        self.inner.lock().pages.get(&kind).copied().unwrap_or(0)
    }

    /// The most items of `kind` one list response carried.
    pub fn largest_page(&self, kind: Kind) -> usize {
        self.inner
            .lock()
            .largest_page
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    /// How many watches of `kind` were opened.
    pub fn watches(&self, kind: Kind) -> u64 {
        self.inner.lock().watches.get(&kind).copied().unwrap_or(0)
    }

    /// How many lists of `kind` without a label selector were served in
    /// namespace `ns` (`None`: of every namespace, `GET /api/v1/services`).
    pub fn lists_in(&self, kind: Kind, ns: Option<&str>) -> u64 {
        let key = (kind, ns.unwrap_or("").to_string(), String::new());
        self.inner.lock().lists_at.get(&key).copied().unwrap_or(0)
    }

    /// How many watches of `kind` without a label selector are open now in
    /// namespace `ns` (`None`: of every namespace).
    pub fn open_watches_in(&self, kind: Kind, ns: Option<&str>) -> u64 {
        let key = (kind, ns.unwrap_or("").to_string(), String::new());
        self.inner.lock().open_at.get(&key).copied().unwrap_or(0)
    }

    /// The label selectors of the lists of `kind` served so far for every
    /// namespace (`GET /api/v1/services?labelSelector=...`).
    pub fn selected_lists(&self, kind: Kind) -> Vec<String> {
        self.inner
            .lock()
            .lists_at
            .keys()
            .filter(|(k, ns, sel)| *k == kind && ns.is_empty() && !sel.is_empty())
            .map(|(_, _, sel)| sel.clone())
            .collect()
    }

    /// Declares namespace `name` in `phase` (`Active` or `Terminating`),
    /// or removes it (`None`). From the first call on, the fake checks the
    /// namespace of every create as kube-apiserver's NamespaceLifecycle
    /// admission does: a missing one is `404 NotFound` (`details.kind:
    /// namespaces`), a terminating one `403 Forbidden` with the cause
    /// `NamespaceTerminating`. Before it, every namespace exists.
    pub fn set_namespace(&self, name: &str, phase: Option<&str>) {
        let mut s = self.inner.lock();
        let map = s.namespaces.get_or_insert_with(BTreeMap::new);
        match phase {
            Some(p) => map.insert(name.to_string(), p.to_string()),
            None => map.remove(name),
        };
    }

    /// Declares a user: requests carrying `Authorization: Bearer <token>`
    /// are `user` (e.g. `system:serviceaccount:meshfed-system:meshfed-gateway`),
    /// who may read everything and, with `write`, create, replace and
    /// delete. From the first call on, a request without a declared token
    /// is `401 Unauthorized` and a write by a read-only user `403
    /// Forbidden` with kube-apiserver's RBAC message; before it, anyone
    /// may do anything. Write a kubeconfig for the user with
    /// [`FakeKube::write_kubeconfig_as`].
    pub fn grant(&self, token: &str, user: &str, write: bool) {
        self.inner
            .lock()
            .identities
            .get_or_insert_with(BTreeMap::new)
            .insert(token.to_string(), (user.to_string(), write));
    }

    /// Writes refused by RBAC so far to `user`.
    pub fn forbidden_writes(&self, user: &str) -> u64 {
        self.inner.lock().forbidden.get(user).copied().unwrap_or(0)
    }

    /// Creates refused so far because namespace `ns` is missing or
    /// terminating.
    pub fn refused_creates(&self, ns: &str) -> u64 {
        self.inner.lock().refused.get(ns).copied().unwrap_or(0)
    }

    /// How many create, replace and delete requests clients made of these
    /// kinds (e.g. the mirrors' Services and EndpointSlices, without the
    /// Lease renewals).
    pub fn client_writes_of(&self, kinds: &[Kind]) -> u64 {
        let s = self.inner.lock();
        kinds
            .iter()
            .map(|k| s.writes_by_kind.get(k).copied().unwrap_or(0))
            .sum()
    }

    /// How many create, replace and delete requests clients made.
    pub fn client_writes(&self) -> u64 {
        self.inner.lock().writes
    }

    /// Creates or replaces an object (its `kind` and `metadata` say which).
    pub fn apply(&self, object: Value) {
        let kind = object["kind"]
            .as_str()
            .and_then(Kind::of_kind)
            .unwrap_or_else(|| panic!("fake API server: unknown kind in {object}"));
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no metadata.name in {object}"))
            .to_string();
        store(&self.inner, kind, &ns, &name, object);
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        remove(&self.inner, kind, namespace, name).is_some()
    }

    /// An object, as stored.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Where kube-proxy would send a TCP connection to Service
    /// `namespace/name` on `port` (its ClusterIP and that port): the
    /// Service port with that number, then, in the EndpointSlices labelled
    /// `kubernetes.io/service-name: NAME`, the slice port of the same name
    /// and the first ready address. An `Err` says what a caller would meet
    /// instead (a port the Service does not declare: kube-proxy has no rule
    /// for it and the connection is refused or hangs). Tests call through
    /// this to reach a Service as an application does, since no kube-proxy
    /// runs here.
    pub fn service_endpoint(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<SocketAddr, String> {
        let svc = self
            .get(Kind::Service, namespace, name)
            .ok_or_else(|| format!("no Service {namespace}/{name}"))?;
        let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let sp = ports
            .iter()
            .find(|p| {
                p["port"].as_u64() == Some(u64::from(port))
                    && p["protocol"].as_str().unwrap_or("TCP") == "TCP"
            })
            .ok_or_else(|| {
                format!("Service {namespace}/{name} declares no TCP port {port} (it has {ports:?})")
            })?;
        let port_name = sp["name"].as_str().unwrap_or("");
        for sl in self.list(Kind::EndpointSlice) {
            if sl["metadata"]["namespace"] != json!(namespace)
                || sl["metadata"]["labels"]["kubernetes.io/service-name"] != json!(name)
            {
                continue;
            }
            let Some(target) = sl["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str().unwrap_or("") == port_name)
                .and_then(|p| p["port"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for e in sl["endpoints"].as_array().into_iter().flatten() {
                if e["conditions"]["ready"] == json!(false) {
                    continue;
                }
                if let Some(ip) = e["addresses"][0]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                {
                    return Ok(SocketAddr::new(ip, target));
                }
            }
        }
        Err(format!(
            "Service {namespace}/{name} port {port} (`{port_name}`) has no ready endpoint in any EndpointSlice"
        ))
    }

    /// Every object of a kind.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.inner
            .lock()
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stores an object with a fresh resourceVersion (and uid, and a ClusterIP
/// for a new Service), records the change and tells the watches.
fn store(inner: &Inner, kind: Kind, ns: &str, name: &str, mut object: Value) -> Value {
    let mut s = inner.lock();
    s.rv += 1;
    let rv = s.rv;
    let key = (kind, ns.to_string(), name.to_string());
    let old = s.objects.get(&key).cloned();
    let (_, _, api_version, kind_name) = kind.info();
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind_name);
    object["metadata"]["namespace"] = json!(ns);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let uid = old
        .as_ref()
        .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("uid-{}", inner.uid.fetch_add(1, Ordering::Relaxed)));
    object["metadata"]["uid"] = json!(uid);
    if kind == Kind::Service
        && object["spec"].is_object()
        && object["spec"]["clusterIP"].is_null()
        && object["spec"]["type"] != json!("ExternalName")
    {
        let n = inner.uid.fetch_add(1, Ordering::Relaxed);
        object["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", (n / 250) % 250, n % 250 + 1));
    }
    let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
    s.objects.insert(key, object.clone());
    let change = Change {
        rv,
        kind,
        namespace: ns.to_string(),
        kind_of_event: event,
        object: object.clone(),
    };
    s.history.push(change.clone());
    // Sent under the lock, so a watch that snapshots history under the same
    // lock and then subscribes sees each change exactly once.
    let _ = inner.changes.send(change);
    object
}

fn remove(inner: &Inner, kind: Kind, ns: &str, name: &str) -> Option<Value> {
    let mut s = inner.lock();
    let mut object = s
        .objects
        .remove(&(kind, ns.to_string(), name.to_string()))?;
    s.rv += 1;
    let rv = s.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let change = Change {
        rv,
        kind,
        namespace: ns.to_string(),
        kind_of_event: "DELETED",
        object: object.clone(),
    };
    s.history.push(change.clone());
    let _ = inner.changes.send(change);
    Some(object)
}

/// A Kubernetes `Status` error response.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<FakeBody> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, v: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(FakeBody::full(Bytes::from(v.to_string())))
        .unwrap_or_default()
}

/// Parses `/api/v1[/namespaces/NS]/PLURAL[/NAME]` and the `/apis/G/V`
/// equivalents.
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    for kind in Kind::ALL {
        let (prefix, plural, _, _) = kind.info();
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            [p] if *p == plural => return Some((kind, None, None)),
            ["namespaces", ns, p] if *p == plural => {
                return Some((kind, Some(ns.to_string()), None));
            }
            ["namespaces", ns, p, name] if *p == plural => {
                return Some((kind, Some(ns.to_string()), Some(name.to_string())));
            }
            _ => {}
        }
    }
    None
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// As the object, or only its metadata for a metadata-only request.
fn shape(object: &Value, metadata_only: bool) -> Value {
    if metadata_only {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"]})
    } else {
        object.clone()
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<FakeBody> {
    let Some((kind, ns, name)) = route(req.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the fake API server does not serve {}", req.uri().path()),
        );
    };
    if let Some(refusal) = authorize(&inner, &req, kind, ns.as_deref()) {
        return refusal;
    }
    let q = query(&req);
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let method = req.method().clone();
    match (method, name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch_response(inner, kind, ns, &q, metadata_only)
        }
        (Method::GET, None) => {
            let delay = inner.lock().list_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            list_page(&inner, kind, ns.as_deref(), &q, metadata_only)
        }
        (Method::GET, Some(name)) => {
            let ns = ns.unwrap_or_default();
            match inner.lock().objects.get(&(kind, ns, name.clone())) {
                Some(o) => json_response(StatusCode::OK, &shape(o, metadata_only)),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        (Method::POST, None) => {
            let Some(ns) = ns else {
                return status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "POST needs a namespace",
                );
            };
            let Some(obj) = read_json(req).await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required",
                );
            };
            inner.lock().count_write(kind);
            if let Some(refusal) = namespace_refusal(&inner, kind, &ns, &name) {
                return refusal;
            }
            if inner
                .lock()
                .objects
                .contains_key(&(kind, ns.clone(), name.clone()))
            {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{name} already exists"),
                );
            }
            let stored = store(&inner, kind, &ns, &name, obj);
            json_response(StatusCode::CREATED, &stored)
        }
        (Method::PUT, Some(name)) => {
            let ns = ns.unwrap_or_default();
            let Some(obj) = read_json(req).await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            inner.lock().count_write(kind);
            let current = inner
                .lock()
                .objects
                .get(&(kind, ns.clone(), name.clone()))
                .cloned();
            let Some(current) = current else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                );
            };
            let sent = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !sent.is_empty() && current["metadata"]["resourceVersion"].as_str() != Some(sent) {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "the object has been modified; please apply your changes to the latest version ({name})"
                    ),
                );
            }
            let stored = store(&inner, kind, &ns, &name, obj);
            json_response(StatusCode::OK, &stored)
        }
        (Method::DELETE, Some(name)) => {
            let ns = ns.unwrap_or_default();
            inner.lock().count_write(kind);
            match remove(&inner, kind, &ns, &name) {
                Some(o) => json_response(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the fake API server does not implement {m} here"),
        ),
    }
}

/// What kube-apiserver's authentication and RBAC answer, if the request
/// is refused (see [`FakeKube::grant`]).
fn authorize(
    inner: &Inner,
    req: &Request<Incoming>,
    kind: Kind,
    ns: Option<&str>,
) -> Option<Response<FakeBody>> {
    let mut s = inner.lock();
    let ids = s.identities.as_ref()?;
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some((user, write)) = token.and_then(|t| ids.get(t)).cloned() else {
        drop(s);
        return Some(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    };
    let verb = match *req.method() {
        Method::POST => "create",
        Method::PUT => "update",
        Method::DELETE => "delete",
        Method::PATCH => "patch",
        _ => return None,
    };
    if write {
        return None;
    }
    *s.forbidden.entry(user.clone()).or_default() += 1;
    drop(s);
    let (prefix, plural, _, _) = kind.info();
    let group = prefix
        .strip_prefix("/apis/")
        .and_then(|g| g.split('/').next())
        .unwrap_or("");
    let scope = match ns {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{plural} is forbidden: User \"{user}\" cannot {verb} resource \"{plural}\" in API group \"{group}\"{scope}"),
        "reason": "Forbidden",
        "details": {"kind": plural}, "code": 403,
    });
    Some(json_response(StatusCode::FORBIDDEN, &body))
}

/// One page of a list: the first (a new snapshot of the objects) or the
/// one a `continue` token names, at most `limit` items.
fn list_page(
    inner: &Inner,
    kind: Kind,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<FakeBody> {
    let mut s = inner.lock();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let (rv, mut items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let pager = token
                .parse::<u64>()
                .ok()
                .and_then(|id| s.pagers.remove(&id));
            match pager {
                Some((rv, items)) if rv >= s.compacted => (rv, items),
                _ => {
                    drop(s);
                    // kube-apiserver's answer to a token past compaction.
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    );
                }
            }
        }
        None => {
            *s.lists.entry(kind).or_default() += 1;
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            *s.lists_at
                .entry((kind, ns.unwrap_or("").to_string(), selector.clone()))
                .or_default() += 1;
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((k, n, _), v)| {
                    *k == kind && ns.is_none_or(|ns| ns == n) && selects(&selector, v)
                })
                .map(|(_, v)| shape(v, metadata_only))
                .collect();
            (s.rv, items)
        }
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        s.next_pager += 1;
        let id = s.next_pager;
        metadata["continue"] = json!(id.to_string());
        metadata["remainingItemCount"] = json!(rest.len());
        s.pagers.insert(id, (rv, rest));
    }
    *s.pages.entry(kind).or_default() += 1;
    let largest = s.largest_page.entry(kind).or_default();
    *largest = (*largest).max(items.len());
    drop(s);
    let (_, _, api_version, kind_name) = kind.info();
    let list = json!({
        "apiVersion": if metadata_only { "meta.k8s.io/v1" } else { api_version },
        "kind": if metadata_only { "PartialObjectMetadataList".to_string() } else { format!("{kind_name}List") },
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

/// What kube-apiserver answers a create in a namespace that does not exist
/// or is terminating (NamespaceLifecycle admission), if it does.
fn namespace_refusal(
    inner: &Inner,
    kind: Kind,
    ns: &str,
    name: &str,
) -> Option<Response<FakeBody>> {
    let mut s = inner.lock();
    let phase = s.namespaces.as_ref()?.get(ns).cloned();
    let (_, plural, _, _) = kind.info();
    let body = match phase.as_deref() {
        None => json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("namespaces \"{ns}\" not found"), "reason": "NotFound",
            "details": {"name": ns, "kind": "namespaces"}, "code": 404,
        }),
        Some("Terminating") => json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{plural} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"),
            "reason": "Forbidden",
            "details": {"name": name, "kind": plural, "causes": [{
                "reason": "NamespaceTerminating",
                "message": format!("namespace {ns} is being terminated"),
                "field": "metadata.namespace"}]},
            "code": 403,
        }),
        Some(_) => return None,
    };
    *s.refused.entry(ns.to_string()).or_default() += 1;
    let code = StatusCode::from_u16(body["code"].as_u64().unwrap_or(500) as u16)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(json_response(code, &body))
}

async fn read_json(req: Request<Incoming>) -> Option<Value> {
    let body = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

fn event_line(kind_of_event: &str, object: Value) -> Bytes {
    let mut line = json!({"type": kind_of_event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    inner: Arc<Inner>,
    kind: Kind,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<FakeBody> {
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let gone = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410,
    });
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let open_key = (kind, ns.clone().unwrap_or_default(), selector.clone());
    let (backlog, mut changes, expired) = {
        let mut s = inner.lock();
        *s.watches.entry(kind).or_default() += 1;
        *s.open_at.entry(open_key.clone()).or_default() += 1;
        if since < s.compacted {
            (Vec::new(), None, true)
        } else {
            let backlog: Vec<Change> = s
                .history
                .iter()
                .filter(|c| c.rv > since && c.kind == kind)
                .cloned()
                .collect();
            (backlog, Some(inner.changes.subscribe()), false)
        }
    };
    let mut expire = inner.expire.subscribe();
    expire.mark_unchanged();
    let open = OpenWatch {
        inner: inner.clone(),
        key: open_key,
    };
    tokio::spawn(async move {
        let _open = open;
        let wanted = |c: &Change| {
            c.kind == kind
                && ns.as_ref().is_none_or(|ns| *ns == c.namespace)
                && selects(&selector, &c.object)
        };
        if expired {
            let _ = tx.send(event_line("ERROR", gone)).await;
            return;
        }
        for c in backlog.into_iter().filter(|c| wanted(c)) {
            if tx
                .send(event_line(c.kind_of_event, shape(&c.object, metadata_only)))
                .await
                .is_err()
            {
                return;
            }
        }
        let Some(changes) = changes.as_mut() else {
            return;
        };
        loop {
            tokio::select! {
                // An expiry first: a change made after it must not reach
                // a watch that is already expired.
                biased;
                r = expire.changed() => {
                    if r.is_ok() {
                        let _ = tx.send(event_line("ERROR", gone.clone())).await;
                    }
                    return;
                }
                c = changes.recv() => match c {
                    Ok(_) if expire.has_changed().unwrap_or(true) => {
                        let _ = tx.send(event_line("ERROR", gone.clone())).await;
                        return;
                    }
                    Ok(c) if c.rv > since && wanted(&c) => {
                        if tx.send(event_line(c.kind_of_event, shape(&c.object, metadata_only))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind: as a real server would, end the watch.
                    Err(_) => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(FakeBody::Stream(rx))
        .unwrap_or_default()
}

/// Counts a watch as open until its task ends (the client went away, or
/// the watch was ended).
#[derive(Debug)]
struct OpenWatch {
    inner: Arc<Inner>,
    key: (Kind, String, String),
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if let Some(n) = self.inner.lock().open_at.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Whether `object`'s labels satisfy a label selector (`k=v`, `k==v`,
/// `k!=v`, `k`, `!k`, comma-separated, all must hold); an empty selector
/// selects everything.
fn selects(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                let v = v.strip_prefix('=').unwrap_or(v);
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels[k.trim()].is_null()
            } else {
                !labels[term].is_null()
            }
        })
}

/// Decodes `%XX` escapes and `+` (a query string's value).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? * 16 + hex(*bytes.get(i + 2)?)?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(u8::try_from(b).unwrap_or(b'?'));
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body: a whole JSON document, or watch events as they come.
#[derive(Debug)]
pub enum FakeBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl FakeBody {
    fn full(b: Bytes) -> Self {
        FakeBody::Full(Some(b))
    }
}

impl Default for FakeBody {
    fn default() -> Self {
        FakeBody::Full(None)
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
}
