//! The vhost-fs binary as a process: flags, exit codes, the API socket and signals.

use std::process::Command;
use std::time::Duration;

use testkit::daemon::{binary_path, DaemonCommand, Readiness, LISTENING_MARKER};

#[test]
fn print_capabilities_and_bad_flags() {
    let out = Command::new(binary_path("vhost-fs"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "fs");
    for args in [
        vec!["--socket-path", "/tmp/x.sock"],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--shared-dir",
            "/nonexistent",
        ],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--shared-dir",
            "/tmp",
            "--cache",
            "bogus",
        ],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--shared-dir",
            "/tmp",
            "--frobnicate",
        ],
    ] {
        let out = Command::new(binary_path("vhost-fs"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn serves_metrics_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = dir.path().join("fs.sock");
    let api = dir.path().join("api.sock");
    let mut daemon = DaemonCommand::new(binary_path("vhost-fs"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&share)
        .arg("--api-socket")
        .arg(&api)
        .args(["--queues", "3", "--tag", "myshare"])
        .readiness(Readiness::StderrContains(LISTENING_MARKER.to_owned()))
        .spawn()
        .unwrap();
    let metrics = testkit::http::get(&api, "/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    let samples = testkit::http::parse_prometheus(&metrics.text()).unwrap();
    // The high-priority queue and three request queues.
    for q in 0..4 {
        let label = format!("queue=\"{q}\"");
        assert!(
            samples.iter().any(|s| s.labels.contains(&label)),
            "queue {q} missing"
        );
    }
    assert!(metrics
        .text()
        .contains("strata_fs_frontend_connected{share=\"myshare\"} 0"));
    let share_json = testkit::http::get(&api, "/v1/share").unwrap();
    let v: serde_json::Value = serde_json::from_str(&share_json.text()).unwrap();
    assert_eq!(v["request_queues"], 3);
    let status = daemon.terminate_within(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", daemon.output());
    assert!(
        !socket.exists() && !api.exists(),
        "socket files left behind"
    );
}
