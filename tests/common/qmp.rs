//! A small QMP client for the tests: QEMU's machine protocol (one JSON object a line) over a
//! unix socket (`-qmp unix:PATH,server=on,wait=off`). Every read has a deadline; events that
//! arrive while a command waits for its reply are kept for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read but not yet split into lines.
    pending: Vec<u8>,
    /// Events received and not yet taken, oldest first.
    pub events: VecDeque<Value>,
    next_id: u64,
    /// How long [`Qmp::execute`] waits for a reply.
    pub reply_limit: Duration,
}

impl Qmp {
    /// Connects to `path`, retrying until the socket accepts or `limit` passes, reads the
    /// greeting and leaves negotiation mode (`qmp_capabilities`).
    pub fn connect(path: &Path, limit: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("QMP socket {}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let mut q = Qmp { stream, pending: Vec::new(), events: VecDeque::new(), next_id: 0, reply_limit: Duration::from_secs(30) };
        let greeting = q.read_message(deadline.max(Instant::now() + Duration::from_secs(10)))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// Runs `command` with `args` (`Value::Null`: none); returns its `return` value, or the
    /// error's class and description.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).map_err(|e| format!("{command}: send: {e}"))?;
        let deadline = Instant::now() + self.reply_limit;
        loop {
            let v = self.read_message(deadline).map_err(|e| format!("{command}: {e}"))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            // A reply to an earlier command that gave up waiting.
            if v.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(e) = v.get("error") {
                let class = e.get("class").and_then(Value::as_str).unwrap_or("?");
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(format!("{command}: {class}: {desc}"));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits up to `limit` for the event `name` whose data satisfies `matches` (events already
    /// received count, oldest first); removes and returns it.
    pub fn wait_event_where(&mut self, name: &str, matches: impl Fn(&Value) -> bool, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        let hit = |e: &Value| e.get("event").and_then(Value::as_str) == Some(name) && matches(e.get("data").unwrap_or(&Value::Null));
        loop {
            if let Some(i) = self.events.iter().position(hit) {
                return Ok(self.events.remove(i).unwrap_or(Value::Null));
            }
            let v = self.read_message(deadline).map_err(|e| format!("waiting for event {name}: {e}"))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            }
        }
    }

    /// Waits up to `limit` for the event `name`, whatever its data.
    pub fn wait_event(&mut self, name: &str, limit: Duration) -> Result<Value, String> {
        self.wait_event_where(name, |_| true, limit)
    }

    /// Names of the events received and not taken, oldest first.
    pub fn event_names(&self) -> Vec<String> {
        self.events.iter().filter_map(|e| e.get("event").and_then(Value::as_str).map(str::to_string)).collect()
    }

    /// Reads one message, waiting until `deadline` at most.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|e| format!("bad QMP message {text:?}: {e}"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no QMP message before the deadline".into());
            }
            self.stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("QMP connection closed".into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
        }
    }
}
