//! `hostpath-csi snapshot-labeler` against the real driver on a real socket
//! and a stand-in kube-apiserver (the one thing a node cannot have): it must
//! label exactly the VolumeSnapshotContents whose data its driver holds,
//! through list and watch, with the token, as a merge patch that carries
//! the resourceVersion, and get over a conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");
const DRIVER: &str = "kubevirt.io.hostpath-provisioner";
const NODE: &str = "labeler-node";
const MANAGED_BY: &str = "snapshot.storage.kubernetes.io/managed-by";
const TOKEN: &str = "test-token";
const PATH: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";

struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Store {
    version: u64,
    contents: BTreeMap<String, Value>,
    /// Names patched, in order.
    patched: Vec<String>,
    /// Names whose next patch is answered 409 (after a change).
    conflict_once: BTreeSet<String>,
    watchers: Vec<Sender<Value>>,
    /// Every event with its resourceVersion: a watch from version N gets
    /// those after N first, as the API server's watch cache gives them.
    history: Vec<(u64, Value)>,
    bad_requests: Vec<String>,
}

impl Store {
    fn bump(&mut self, name: &str) -> Value {
        self.version += 1;
        let v = self.version.to_string();
        let c = self.contents.get_mut(name).unwrap();
        c["metadata"]["resourceVersion"] = json!(v);
        c.clone()
    }

    fn broadcast(&mut self, kind: &str, object: Value) {
        let event = json!({"type": kind, "object": object});
        self.history.push((self.version, event.clone()));
        self.watchers.retain(|w| w.send(event.clone()).is_ok());
    }

    fn add(&mut self, name: &str, spec: Value) {
        self.contents.insert(
            name.into(),
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                   "metadata": {"name": name}, "spec": spec}),
        );
        let object = self.bump(name);
        self.broadcast("ADDED", object);
    }
}

type Shared = Arc<Mutex<Store>>;

struct Req {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    stream.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0; len];
    stream.read_exact(&mut body).ok()?;
    Some(Req {
        method,
        path,
        headers,
        body,
    })
}

fn respond(stream: &mut TcpStream, status: &str, body: &Value) {
    let text = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn watch(stream: &mut TcpStream, store: &Shared, query: &str) {
    let from: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = channel();
    {
        let mut s = store.lock().unwrap();
        for (_, event) in s.history.iter().filter(|(v, _)| *v > from) {
            tx.send(event.clone()).unwrap();
        }
        s.watchers.push(tx);
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    while let Ok(event) = rx.recv_timeout(Duration::from_secs(60)) {
        let line = format!("{event}\n");
        if write!(stream, "{:x}\r\n{line}\r\n", line.len()).is_err() {
            return;
        }
    }
    let _ = write!(stream, "0\r\n\r\n");
}

fn patch(stream: &mut TcpStream, store: &Shared, name: &str, req: &Req) {
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    let mut s = store.lock().unwrap();
    if req.headers.get("content-type").map(String::as_str) != Some("application/merge-patch+json") {
        s.bad_requests.push(format!(
            "patch content-type {:?}",
            req.headers.get("content-type")
        ));
    }
    let Some(current) = s.contents.get(name).cloned() else {
        return respond(stream, "404 Not Found", &json!({"kind": "Status"}));
    };
    let stale = body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"];
    if s.conflict_once.remove(name) || stale {
        // Someone changed it meanwhile: the watch says so.
        let object = s.bump(name);
        s.broadcast("MODIFIED", object);
        return respond(
            stream,
            "409 Conflict",
            &json!({"kind": "Status", "code": 409}),
        );
    }
    let labels = body["metadata"]["labels"].clone();
    s.contents.get_mut(name).unwrap()["metadata"]["labels"] = labels;
    let object = s.bump(name);
    s.patched.push(name.to_owned());
    respond(stream, "200 OK", &object);
}

fn serve_one(stream: TcpStream, store: Shared) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    let Some(req) = read_request(&mut reader) else {
        return;
    };
    if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        store
            .lock()
            .unwrap()
            .bad_requests
            .push(format!("no token on {}", req.path));
        return respond(&mut stream, "401 Unauthorized", &json!({}));
    }
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    if !query.is_empty()
        && !query.contains("labelSelector=%21snapshot.storage.kubernetes.io%2Fmanaged-by")
    {
        store
            .lock()
            .unwrap()
            .bad_requests
            .push(format!("no selector: {}", req.path));
    }
    match (req.method.as_str(), path.strip_prefix(PATH)) {
        ("GET", Some("")) if query.contains("watch=1") => watch(&mut stream, &store, query),
        ("GET", Some("")) => {
            let s = store.lock().unwrap();
            let items: Vec<&Value> = s
                .contents
                .values()
                .filter(|c| c["metadata"]["labels"][MANAGED_BY].is_null())
                .collect();
            let list = json!({"kind": "VolumeSnapshotContentList",
                              "metadata": {"resourceVersion": s.version.to_string()}, "items": items});
            respond(&mut stream, "200 OK", &list);
        }
        ("PATCH", Some(name)) => patch(&mut stream, &store, name.trim_start_matches('/'), &req),
        _ => respond(&mut stream, "404 Not Found", &json!({})),
    }
}

fn api_server(store: Shared) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let store = store.clone();
            std::thread::spawn(move || serve_one(stream, store));
        }
    });
    port
}

fn ctl(socket: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait_until(what: &str, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}; labeler log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finds the snapshot ID in ctl's JSON, whatever the nesting.
fn snapshot_id(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m
            .get("snapshot_id")
            .or_else(|| m.get("snapshotId"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| m.values().find_map(snapshot_id)),
        _ => None,
    }
}

#[test]
fn contents_this_node_holds_are_labelled_for_its_snapshotter() {
    let dir = TempDir::new().unwrap();
    let pool = dir.path().join("pool");
    let socket = dir.path().join("csi.sock");
    let _driver = Reap(
        Command::new(BIN)
            .args(["serve", "--nodeid", NODE, "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--datadir")
            .arg(format!(
                r#"[{{"name":"local","path":"{}"}}]"#,
                pool.display()
            ))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl(&socket, &["create-volume", "pvc-local", "--size", "1Mi"]);
    let snap = ctl(&socket, &["create-snapshot", "snap-1", "pvc-local"]);
    let snap_id = snapshot_id(&snap).unwrap_or_else(|| panic!("no snapshot id in {snap}"));

    let store: Shared = Arc::default();
    {
        let mut s = store.lock().unwrap();
        s.add(
            "c-local",
            json!({"driver": DRIVER, "source": {"volumeHandle": "pvc-local"}}),
        );
        s.add(
            "c-remote",
            json!({"driver": DRIVER, "source": {"volumeHandle": "pvc-elsewhere"}}),
        );
        s.add(
            "c-other-driver",
            json!({"driver": "other.csi.example.com", "source": {"volumeHandle": "pvc-local"}}),
        );
        s.add(
            "c-preprovisioned",
            json!({"driver": DRIVER, "source": {"snapshotHandle": snap_id}}),
        );
        s.add(
            "c-unknown-snapshot",
            json!({"driver": DRIVER, "source": {"snapshotHandle": "snap-elsewhere"}}),
        );
        s.add(
            "c-conflict",
            json!({"driver": DRIVER, "source": {"volumeHandle": "pvc-local"}}),
        );
        s.conflict_once.insert("c-conflict".into());
    }
    let port = api_server(store.clone());
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let log = dir.path().join("labeler.log");
    let _labeler = Reap(
        Command::new(BIN)
            .args(["snapshot-labeler", "--node", NODE, "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--apiserver")
            .arg(format!("http://127.0.0.1:{port}"))
            .arg("--token-file")
            .arg(&token)
            .env("RUST_LOG", "hostpath_csi=debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let patched = |names: &[&str]| {
        let s = store.lock().unwrap();
        names.iter().all(|n| s.patched.iter().any(|p| p == n))
    };
    wait_until("list: local contents labelled", &log, || {
        patched(&["c-local", "c-preprovisioned", "c-conflict"])
    });
    // A content made after the list arrives through the watch.
    wait_until("the labeler is watching", &log, || {
        !store.lock().unwrap().watchers.is_empty()
    });
    store.lock().unwrap().add(
        "c-late",
        json!({"driver": DRIVER, "source": {"volumeHandle": "pvc-local"}}),
    );
    wait_until("watch: late content labelled", &log, || {
        patched(&["c-late"])
    });

    let s = store.lock().unwrap();
    assert!(s.bad_requests.is_empty(), "{:?}", s.bad_requests);
    for name in ["c-local", "c-preprovisioned", "c-conflict", "c-late"] {
        assert_eq!(
            s.contents[name]["metadata"]["labels"][MANAGED_BY], NODE,
            "{name}"
        );
    }
    for name in ["c-remote", "c-other-driver", "c-unknown-snapshot"] {
        assert!(
            s.contents[name]["metadata"]["labels"].is_null(),
            "{name} was labelled"
        );
    }
    let mut once = s.patched.clone();
    once.sort();
    once.dedup();
    assert_eq!(
        once.len(),
        s.patched.len(),
        "a content was patched twice: {:?}",
        s.patched
    );
}
