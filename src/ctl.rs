//! The control socket (`--control PATH`): JSON lines, QMP-like. The server greets with
//! `{"QMP": ...}`, answers `{"execute": NAME, "arguments": {...}, "id": ...}` with
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, and pushes BLOCK_IO_ERROR events to
//! every connection. `thinblk ctl` is its client.
//!
//! Commands: `query-status`, `query-parked`, `cont`, `set-policy` (arguments `werror`,
//! `rerror`, `retry-interval`, `retry-timeout`), `freeze`/`thaw`, `hand-over` (a stopped
//! VM's image, before it migrates: see docs/operating.md "Live migration"), `snapshot`
//! (arguments `overlay`, `volume-uuid`: see docs/operating.md "Snapshots").

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use thinblk_vhost::ParkHub;

use crate::fault::state::IoErrorEvent;
use crate::fault::{ErrorPolicy, FaultState, Settings};

/// Most simultaneous control connections.
pub const MAX_CLIENTS: usize = 16;
/// Longest command line accepted (bytes).
const MAX_LINE: usize = 64 * 1024;

/// What the control socket reports on and acts upon.
#[derive(Clone)]
pub struct Target {
    /// The error-policy state.
    pub faults: Arc<FaultState>,
    /// Parked requests.
    pub hub: Arc<ParkHub>,
    /// The thin volume's status, when there is one.
    pub thin: Option<Arc<dyn Fn() -> Value + Send + Sync>>,
    /// The image (`freeze` writes its metadata back and syncs it).
    pub image: Option<Arc<dyn thinblk_vhost::Disk>>,
    /// The image's handover around live migration (`query-status` shows it).
    pub handover: Option<Arc<crate::handover::Handover>>,
    /// Chain operations (`snapshot`; `query-status` shows the chain).
    pub chain: Option<Arc<crate::chain::ChainControl>>,
}

/// How long `freeze` waits for writes at the storage to finish.
pub const FREEZE_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
/// A freeze thaws by itself after this long unless the command says otherwise.
pub const FREEZE_DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// `freeze`: holds new writes, waits for those at the storage, writes the image's metadata
/// back and syncs its files, so the storage holds a clean image (e.g. for an LV snapshot);
/// thaws by itself after `timeout_ms`.
fn freeze(t: &Target, timeout_ms: u64) -> Result<u64, String> {
    let n = t.hub.freeze(FREEZE_DRAIN_LIMIT)?;
    let synced = (|| -> Result<(), String> {
        if let Some(img) = &t.image {
            img.prepare_flush().map_err(|e| format!("metadata write-back: {e}"))?;
            for fd in img.files().into_iter().filter(|fd| *fd >= 0) {
                // SAFETY: fdatasync on an fd the image keeps open for its lifetime.
                if unsafe { libc::fdatasync(fd) } != 0 {
                    return Err(format!("sync: {}", std::io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = synced {
        t.hub.thaw();
        return Err(e);
    }
    let hub = t.hub.clone();
    let _ = std::thread::Builder::new().name("freeze-timeout".into()).spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(timeout_ms));
        if hub.thaw_if(n) {
            tracing::warn!(timeout_ms, "freeze timed out: thawed");
        }
    });
    tracing::info!(timeout_ms, "disk frozen: writes held, image clean on the storage");
    Ok(n)
}

/// The running server; removes its socket when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 0600, appearing only once listening) and serves it on its own threads.
///
/// The socket is bound inside a private directory (0700) beside `path`, narrowed to 0600 and
/// only then renamed into place: whatever the umask, nobody else can connect in between.
pub fn serve(path: &Path, target: Target) -> io::Result<Server> {
    use std::os::unix::fs::DirBuilderExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let private = path.with_file_name(format!(".{name}.{}.d", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let bound = UnixListener::bind(&tmp)
        .and_then(|l| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map(|_| l))
        .and_then(|l| std::fs::rename(&tmp, path).map(|_| l));
    let _ = std::fs::remove_dir_all(&private);
    let listener = bound?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                clients.fetch_sub(1, Ordering::SeqCst);
                let mut c = conn;
                let _ = writeln!(c, "{}", json!({"error": {"class": "GenericError", "desc": "too many control connections"}}));
                continue;
            }
            let target = target.clone();
            let clients = clients.clone();
            let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                if let Err(e) = session(conn, &target) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                clients.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                tracing::warn!("could not start a control connection thread");
            }
        }
    })?;
    tracing::info!(path = %path.display(), "control socket listening");
    Ok(Server { path: path.to_path_buf(), stop })
}

fn send(out: &Mutex<UnixStream>, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    let mut s = out.lock().map_err(|_| io::Error::other("control writer lock poisoned"))?;
    s.write_all(line.as_bytes())
}

/// One connection: greeting, then commands in, answers and events out.
fn session(conn: UnixStream, target: &Target) -> io::Result<()> {
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let out = Arc::new(Mutex::new(conn.try_clone()?));
    send(&out, &json!({"QMP": {"version": {"thinblk": env!("CARGO_PKG_VERSION")}, "capabilities": ["events"]}}))?;
    let events = target.faults.subscribe();
    let closed = Arc::new(AtomicBool::new(false));
    let (ev_out, ev_closed) = (out.clone(), closed.clone());
    let pusher = std::thread::Builder::new().name("control-events".into()).spawn(move || {
        while !ev_closed.load(Ordering::SeqCst) {
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => {
                    if send(&ev_out, &event_json(&ev)).is_err() {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    })?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let result = loop {
        line.clear();
        match io::Read::take(&mut reader, MAX_LINE as u64).read_line(&mut line) {
            Ok(0) => break Ok(()),
            Ok(_) if !line.ends_with('\n') && line.len() >= MAX_LINE => {
                let _ = send(&out, &error("GenericError", "command line too long"));
                break Ok(());
            }
            Ok(_) => {
                if line.trim().is_empty() {
                    continue;
                }
                let reply = handle(line.trim(), target);
                if let Err(e) = send(&out, &reply) {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    // The event thread sees this within its 200 ms wait and ends by itself; not waited for,
    // so the connection's slot is free at once (a client that connects per command is not
    // refused for "too many control connections" by connections that already closed).
    closed.store(true, Ordering::SeqCst);
    drop(pusher);
    result
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn event_json(ev: &IoErrorEvent) -> Value {
    json!({
        "event": "BLOCK_IO_ERROR",
        "data": {
            "device": "",
            "operation": ev.operation,
            "action": ev.action,
            "errno": ev.errno,
            "nospace": ev.nospace,
            "reason": ev.reason,
            "suppressed": ev.suppressed,
        },
        "timestamp": {"seconds": ev.timestamp_us / 1_000_000, "microseconds": ev.timestamp_us % 1_000_000},
    })
}

fn settings_json(s: &Settings) -> Value {
    json!({
        "werror": s.werror.name(),
        "rerror": s.rerror.name(),
        "retry-interval": s.interval.as_millis() as u64,
        "retry-timeout": s.timeout.as_millis() as u64,
    })
}

/// Executes one command line; returns the reply object.
pub fn handle(line: &str, t: &Target) -> Value {
    let Ok(cmd) = serde_json::from_str::<Value>(line) else {
        return error("GenericError", "not a JSON object");
    };
    let id = cmd.get("id").cloned();
    let Some(name) = cmd.get("execute").and_then(Value::as_str) else {
        return with_id(error("GenericError", "missing \"execute\""), id);
    };
    let args = cmd.get("arguments").cloned().unwrap_or_else(|| json!({}));
    let reply = match name {
        "query-status" => {
            let s = t.faults.settings();
            let c = t.faults.counters();
            let mut policy = settings_json(&s);
            if let Some(o) = policy.as_object_mut() {
                o.insert("parked".into(), json!(t.hub.parked()));
                o.insert("parked-total".into(), json!(t.hub.parked_total()));
                o.insert("first-failure-ms-ago".into(), json!(t.faults.first_failure().map(|d| d.as_millis() as u64)));
                o.insert("errors".into(), json!({"total": c.errors, "reported": c.reported, "ignored": c.ignored, "parked": c.parked}));
                o.insert("thin".into(), t.thin.as_ref().map(|f| f()).unwrap_or(Value::Null));
                o.insert("migration".into(), t.handover.as_ref().map(|h| h.status().json()).unwrap_or(Value::Null));
                o.insert("chain".into(), t.chain.as_ref().map(|c| c.chain_json()).unwrap_or(Value::Null));
            }
            json!({"return": policy})
        }
        "query-parked" => json!({"return": {
            "count": t.hub.parked(),
            "total": t.hub.parked_total(),
            "first-failure-ms-ago": t.faults.first_failure().map(|d| d.as_millis() as u64),
        }}),
        "cont" => {
            t.faults.cont();
            json!({"return": {}})
        }
        "hand-over" => match &t.handover {
            None => error("GenericError", "no image handover in this process"),
            Some(h) => match h.hand_over_stopped() {
                Ok(()) => json!({"return": h.status().json()}),
                Err(e) => error("GenericError", &e),
            },
        },
        "freeze" => {
            let timeout = match args.get("timeout-ms") {
                None => Ok(FREEZE_DEFAULT_TIMEOUT_MS),
                Some(v) => v.as_u64().filter(|&v| v > 0).ok_or("timeout-ms must be a positive number of milliseconds"),
            };
            match timeout {
                Err(e) => error("GenericError", e),
                Ok(ms) => match freeze(t, ms) {
                    Ok(_) => json!({"return": {"frozen": true, "timeout-ms": ms}}),
                    Err(e) => error("GenericError", &format!("freeze failed (thawed): {e}")),
                },
            }
        }
        "snapshot" => match &t.chain {
            None => error("GenericError", "no chain operations in this process"),
            Some(c) => match c.snapshot_command(&args) {
                Ok(v) => json!({"return": v}),
                Err(e) => error("GenericError", &e),
            },
        },
        "commit" | "query-jobs" | "job-cancel" | "job-complete" | "job-set-speed" | "job-dismiss" => match &t.chain {
            None => error("GenericError", "no chain operations in this process"),
            Some(c) => {
                let r = match name {
                    "commit" => c.commit_command(&args),
                    "query-jobs" => Ok(c.query_jobs()),
                    "job-cancel" => c.job_cancel(&args),
                    "job-complete" => c.job_complete(&args),
                    "job-set-speed" => c.job_set_speed(&args),
                    _ => c.job_dismiss(&args),
                };
                match r {
                    Ok(v) => json!({"return": v}),
                    Err(e) => error("GenericError", &e),
                }
            }
        },
        "thaw" => {
            t.hub.thaw();
            json!({"return": {}})
        }
        "set-policy" => match set_policy(&args, &t.faults) {
            Ok(s) => json!({"return": settings_json(&s)}),
            Err(e) => error("GenericError", &e),
        },
        other => error("CommandNotFound", &format!("the command {other} has not been found")),
    };
    with_id(reply, id)
}

fn with_id(mut reply: Value, id: Option<Value>) -> Value {
    if let (Some(id), Some(o)) = (id, reply.as_object_mut()) {
        o.insert("id".into(), id);
    }
    reply
}

fn set_policy(args: &Value, faults: &FaultState) -> Result<Settings, String> {
    let cur = faults.settings();
    let Some(obj) = args.as_object() else { return Err("arguments must be an object".into()) };
    for k in obj.keys() {
        if !["werror", "rerror", "retry-interval", "retry-timeout"].contains(&k.as_str()) {
            return Err(format!("unknown argument {k}"));
        }
    }
    let policy = |key: &str, default: ErrorPolicy| -> Result<ErrorPolicy, String> {
        match obj.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .and_then(ErrorPolicy::parse)
                .ok_or_else(|| format!("{key} must be one of report, ignore, enospc, stop, retry")),
        }
    };
    let ms = |key: &str| -> Result<Option<u64>, String> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("{key} must be a number of milliseconds")),
        }
    };
    let werror = policy("werror", cur.werror)?;
    let rerror = policy("rerror", cur.rerror)?;
    let retry = werror == ErrorPolicy::Retry || rerror == ErrorPolicy::Retry;
    // Retry parameters carry over while a retry policy remains.
    let interval = ms("retry-interval")?.or(retry.then_some(cur.interval.as_millis() as u64));
    let timeout = ms("retry-timeout")?.or(retry.then_some(cur.timeout.as_millis() as u64));
    let s = Settings::new(werror, rerror, interval, timeout).map_err(|e| e.to_string())?;
    faults.set_settings(s);
    Ok(s)
}

/// `thinblk ctl`: sends one command and prints the reply, or streams events.
pub fn client(path: &Path, command: Option<&str>, arguments: Option<&str>, events: bool) -> Result<(), String> {
    let conn = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("\"QMP\"") {
        return Err(format!("unexpected greeting: {}", line.trim()));
    }
    if let Some(cmd) = command {
        let args: Value = match arguments {
            Some(a) => serde_json::from_str(a).map_err(|e| format!("arguments are not JSON: {e}"))?,
            None => json!({}),
        };
        let mut w = &conn;
        writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).map_err(|e| e.to_string())?;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("connection closed before the reply".into());
            }
            let v: Value = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
            if v.get("event").is_some() {
                if events {
                    println!("{}", line.trim());
                }
                continue;
            }
            println!("{}", line.trim());
            if let Some(e) = v.get("error") {
                return Err(e.get("desc").and_then(Value::as_str).unwrap_or("error").to_string());
            }
            break;
        }
    }
    if events {
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Ok(());
            }
            println!("{}", line.trim());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        let hub = ParkHub::new(1).unwrap();
        Target { faults: FaultState::new(Settings::default(), hub.clone()), hub, thin: None, image: None, handover: None, chain: None }
    }

    #[test]
    fn commands_and_errors() {
        let t = target();
        let r = handle(r#"{"execute": "query-status", "id": 7}"#, &t);
        assert_eq!(r["return"]["werror"], "enospc");
        assert_eq!(r["return"]["rerror"], "report");
        assert_eq!(r["return"]["parked"], 0);
        assert_eq!(r["id"], 7);
        let r = handle(r#"{"execute": "set-policy", "arguments": {"werror": "retry", "retry-timeout": 5000}}"#, &t);
        assert_eq!(r["return"]["werror"], "retry");
        assert_eq!(r["return"]["retry-interval"], 1000);
        assert_eq!(r["return"]["retry-timeout"], 5000);
        let r = handle(r#"{"execute": "set-policy", "arguments": {"werror": "report"}}"#, &t);
        assert_eq!(r["return"]["werror"], "report", "retry parameters dropped with the retry policy: {r}");
        let r = handle(r#"{"execute": "set-policy", "arguments": {"retry-interval": 10}}"#, &t);
        assert!(r["error"]["desc"].as_str().unwrap().contains("only supported"), "{r}");
        let r = handle(r#"{"execute": "set-policy", "arguments": {"werror": "sometimes"}}"#, &t);
        assert!(r.get("error").is_some());
        let r = handle(r#"{"execute": "set-policy", "arguments": {"bogus": 1}}"#, &t);
        assert!(r["error"]["desc"].as_str().unwrap().contains("unknown argument"));
        assert_eq!(handle(r#"{"execute": "cont"}"#, &t)["return"], json!({}));
        assert_eq!(handle(r#"{"execute": "nope"}"#, &t)["error"]["class"], "CommandNotFound");
        assert!(handle("not json", &t).get("error").is_some());
        assert!(handle(r#"{"foo": 1}"#, &t).get("error").is_some());
        assert_eq!(handle(r#"{"execute": "query-parked"}"#, &t)["return"]["count"], 0);
    }
}
