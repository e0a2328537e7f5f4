//! The metrics endpoint end to end: a daemon with `--metrics`, a blkio workload of known
//! size, and every scrape parsed by prometheus_client's parsers (Prometheus text and
//! OpenMetrics). Thin growth and parked IO are checked in tests/thin.rs and tests/faults.rs.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::metrics::{assert_documented, documented, free_port, get, metric_names, parse, request, scrape, Samples};
use common::{check_end_offset, own_threads, stop_clean as stop, Client, Daemon, Rng, TestDir};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn qcow2(path: &Path, size: u64) {
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg(size.to_string()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The same numbers from the Prometheus text and the OpenMetrics answer.
fn both_formats(addr: &str) -> (Samples, Samples) {
    let prom = scrape(addr);
    let a = get(addr, "/metrics", Some("application/openmetrics-text; version=1.0.0"));
    assert_eq!(a.status, 200);
    assert!(a.content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{}", a.content_type);
    assert!(a.body.ends_with("# EOF\n"));
    (prom, parse(&a.body, true))
}

#[test]
fn counters_equal_a_known_workload_and_allocation_matches_check() {
    let dir = TestDir::new("metrics-workload");
    let image = dir.path("disk.qcow2");
    let capacity = 64 * MIB;
    qcow2(&image, capacity);
    let metrics = dir.path("metrics.sock");
    let addr = format!("unix:{}", metrics.display());
    let d = Daemon::start(
        &dir.path("vhost.sock"),
        &["--image", image.to_str().unwrap(), "--format", "qcow2", "--num-queues", "2", "--serial", "disk-A", "--metrics", &addr],
    );
    let before = scrape(&addr);
    assert_eq!(before.sum("thinblk_requests_total", &[]), 0.0, "counters start at zero");
    assert_eq!(before.one("thinblk_capacity_bytes", &[("disk", "disk-A")]), capacity as f64);

    let mut c = Client::connect(&d.socket, 2).unwrap();
    let data = vec![0x5au8; 64 * KIB as usize];
    for i in 0..40u64 {
        assert_eq!(c.write(0, i * 64 * KIB, &data), 0);
    }
    for i in 0..30u64 {
        c.read(1, i * 4 * KIB, 4 * KIB as usize).expect("read");
    }
    for _ in 0..3 {
        assert_eq!(c.flush(0), 0);
    }
    assert_eq!(c.discard(1, 8 * MIB, MIB), 0);
    assert_eq!(c.discard(1, 10 * MIB, MIB), 0);
    assert_eq!(c.write_zeroes(0, 16 * MIB, 512 * KIB, false), 0);
    // A read past the end: rejected by the device as invalid.
    let past = c.read(1, capacity, 4 * KIB as usize);
    assert!(past.is_err(), "a read past the end succeeded");

    let (prom, om) = both_formats(&addr);
    for (s, format) in [(&prom, "prometheus"), (&om, "openmetrics")] {
        let req = |q: &str, op: &str| s.one("thinblk_requests_total", &[("disk", "disk-A"), ("queue", q), ("op", op)]);
        let bytes = |q: &str, op: &str| s.one("thinblk_request_bytes_total", &[("disk", "disk-A"), ("queue", q), ("op", op)]);
        assert_eq!(req("0", "write"), 40.0, "{format}");
        assert_eq!(bytes("0", "write"), (40 * 64 * KIB) as f64, "{format}");
        assert_eq!(req("1", "read"), 30.0, "{format}");
        assert_eq!(bytes("1", "read"), (30 * 4 * KIB) as f64, "{format}");
        assert_eq!(req("0", "flush"), 3.0, "{format}");
        assert_eq!(req("1", "discard"), 2.0, "{format}");
        assert_eq!(bytes("1", "discard"), (2 * MIB) as f64, "{format}");
        assert_eq!(req("0", "write_zeroes"), 1.0, "{format}");
        assert_eq!(bytes("0", "write_zeroes"), (512 * KIB) as f64, "{format}");
        assert_eq!(req("1", "invalid"), 1.0, "{format}");
        let invalid = [("disk", "disk-A"), ("queue", "1"), ("op", "invalid"), ("class", "invalid")];
        assert_eq!(s.one("thinblk_request_errors_total", &invalid), 1.0, "{format}");
        assert_eq!(s.sum("thinblk_request_errors_total", &[]), 1.0, "no other error: {format}");
        // Nothing else was issued (GET_ID included).
        assert_eq!(s.sum("thinblk_requests_total", &[]), 40.0 + 30.0 + 3.0 + 2.0 + 1.0 + 1.0, "{format}");
        // Every completed request is in the latency histogram.
        let hist = |op: &str| s.sum("thinblk_request_duration_seconds_count", &[("op", op)]);
        assert_eq!(hist("write"), 40.0);
        assert_eq!(hist("read"), 30.0);
        let inf = s.sum("thinblk_request_duration_seconds_bucket", &[("op", "write"), ("le", "+Inf")]);
        assert_eq!(inf, 40.0, "{format}");
        assert!(s.sum("thinblk_request_duration_seconds_sum", &[("op", "write")]) > 0.0);
        assert_eq!(s.sum("thinblk_inflight_requests", &[]), 0.0);
        assert_eq!(s.sum("thinblk_parked_requests", &[]), 0.0);
        assert!(s.sum("thinblk_l2_cache_hits_total", &[]) > 0.0, "{format}: the reads and writes hit the L2 cache");
        assert!(s.one("thinblk_uptime_seconds", &[]) > 0.0);
        assert_eq!(s.one("thinblk_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    }
    // Types as an operator's tooling sees them.
    let kind = |name: &str| prom.0.iter().find(|s| s.family == name).map(|s| s.kind.clone()).unwrap_or_default();
    assert_eq!(kind("thinblk_requests"), "counter");
    assert_eq!(kind("thinblk_request_duration_seconds"), "histogram");
    assert_eq!(kind("thinblk_allocation_bytes"), "gauge");
    let om_kind = |name: &str| om.0.iter().find(|s| s.family == name).map(|s| s.kind.clone()).unwrap_or_default();
    assert_eq!(om_kind("thinblk_requests"), "counter");
    assert_eq!(om_kind("thinblk_request_duration_seconds"), "histogram");
    // Latency buckets run from 10 µs to 10 s.
    let les: Vec<f64> = prom
        .all("thinblk_request_duration_seconds_bucket", &[("queue", "0"), ("op", "write")])
        .iter()
        .map(|s| s.labels["le"].parse::<f64>().unwrap())
        .collect();
    assert_eq!(les.first(), Some(&1e-5));
    assert_eq!(les.len(), 20, "19 bounds and +Inf: {les:?}");
    assert_eq!(les[18], 10.0);
    assert!(les[19].is_infinite());

    assert_documented(&prom);
    let allocation = prom.one("thinblk_allocation_bytes", &[("disk", "disk-A")]) as u64;
    drop(c);
    stop(d);
    assert_eq!(allocation, check_end_offset(&image), "allocation_bytes is the image end offset thinblk check reports");
    assert!(!metrics.exists(), "the metrics socket is removed at exit");
}

#[test]
fn errors_and_wrong_requests_get_http_answers() {
    let dir = TestDir::new("metrics-http");
    let image = dir.path("disk.raw");
    common::sparse_file(&image, 16 * MIB);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&dir.path("vhost.sock"), &["--image", image.to_str().unwrap(), "--format", "raw", "--metrics", &addr]);
    assert_eq!(get(&addr, "/", None).status, 404);
    assert_eq!(get(&addr, "/metricsx", None).status, 404);
    assert_eq!(request(&addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status, 405);
    assert_eq!(request(&addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").status, 405);
    assert_eq!(request(&addr, b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n").status, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(request(&addr, huge.as_bytes()).status, 431);
    // A raw image: no allocation, cache or thin series; the data-path ones are there.
    let s = scrape(&addr);
    assert!(s.all("thinblk_allocation_bytes", &[]).is_empty());
    assert!(s.all("thinblk_volume_physical_bytes", &[]).is_empty());
    assert_eq!(s.one("thinblk_capacity_bytes", &[]), (16 * MIB) as f64);
    assert_eq!(s.all("thinblk_requests_total", &[("op", "read")]).len(), 1, "one queue by default");
    stop(d);
}

fn status_field(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn hundred_scrapers_and_a_slowloris_do_not_stall_io_or_grow_memory() {
    let dir = TestDir::new("metrics-storm");
    let image = dir.path("disk.qcow2");
    qcow2(&image, 256 * MIB);
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(
        &dir.path("vhost.sock"),
        &["--image", image.to_str().unwrap(), "--format", "qcow2", "--num-queues", "2", "--metrics", &addr],
    );
    let pid = d.child.id();
    // IO runs throughout on its own connection; every request's latency is kept.
    let stop_io = Arc::new(AtomicBool::new(false));
    let ios = Arc::new(AtomicU64::new(0));
    let io = {
        let (socket, stop_io, ios) = (d.socket.clone(), stop_io.clone(), ios.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 2).unwrap();
            let mut rng = Rng(7);
            let buf = vec![0xa5u8; 4096];
            let mut worst = Duration::ZERO;
            while !stop_io.load(Ordering::SeqCst) {
                let off = rng.below(256 * MIB / 4096) * 4096;
                let t = Instant::now();
                if rng.below(2) == 0 {
                    assert_eq!(c.write(0, off, &buf), 0);
                } else {
                    c.read(1, off, 4096).expect("read");
                }
                worst = worst.max(t.elapsed());
                ios.fetch_add(1, Ordering::SeqCst);
            }
            worst
        })
    };
    // Warm up, then take the baseline.
    for _ in 0..20 {
        scrape(&addr);
    }
    let rss0 = status_field(pid, "VmRSS:");
    let threads0 = own_threads(pid);
    let ios0 = ios.load(Ordering::SeqCst);

    // The slowloris: connections that send their request one byte at a time, forever.
    let stop_slow = Arc::new(AtomicBool::new(false));
    let slow = {
        let (addr, stop_slow) = (addr.clone(), stop_slow.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut conns: Vec<std::net::TcpStream> = Vec::new();
            let mut opened = 0u64;
            while !stop_slow.load(Ordering::SeqCst) {
                while conns.len() < 40 {
                    if let Ok(s) = std::net::TcpStream::connect(&addr) {
                        conns.push(s);
                        opened += 1;
                    }
                }
                conns.retain_mut(|s| s.write_all(b"G").is_ok());
                std::thread::sleep(Duration::from_millis(100));
            }
            opened
        })
    };
    // 100 scrapers, 10 scrapes each; a scrape whose connection was evicted is retried.
    let deadline = Instant::now() + Duration::from_secs(120);
    let scrapers: Vec<_> = (0..100)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                let mut failed = 0;
                while ok < 10 {
                    assert!(Instant::now() < deadline, "scraper {i} starved: {ok} answers, {failed} failures");
                    let r = std::panic::catch_unwind(|| get(&addr, "/metrics", None));
                    match r {
                        Ok(a) if a.status == 200 && a.body.contains("thinblk_requests_total") => ok += 1,
                        _ => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();
    let failed: u32 = scrapers.into_iter().map(|h| h.join().expect("scraper")).sum();
    stop_slow.store(true, Ordering::SeqCst);
    let opened = slow.join().unwrap();
    let rss1 = status_field(pid, "VmRSS:");
    let threads1 = own_threads(pid);
    let ios1 = ios.load(Ordering::SeqCst);
    // One scrape at the end is still parsed cleanly.
    let last = scrape(&addr);
    stop_io.store(true, Ordering::SeqCst);
    let worst = io.join().expect("IO failed during the storm");
    eprintln!(
        "storm: {} IOs during it, worst IO latency {worst:?}, {failed} scrape retries, {opened} slowloris connections, \
         RSS {rss0} -> {rss1} kB, threads {threads0} -> {threads1}",
        ios1 - ios0
    );
    assert!(ios1 - ios0 >= 100, "IO stalled during the storm ({} requests)", ios1 - ios0);
    assert!(worst < Duration::from_secs(2), "an IO took {worst:?} during the storm");
    assert_eq!(threads1, threads0, "no thread per connection");
    assert!(rss1 < rss0 + 32 * 1024, "RSS grew from {rss0} kB to {rss1} kB");
    assert!(last.sum("thinblk_requests_total", &[]) >= (ios1 - ios0) as f64);
    stop(d);
}

#[test]
fn dashboard_and_alerts_use_documented_series() {
    let doc = documented();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().map(|p| p.len() >= 10).unwrap_or(false));
    let alerts = std::fs::read_to_string(root.join("alerts.yml")).unwrap();
    for required in ["ThinblkVolumeNearFull", "ThinblkExtensionsFailing", "ThinblkIoParked"] {
        assert!(alerts.contains(&format!("alert: {required}")), "{required} missing from alerts.yml");
    }
    assert!(alerts.contains("thinblk_parked_oldest_seconds > 30"));
    for (file, text) in [("grafana-dashboard.json", &dashboard), ("alerts.yml", &alerts)] {
        let names = metric_names(text);
        assert!(!names.is_empty());
        for n in names {
            let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(&n);
            assert!(doc.contains(&n) || doc.contains(base), "{file} uses {n}, which docs/metrics.md does not document");
        }
    }
}

/// `promtool` (Prometheus's own checker) accepts a live scrape and the alert rules.
#[test]
fn promtool_accepts_a_live_scrape_and_the_alert_rules() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = TestDir::new("metrics-promtool");
    let image = dir.path("disk.qcow2");
    qcow2(&image, 16 * MIB);
    let addr = format!("unix:{}", dir.path("metrics.sock").display());
    let d = Daemon::start(&dir.path("vhost.sock"), &["--image", image.to_str().unwrap(), "--format", "qcow2", "--metrics", &addr]);
    let mut c = Client::connect(&d.socket, 1).unwrap();
    assert_eq!(c.write(0, 0, &[1u8; 4096]), 0);
    c.read(0, 0, 4096).expect("read");
    drop(c);
    let text = common::metrics::get(&addr, "/metrics", None).body;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus: .ci/run does)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(out.status.success(), "promtool check metrics: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/alerts.yml");
    let out = Command::new("promtool").args(["check", "rules"]).arg(&rules).output().expect("promtool");
    assert!(out.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    common::stop_clean(d);
}
