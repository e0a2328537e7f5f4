//! The command line as launchers see it: capabilities, one-line usage errors, inherited fds.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{sparse_file, Client, TestDir};

fn thinblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run thinblk")
}

#[test]
fn print_capabilities_is_the_vhost_user_json() {
    let out = thinblk(&["--print-capabilities"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim(), r#"{"type": "block", "features": ["read-only", "blk-file"]}"#);
}

#[test]
fn wrong_arguments_give_one_line_and_exit_2() {
    let dir = TestDir::new("cli-usage");
    let img = dir.path("x.raw");
    sparse_file(&img, 1 << 20);
    let img = img.to_str().unwrap();
    let sock = dir.path("s");
    let sock = sock.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--no-such-flag"],
        vec!["--socket-path", sock],
        vec!["--socket-path", sock, "--image", img],
        vec!["--image", img, "--format", "raw"],
        vec!["--socket-path", sock, "--fd", "3", "--image", img, "--format", "raw"],
        vec!["--socket-path", sock, "--image", img, "--format", "vmdk"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--queue-size", "100"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--num-queues", "0"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--logical-block-size", "1024"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--serial", "a-serial-that-is-far-too-long"],
        vec!["--fd", "99", "--image", img, "--format", "raw"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--werror", "sometimes"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--retry-interval", "500"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--rerror", "report", "--retry-timeout", "5000"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--werror", "retry", "--retry-interval", "0"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--werror", "retry", "--retry-timeout", "x"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--thin"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--chunk-mb", "64"],
        vec![
            "--socket-path", sock, "--image", img, "--format", "raw", "--thin", "--spm-inbox", img, "--spm-outbox", img,
            "--host-id", "1", "--domain-uuid", "8adbc85e-e554-4ae0-b318-8a5465fe5fe1",
            "--volume-uuid", "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f",
        ],
        vec![
            "--socket-path", sock, "--image", img, "--format", "qcow2", "--thin", "--spm-inbox", img, "--spm-outbox", img,
            "--host-id", "250", "--domain-uuid", "8adbc85e-e554-4ae0-b318-8a5465fe5fe1",
            "--volume-uuid", "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f",
        ],
        vec![
            "--socket-path", sock, "--image", img, "--format", "qcow2", "--thin", "--spm-inbox", img, "--spm-outbox", img,
            "--host-id", "1", "--domain-uuid", "not-a-uuid", "--volume-uuid", "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f",
        ],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--metrics", "9100"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--metrics", "localhost:9100"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--metrics", "unix:"],
        vec!["--socket-path", sock, "--image", img, "--format", "raw", "--metrics", "http://127.0.0.1:9100/metrics"],
        vec!["create", img],
        vec!["create", img, "--backing", "base.qcow2"],
        vec!["create", img, "16M", "--backing-format", "qcow2"],
        vec!["create", img, "--backing", "base.qcow2", "--backing-format", "vmdk"],
    ];
    for args in cases {
        let out = thinblk(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?} printed more than one line: {err}");
        assert!(err.starts_with("thinblk: "), "{args:?}: {err}");
        assert!(!Path::new(sock).exists(), "{args:?} left its socket behind");
    }
}

#[test]
fn runtime_failures_exit_1_with_a_message() {
    let dir = TestDir::new("cli-runtime");
    let sock = dir.path("s");
    let out = thinblk(&["--socket-path", sock.to_str().unwrap(), "--image", "/nonexistent/disk", "--format", "raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk"));
    assert!(!sock.exists(), "a daemon that cannot serve must not leave a socket");
}

#[test]
fn metrics_address_in_use_exits_1_before_the_socket_appears() {
    let dir = TestDir::new("cli-metrics-busy");
    let img = dir.path("x.raw");
    sparse_file(&img, 1 << 20);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let sock = dir.path("s");
    let out = thinblk(&["--socket-path", sock.to_str().unwrap(), "--image", img.to_str().unwrap(), "--format", "raw", "--metrics", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics endpoint") && err.contains(&addr), "{err}");
    assert!(!sock.exists(), "a daemon that cannot serve metrics must not leave a socket");
}

#[test]
fn ctl_reports_a_missing_socket_and_bad_arguments() {
    let dir = TestDir::new("cli-ctl");
    let out = thinblk(&["ctl", dir.path("none.sock").to_str().unwrap(), "query-status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.sock"));
}

#[test]
fn serves_on_an_inherited_listening_fd() {
    let dir = TestDir::new("cli-fd");
    let img = dir.path("disk.raw");
    sparse_file(&img, 4 << 20);
    let sock = dir.path("inherited.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinblk"));
    cmd.args(["--fd", "3", "--image", img.to_str().unwrap(), "--format", "raw"]).stdin(Stdio::null());
    // SAFETY: between fork and exec we only call async-signal-safe dup2 and fcntl.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec, so clear it explicitly.
            if (fd != 3 && libc::dup2(fd, 3) < 0) || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn");
    let mut daemon = common::Daemon { child, socket: sock.clone() };
    drop(listener);
    let mut c = Client::connect(&sock, 1).expect("connect through the inherited socket");
    assert_eq!(c.write(0, 0, &[9u8; 4096]), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![9u8; 4096]);
    drop(c);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
}
