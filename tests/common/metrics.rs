//! Scraping the metrics endpoint and parsing the answer with a real parser: Python's
//! `prometheus_client` (Debian's python3-prometheus-client, installed by .ci/run).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One HTTP answer.
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Sends `GET path` (with `accept`, if any) to `addr` ("unix:PATH" or "HOST:PORT").
pub fn get(addr: &str, path: &str, accept: Option<&str>) -> Answer {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: thinblk\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    request(addr, req.as_bytes())
}

/// Sends raw bytes and reads the whole answer (the server closes after one).
pub fn request(addr: &str, raw: &[u8]) -> Answer {
    let mut out = Vec::new();
    if let Some(path) = addr.strip_prefix("unix:") {
        let mut s = UnixStream::connect(path).expect("connect to the metrics socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(raw).unwrap();
        s.read_to_end(&mut out).expect("read the answer");
    } else {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(raw).unwrap();
        s.read_to_end(&mut out).expect("read the answer");
    }
    let text = String::from_utf8(out).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete HTTP answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    Answer { status, content_type, body: body.to_string() }
}

/// A free TCP port on 127.0.0.1 (free when asked; the daemon binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One parsed sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub family: String,
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug)]
pub struct Samples(pub Vec<Sample>);

const PARSER: &str = r#"
import json, sys
text = sys.stdin.read()
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses `text` with prometheus_client's parser for the Prometheus text format, or its
/// OpenMetrics parser; panics if the parser rejects it.
pub fn parse(text: &str, openmetrics: bool) -> Samples {
    let python = std::env::var("THINBLK_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut child = Command::new(python)
        .args(["-c", PARSER, if openmetrics { "openmetrics" } else { "prometheus" }])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 (apt-get install python3-prometheus-client)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser rejected the metrics: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap().to_string(),
            kind: s["type"].as_str().unwrap().to_string(),
            name: s["name"].as_str().unwrap().to_string(),
            labels: s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect();
    Samples(samples)
}

/// Scrapes `addr` in the Prometheus text format and parses it.
pub fn scrape(addr: &str) -> Samples {
    let a = get(addr, "/metrics", None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.content_type.starts_with("text/plain; version=0.0.4"), "{}", a.content_type);
    parse(&a.body, false)
}

impl Samples {
    /// Samples named `name` whose labels include all of `labels`.
    pub fn all(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(|x| x == v).unwrap_or(false)))
            .collect()
    }

    /// The sum of those samples (panics if there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.all(name, labels);
        assert!(!found.is_empty(), "no sample {name} {labels:?}");
        found.iter().map(|s| s.value).sum()
    }

    /// The one sample's value (panics unless there is exactly one).
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.all(name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }
}

/// Every `thinblk_…` name in `text`.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("thinblk_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The series names docs/metrics.md documents.
pub fn documented() -> std::collections::BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    metric_names(&std::fs::read_to_string(path).expect("docs/metrics.md"))
}

/// Panics unless every family in `s` is in the metrics reference.
pub fn assert_documented(s: &Samples) {
    let doc = documented();
    for sample in &s.0 {
        let f = &sample.family;
        assert!(doc.contains(f) || doc.contains(&format!("{f}_total")), "{f} is not in docs/metrics.md");
    }
}
