//! The health dashboard in a real browser: headless Chromium (Debian's `chromium`) loads
//! `/dashboard` from the API's TLS listener with a viewer's token while libblkio clients
//! keep two disks busy, and every chart must have drawn data; without a token the page
//! shows the refusal and no data. Then the trend kept in `history-file` outlives a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testkit::blkio_client::Client;
use testkit::daemon::{run_with_timeout, Daemon, DaemonCommand};
use testkit::tools::qemu_img_ok;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const TOKEN: &str = "5f0c1a7e2b9d4c3e8a6f1b2d3c4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "this test needs Chromium (Debian's chromium package; scripts/setup.sh installs it)",
        )
}

/// Chromium's flags for a headless run on a host without a display or internet.
fn browser(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--ignore-certificate-errors",
        "--hide-scrollbars",
        // Long enough for the page's fetches and a few of its refreshes.
        "--virtual-time-budget=6000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The value of `attr` in the start tag of the element whose id is `id`.
fn attribute(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let from = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(tag[from..from + tag[from..].find('"')?].to_string())
}

/// Reads and writes 4 KiB blocks at random in the disk's first 8 MiB (so a cache has hits)
/// until `stop`, with now and then a read past the end (an out-of-range error).
fn keep_busy(socket: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = Client::open(&socket, 1).expect("libblkio connects");
        let q = c.queue(0);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut ops = 0;
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % 2048) * 4096;
            if ops % 500 == 499 {
                assert!(q.read(SIZE, 4096).is_err(), "a read past the end succeeded");
            } else if x.is_multiple_of(4) {
                q.write(offset, &[ops as u8; 4096]).unwrap();
            } else {
                q.read(offset, 4096).unwrap();
            }
            ops += 1;
        }
        ops
    })
}

fn start(config: &Path) -> Daemon {
    DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--config")
        .arg(config)
        .spawn()
        .unwrap_or_else(|e| panic!("starting vhost-blk: {e}"))
}

#[test]
fn the_dashboard_shows_a_busy_daemon_in_a_browser_and_its_trend_outlives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        dir.join("vm.qcow2").to_str().unwrap(),
        "64M",
    ]);
    for f in ["plain.img", "capacity.img"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(SIZE)
            .unwrap();
    }
    let hash: String = daemon_support::access::token_hash(TOKEN)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let d = dir.display();
    let config = dir.join("vhost-blk.toml");
    std::fs::write(
        &config,
        format!(
            "api-socket = \"{d}/api.sock\"\nhistory-file = \"{d}/history.jsonl\"\n\
             history-sample-seconds = 1\nhistory-trend-seconds = 2\nhistory-retention-days = 1\n\n\
             [api-tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [[token]]\nname = \"wallboard\"\nsha256 = \"{hash}\"\nrole = \"viewer\"\n\n\
             [[disk]]\nid = \"idle\"\nsocket = \"{d}/idle.sock\"\ndisk = \"path=null,size=1M\"\n\
             [[disk]]\nid = \"plain\"\nsocket = \"{d}/plain.sock\"\ndisk = \"path={d}/plain.img\"\n\
             [[disk]]\nid = \"tiered\"\nsocket = \"{d}/tiered.sock\"\n\
             disk = \"path={d}/capacity.img,cache={d}/cache.img,cache-size=16M\"\n\
             [[disk]]\nid = \"vm\"\nsocket = \"{d}/vm.sock\"\ndisk = \"path={d}/vm.qcow2,format=qcow2\"\n"
        ),
    )
    .unwrap();
    let mut daemon = start(&config);
    let out = daemon.output();
    let port: u16 = out
        .lines()
        .find_map(|l| l.split("API (TLS) listening on 127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no TLS port in:\n{out}"));

    let load_start = std::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ["plain", "tiered"]
        .iter()
        .map(|id| keep_busy(dir.join(format!("{id}.sock")), stop.clone()))
        .collect();
    // A few samples and trend points under load, and a snapshot of the qcow2 disk.
    std::thread::sleep(Duration::from_secs(2));
    let out = Command::new(testkit::daemon::binary_path("strata"))
        .arg("--api")
        .arg(dir.join("api.sock"))
        .args(["snapshot", "create", "vm", "nightly"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));

    let page = format!("https://127.0.0.1:{port}/dashboard?disk=tiered");
    let dump = |url: &str| {
        let out = run_with_timeout(
            browser(&dir.join("profile")).arg("--dump-dom").arg(url),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("chromium: {e}"));
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = dump(&format!("{page}#token={TOKEN}"));
    assert_eq!(
        attribute(&dom, "status", "class").as_deref(),
        Some(""),
        "the page reports an error:\n{dom}"
    );
    // Each chart drew the series that show the load: (chart, series).
    for (chart, series) in [
        ("usage", "used on host"),
        ("iops", "reads"),
        ("iops", "writes"),
        ("latency", "p99"),
        ("errors", "out_of_range"),
        ("cache", "hits"),
    ] {
        let drawn = attribute(&dom, &format!("chart-{chart}"), "data-series")
            .unwrap_or_else(|| panic!("chart {chart} was not drawn:\n{dom}"));
        let points: usize = drawn
            .split(';')
            .find_map(|s| s.strip_prefix(&format!("{series}=")))
            .unwrap_or_else(|| panic!("chart {chart} has no series {series}: {drawn}"))
            .parse()
            .unwrap();
        assert!(
            points > 0,
            "chart {chart}, series {series} has no data:\n{dom}"
        );
    }
    // Legend keys carry their line's colour (set through the CSS object model, which the
    // page's content security policy allows; a style attribute would be refused).
    assert!(dom.contains("--c: #"), "legend keys without colour:\n{dom}");
    // Snapshot activity: the qcow2 disk's row counts its snapshot and says when.
    assert_eq!(
        attribute(&dom, "disk-vm", "data-snapshots").as_deref(),
        Some("1"),
        "{dom}"
    );
    assert!(
        dom.contains(" s ago (paused "),
        "no last snapshot shown:\n{dom}"
    );
    for id in ["idle", "plain", "tiered", "vm"] {
        assert!(
            dom.contains(&format!("data-disk=\"{id}\"")),
            "disk {id} is not in the table:\n{dom}"
        );
    }
    // A look for people: the screenshot is kept with the test's build.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_with_timeout(
        browser(&dir.join("profile"))
            .arg("--window-size=1280,1400")
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("{page}#token={TOKEN}")),
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        shot.display()
    );
    eprintln!("dashboard screenshot: {}", shot.display());

    // Without a token (in a fresh profile: the page keeps a token per tab only, but be
    // sure) the page shows the refusal and no data.
    let dom = run_with_timeout(
        browser(&dir.join("profile2")).arg("--dump-dom").arg(&page),
        Duration::from_secs(120),
    )
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(
        attribute(&dom, "status", "class").as_deref(),
        Some("error"),
        "{dom}"
    );
    assert!(dom.contains("401"), "{dom}");
    assert!(
        !dom.contains("data-disk="),
        "disks shown without a token:\n{dom}"
    );

    grafana_queries_name_served_metrics(&dir.join("api.sock"));
    // What the page drew is what the API says: the busy disks' refused reads were counted.
    for id in ["plain", "tiered"] {
        let h =
            testkit::http::get(dir.join("api.sock"), &format!("/v1/history?disk={id}")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&h.text()).unwrap();
        let out_of_range: u64 = v["disks"][0]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["errors"]["out_of_range"].as_u64().unwrap())
            .sum();
        assert!(out_of_range > 0, "{id}: {v}");
    }

    stop.store(true, Ordering::Relaxed);
    for l in load {
        assert!(l.join().unwrap() > 100, "the load did not run");
    }
    // Hundreds of refused reads, a handful of log lines: each queue's first ten, then one
    // per 10 s.
    let per_queue = 10 + load_start.elapsed().as_secs() as usize / 10 + 1;
    let refused = daemon.output().matches("request refused").count();
    assert!(
        refused <= 2 * per_queue,
        "{refused} lines for refused requests"
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
    let before_restart = unix_now();
    let mut daemon = start(&config);
    let h = testkit::http::get(dir.join("api.sock"), "/v1/history?disk=plain").unwrap();
    assert_eq!(h.status, 200, "{}", h.text());
    let v: serde_json::Value = serde_json::from_str(&h.text()).unwrap();
    let trend = v["disks"][0]["trend"].as_array().unwrap();
    let kept_reads: u64 = trend
        .iter()
        .filter(|p| p["t"].as_u64().unwrap() <= before_restart)
        .map(|p| p["reads"].as_u64().unwrap())
        .sum();
    assert!(
        kept_reads > 100,
        "the trend did not outlive the restart: {v}"
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
}

/// Every metric the Grafana dashboard (docs/grafana-dashboard.json) queries is one the
/// daemon serves (here: with a plain disk and a tiered one, both busy).
fn grafana_queries_name_served_metrics(api: &Path) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana-dashboard.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let metrics = testkit::http::get(api, "/metrics").unwrap().text();
    let panels = doc["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("strata_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    metrics.lines().any(|l| l.starts_with(&format!("{name}{{"))),
                    "panel {:?} queries {name}, which /metrics does not serve",
                    panel["title"]
                );
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_history_file_that_cannot_be_written_does_not_stop_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    let config = tmp.path().join("vhost-blk.toml");
    std::fs::write(
        &config,
        format!(
            "api-socket = \"{d}/api.sock\"\nhistory-file = \"{d}/missing/history.jsonl\"\n\
             history-sample-seconds = 1\nhistory-trend-seconds = 2\nhistory-retention-days = 1\n\n\
             [[disk]]\nid = \"a\"\nsocket = \"{d}/a.sock\"\ndisk = \"path=null,size=1M\"\n"
        ),
    )
    .unwrap();
    let mut daemon = start(&config);
    // A trend point comes every 2 s; allow a loaded machine a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let v = loop {
        let h = testkit::http::get(tmp.path().join("api.sock"), "/v1/history?disk=a").unwrap();
        assert_eq!(h.status, 200, "{}", h.text());
        let v: serde_json::Value = serde_json::from_str(&h.text()).unwrap();
        if !v["disks"][0]["trend"].as_array().unwrap().is_empty()
            || std::time::Instant::now() > deadline
        {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !v["disks"][0]["trend"].as_array().unwrap().is_empty(),
        "no trend point in 20 s: {v}"
    );
    assert!(
        daemon.output().contains("missing/history.jsonl"),
        "the failure was not logged:\n{}",
        daemon.output()
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
}
