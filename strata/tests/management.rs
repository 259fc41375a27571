//! The management plane end to end: a vhost-blk daemon from a config file, driven by the
//! `strata` client as different users, with libblkio as the frontend.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::access::Role;
use testkit::blkio_client::{Client, ClientOptions, SlotOp, Target};
use testkit::daemon::{binary_path, Daemon, DaemonCommand};
use vhost_blk::api::ROUTES;

/// Users the tests call as (no passwd entries needed), all in the sockets' group.
const VIEWER: u32 = 60001;
const OPERATOR: u32 = 60002;
const ADMIN: u32 = 60003;
const NOBODY_ELSE: u32 = 60004;
const GROUP: u32 = 65534;

struct Fixture {
    dir: tempfile::TempDir,
    daemon: Option<Daemon>,
}

impl Fixture {
    fn new(disks: &str) -> Fixture {
        Fixture::with("", disks)
    }

    /// `top`: more daemon-wide keys.
    fn with(top: &str, disks: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // The other users must reach the sockets.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        let config = format!(
            "api-socket = \"{d}/api.sock\"\nsocket-group = \"{GROUP}\"\naudit-log = \"{d}/audit/audit.log\"\n\
             operator-image-dirs = [\"{d}/images\"]\noperator-socket-dirs = [\"{d}\"]\n{top}\n\n\
             [[access]]\nuid = {VIEWER}\nrole = \"viewer\"\n\
             [[access]]\nuid = {OPERATOR}\nrole = \"operator\"\n\
             [[access]]\nuid = {ADMIN}\nrole = \"admin\"\n\
             [[access]]\nuid = 0\nrole = \"admin\"\n\n{disks}"
        );
        std::fs::write(dir.path().join("vhost-blk.toml"), config).unwrap();
        let mut f = Fixture { dir, daemon: None };
        f.start();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&mut self) {
        self.daemon = Some(
            DaemonCommand::vhost_blk()
                .unwrap_or_else(|e| panic!("{e}"))
                .arg("--config")
                .arg(self.path("vhost-blk.toml"))
                .spawn()
                .unwrap_or_else(|e| panic!("starting vhost-blk: {e}")),
        );
    }

    fn stop(&mut self) {
        let mut d = self.daemon.take().unwrap();
        let status = d.terminate().unwrap();
        assert!(status.success(), "{}", d.output());
    }

    /// `strata --api ... args` as `uid`: (exit code, stdout, stderr).
    fn strata_as(&self, uid: u32, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(binary_path("strata"));
        cmd.arg("--api").arg(self.path("api.sock")).args(args);
        if uid != 0 {
            cmd.uid(uid).gid(GROUP);
        }
        let out = cmd.output().expect("running strata");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn strata(&self, args: &[&str]) -> String {
        let (code, out, err) = self.strata_as(0, args);
        assert_eq!(code, 0, "strata {args:?}: {err}");
        out
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit/audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn null_disk(id: &str, dir: &Path) -> String {
    format!(
        "[[disk]]\nid = \"{id}\"\nsocket = \"{}/{id}.sock\"\ndisk = \"path=null,size=1M\"\n",
        dir.display()
    )
}

#[test]
fn disks_come_and_go_at_run_time_and_the_set_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fixture::new(&null_disk("a", tmp.path()));
    let image = f.path("b.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let b_sock = f.path("b.sock");
    let spec = format!("path={}", image.display());
    let out = f.strata(&[
        "disk",
        "add",
        "b",
        "--socket",
        b_sock.to_str().unwrap(),
        "--disk",
        &spec,
    ]);
    assert!(out.contains("added disk b (4.0 MiB)"), "{out}");

    // Its socket serves at once.
    // A frontend cut off by the removal below notices only when its request times out.
    let opts = ClientOptions::default()
        .queues(1)
        .io_timeout(Duration::from_secs(2));
    let mut client = Client::open_with(Target::VhostUser(&b_sock), &opts).unwrap();
    assert_eq!(client.capacity(), 4 << 20);
    client.queue(0).write(8192, &[0x5a; 4096]).unwrap();
    assert_eq!(client.queue(0).read(8192, 4096).unwrap(), vec![0x5a; 4096]);

    let list = f.strata(&["disk", "list"]);
    let b_row = list
        .lines()
        .find(|l| l.starts_with("b "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(b_row.contains("connected"), "{list}");

    // Its image is this daemon's: another disk of it is refused the image (an admin
    // too), which is not a malformed request but a conflict.
    let (code, _, err) = f.strata_as(
        ADMIN,
        &[
            "disk",
            "add",
            "b2",
            "--socket",
            f.path("b2.sock").to_str().unwrap(),
            "--disk",
            &spec,
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("409") && err.contains("in use"), "{err}");

    // In use: refused without force; force is the admin's.
    let (code, _, err) = f.strata_as(OPERATOR, &["disk", "remove", "b"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("frontend connected"),
        "{err}"
    );
    let (code, _, err) = f.strata_as(OPERATOR, &["disk", "remove", "b", "--force"]);
    assert_eq!(code, 1);
    assert!(err.contains("403") && err.contains("admin"), "{err}");
    let (code, out, err) = f.strata_as(ADMIN, &["disk", "remove", "b", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed disk b"), "{out}");
    // The frontend was cut off; what it wrote is in the image (flushed on the way out,
    // which the power-cut tests check elsewhere; here only that nothing was lost).
    assert!(client.queue(0).read(0, 512).is_err());
    assert_eq!(
        &std::fs::read(&image).unwrap()[8192..12288],
        &[0x5a; 4096][..]
    );
    assert!(!b_sock.exists());

    // A disk without a frontend goes with an operator's word.
    let c_sock = f.path("c.sock");
    f.strata(&[
        "disk",
        "add",
        "c",
        "--socket",
        c_sock.to_str().unwrap(),
        "--disk",
        "path=null,size=2M",
        "--queues",
        "2",
    ]);
    f.strata(&[
        "disk",
        "add",
        "d",
        "--socket",
        f.path("d.sock").to_str().unwrap(),
        "--disk",
        "path=null,size=3M",
    ]);
    let (code, _, err) = f.strata_as(OPERATOR, &["disk", "remove", "d"]);
    assert_eq!(code, 0, "{err}");

    // Restarted from its config, the daemon serves what it served.
    f.stop();
    f.start();
    let json: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "list"])).unwrap();
    let ids: Vec<&str> = json["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "c"]);
    let c: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "c"])).unwrap();
    assert_eq!(c["queues"], 2);
    assert_eq!(Client::open(&c_sock, 1).unwrap().capacity(), 2 << 20);
}

#[test]
fn bad_requests_get_a_message_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture::new(&null_disk("a", tmp.path()));
    let a_sock = tmp.path().join("a.sock");
    for (args, status, needle) in [
        (
            vec![
                "disk",
                "add",
                "a",
                "--socket",
                "/tmp/x.sock",
                "--disk",
                "path=null,size=1M",
            ],
            "409",
            "exists",
        ),
        (
            vec![
                "disk",
                "add",
                "e",
                "--socket",
                a_sock.to_str().unwrap(),
                "--disk",
                "path=null,size=1M",
            ],
            "409",
            "socket",
        ),
        (
            vec![
                "disk",
                "add",
                "e",
                "--socket",
                "/tmp/e.sock",
                "--disk",
                "path=/no/such/file",
            ],
            "400",
            "/no/such/file",
        ),
        (
            vec![
                "disk",
                "add",
                "e/f",
                "--socket",
                "/tmp/e.sock",
                "--disk",
                "path=null,size=1M",
            ],
            "400",
            "e/f",
        ),
        (
            vec![
                "disk",
                "add",
                "e",
                "--socket",
                "/tmp/e.sock",
                "--disk",
                "path=null,size=1M",
                "--queue-size",
                "3",
            ],
            "400",
            "queue-size",
        ),
        (vec!["disk", "remove", "zz"], "404", "zz"),
        (vec!["disk", "show", "zz"], "404", "zz"),
        (
            vec!["raw", "POST", "/v1/disks", "--data", "{\"id\": 5}"],
            "422",
            "id",
        ),
        (vec!["raw", "PUT", "/v1/disks"], "405", "PUT"),
        (vec!["raw", "GET", "/v2"], "404", "/v2"),
    ] {
        let (code, _, err) = f.strata_as(0, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains(status) && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "list"])).unwrap();
    assert_eq!(json["disks"].as_array().unwrap().len(), 1);
    let config = std::fs::read_to_string(f.path("vhost-blk.toml")).unwrap();
    assert_eq!(config.matches("[[disk]]").count(), 1, "{config}");
}

#[test]
fn every_role_against_every_operation_and_every_denial_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture::new(&null_disk("a", tmp.path()));
    let users = [
        (VIEWER, Some(Role::Viewer)),
        (OPERATOR, Some(Role::Operator)),
        (ADMIN, Some(Role::Admin)),
        (NOBODY_ELSE, None),
    ];
    let mut denials = 0;
    for route in ROUTES {
        for (uid, role) in users {
            // Arguments that name nothing that exists: an allowed call answers 4xx or 2xx,
            // never 403, and changes nothing.
            let path = route
                .path
                .replace("{id}", "nosuch")
                .replace("{name}", "nosuch");
            let mut args = vec!["raw", route.method, path.as_str()];
            if route.method == "POST" {
                args.extend(["--data", "{}"]);
            }
            let (code, _, err) = f.strata_as(uid, &args);
            let allowed = role.is_some_and(|r| r >= route.op.role);
            if allowed {
                assert!(!err.contains("403"), "{uid} {} {path}: {err}", route.method);
            } else {
                denials += 1;
                assert_eq!(code, 1);
                assert!(err.contains("403"), "{uid} {} {path}: {err}", route.method);
                if role.is_none() {
                    assert!(err.contains(&format!("uid={uid} has no role")), "{err}");
                }
            }
        }
    }
    assert!(denials > 0);
    let lines = f.audit_lines();
    let denied: Vec<_> = lines.iter().filter(|l| l["status"] == 403).collect();
    assert_eq!(denied.len(), denials, "{lines:#?}");
    for l in &denied {
        assert!(l["result"].as_str().unwrap().starts_with("denied"), "{l}");
        assert!(
            l["principal"].as_str().unwrap().starts_with("uid=600"),
            "{l}"
        );
    }
    // Allowed mutating calls are there too, with the caller's role.
    assert!(lines
        .iter()
        .any(|l| l["operation"] == "disk.add" && l["role"] == "operator" && l["status"] == 422));

    // The chain holds; an edited line breaks it where it is.
    let log = f.path("audit/audit.log");
    let out = f.strata(&["audit", "verify", log.to_str().unwrap()]);
    assert!(out.contains("intact"), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"status\":403", "\"status\":200", 1);
    std::fs::write(&log, edited).unwrap();
    let (code, _, err) = f.strata_as(0, &["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("line ") && err.contains("changed or removed"),
        "{err}"
    );
}

#[test]
fn limits_change_at_run_time_for_disks_and_groups_and_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    let disks = format!(
        "[[disk]]\nid = \"q\"\nsocket = \"{d}/q.sock\"\ndisk = \"path=null,size=1M\"\nlimits = {{ iops-total = 100000 }}\n\
         [[disk]]\nid = \"g1\"\nsocket = \"{d}/g1.sock\"\ndisk = \"path=null,size=1M,throttle-group=shared,iops-total=5000\"\n\
         [[disk]]\nid = \"g2\"\nsocket = \"{d}/g2.sock\"\ndisk = \"path=null,size=1M,throttle-group=shared\"\n\
         [[disk]]\nid = \"plain\"\nsocket = \"{d}/plain.sock\"\ndisk = \"path=null,size=1M\"\n"
    );
    let mut f = Fixture::new(&disks);
    let limits_of = |f: &Fixture, id: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&f.strata(&["--json", "disk", "show", id])).unwrap();
        v["throttle"]["limits"].clone()
    };
    assert_eq!(
        limits_of(&f, "q"),
        serde_json::json!({"iops-total": 100000})
    );

    let (code, _, err) = f.strata_as(
        OPERATOR,
        &["disk", "limits", "q", "iops-total=200", "bps-read=1048576"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        limits_of(&f, "q"),
        serde_json::json!({"iops-total": 200, "bps-read": 1048576})
    );
    let (code, _, err) = f.strata_as(VIEWER, &["disk", "limits", "q", "iops-total=1"]);
    assert!(code == 1 && err.contains("403"), "{err}");
    for (args, needle) in [
        (vec!["disk", "limits", "g1", "iops-total=1"], "shared"),
        (
            vec!["disk", "limits", "q", "iops-total=1", "iops-read=1"],
            "cannot be used together",
        ),
        (vec!["disk", "limits", "q", "speed=1"], "speed"),
        (
            vec!["throttle-group", "limits", "nosuch", "iops-total=1"],
            "nosuch",
        ),
    ] {
        let (code, _, err) = f.strata_as(0, &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(limits_of(&f, "q")["iops-total"], 200);

    let list = f.strata(&["throttle-group", "list"]);
    assert!(
        list.contains("shared") && list.contains("iops-total=5000") && list.contains("g1,g2"),
        "{list}"
    );
    f.strata(&["throttle-group", "limits", "shared", "iops-total=777"]);
    assert_eq!(limits_of(&f, "g2"), serde_json::json!({"iops-total": 777}));

    // Both survive a restart, from the config file.
    f.stop();
    f.start();
    assert_eq!(
        limits_of(&f, "q"),
        serde_json::json!({"iops-total": 200, "bps-read": 1048576})
    );
    assert_eq!(limits_of(&f, "g1"), serde_json::json!({"iops-total": 777}));

    // The member that carried the group's first limits goes: the group's limits are the
    // config's, and the daemon still starts with them.
    f.strata(&["disk", "remove", "g1"]);
    f.stop();
    f.start();
    assert_eq!(limits_of(&f, "g2"), serde_json::json!({"iops-total": 777}));
}

/// A disk opened without limits (a file, two queues) gets them while a client drives it
/// at depth 32: the change waits for no idle moment, no request fails, the new rate holds,
/// and the limits (and so the throttle node) are there after a restart.
#[test]
fn limits_reach_a_disk_opened_without_them_while_it_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("plain.sock");
    let image = tmp.path().join("plain.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut f = Fixture::new(&format!(
        "[[disk]]\nid = \"plain\"\nsocket = \"{}\"\ndisk = \"path={}\"\nqueues = 2\n",
        sock.display(),
        image.display()
    ));
    let graph_of = |f: &Fixture| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&f.strata(&["--json", "disk", "show", "plain"])).unwrap();
        v["graph"].clone()
    };
    assert_eq!(graph_of(&f), "raw");
    let mut client = Client::open(&sock, 2).unwrap();
    let mut p = client.queue(0).pipeline(32, 4096).unwrap();
    let mut next = 0u64;
    // Keeps every slot busy until `until` says stop; returns how many completed.
    let mut drive = |p: &mut testkit::blkio_client::Pipeline<'_>,
                     until: &mut dyn FnMut() -> bool| {
        let mut done = 0u64;
        while !until() {
            for slot in 0..32 {
                if p.is_free(slot) {
                    p.submit(slot, SlotOp::Read((next % 16384) * 4096));
                    next += 1;
                }
            }
            done += p.wait(1, |_, r| assert!(r.is_ok(), "{r:?}")).unwrap() as u64;
        }
        done
    };
    let begin = Instant::now();
    let free = drive(&mut p, &mut || {
        begin.elapsed() >= Duration::from_millis(300)
    });
    assert!(free > 300, "{free} requests in 0.3 s before any limit");

    let mut call = Command::new(binary_path("strata"))
        .arg("--api")
        .arg(f.path("api.sock"))
        .args(["disk", "limits", "plain", "iops-total=500"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    drive(&mut p, &mut || {
        status = call.try_wait().unwrap();
        status.is_some()
    });
    let out = call.wait_with_output().unwrap();
    assert!(
        status.unwrap().success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Past the bucket's burst, the rate is the limit's.
    let settle = Instant::now();
    drive(&mut p, &mut || {
        settle.elapsed() >= Duration::from_millis(400)
    });
    let run = Instant::now();
    let limited = drive(&mut p, &mut || run.elapsed() >= Duration::from_secs(2));
    let rate = limited as f64 / run.elapsed().as_secs_f64();
    assert!(
        (400.0..=525.0).contains(&rate),
        "{rate:.0} IOPS under a limit of 500"
    );
    p.drain().unwrap();
    drop(p);
    drop(client);
    assert_eq!(graph_of(&f), "throttle(raw)");
    // The next frontend's event loop watches the node's timer from the start.
    let mut client = Client::open(&sock, 2).unwrap();
    let mut p = client.queue(0).pipeline(32, 4096).unwrap();
    let again = Instant::now();
    let served = drive(&mut p, &mut || again.elapsed() >= Duration::from_secs(1));
    // A second's worth may have gathered in the bucket meanwhile.
    assert!(
        (300..=1100).contains(&served),
        "{served} requests in 1 s under a limit of 500 after a reconnect"
    );
    p.drain().unwrap();
    drop(p);
    drop(client);

    f.stop();
    f.start();
    assert_eq!(graph_of(&f), "throttle(raw)");
    let v: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "plain"])).unwrap();
    assert_eq!(
        v["throttle"]["limits"],
        serde_json::json!({"iops-total": 500})
    );
}

#[test]
fn an_operators_disks_stay_inside_the_configured_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fixture::new(&null_disk("a", tmp.path()));
    let image = f.path("images/op.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = f.path("op.sock");
    let spec = format!("path={}", image.display());
    let (code, _, err) = f.strata_as(
        OPERATOR,
        &[
            "disk",
            "add",
            "op",
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            &spec,
        ],
    );
    assert_eq!(code, 0, "{err}");
    // A second disk on the same image is a conflict, named by the operator's path (the
    // daemon opened it through /proc/self/fd).
    let (code, _, err) = f.strata_as(
        OPERATOR,
        &[
            "disk",
            "add",
            "op2",
            "--socket",
            f.path("op2.sock").to_str().unwrap(),
            "--disk",
            &spec,
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("409")
            && err.contains(&image.display().to_string())
            && !err.contains("/proc/self/fd"),
        "{err}"
    );
    let outside = f.path("outside.img");
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let escape = f.path("images/escape.img");
    std::os::unix::fs::symlink(&outside, &escape).unwrap();
    for (spec, sock, needle) in [
        (
            format!("path={}", outside.display()),
            f.path("x.sock"),
            "operator-image-dirs",
        ),
        (
            format!("path={}", escape.display()),
            f.path("x.sock"),
            "operator-image-dirs",
        ),
        (
            format!(
                "path={},cache={},cache-size=1M",
                image.display(),
                outside.display()
            ),
            f.path("x.sock"),
            "operator-image-dirs",
        ),
        (
            "path=null,size=1M".to_string(),
            PathBuf::from("/tmp/x.sock"),
            "operator-socket-dirs",
        ),
    ] {
        let (code, _, err) = f.strata_as(
            OPERATOR,
            &[
                "disk",
                "add",
                "x",
                "--socket",
                sock.to_str().unwrap(),
                "--disk",
                &spec,
            ],
        );
        assert_eq!(code, 1, "{spec}");
        assert!(err.contains("403") && err.contains(needle), "{spec}: {err}");
    }
    // An admin may.
    let (code, _, err) = f.strata_as(
        ADMIN,
        &[
            "disk",
            "add",
            "x",
            "--socket",
            f.path("x.sock").to_str().unwrap(),
            "--disk",
            &format!("path={}", outside.display()),
        ],
    );
    assert_eq!(code, 0, "{err}");

    // The operator's disk is checked again at the next start: its image swapped for a link
    // meanwhile, it is not served (the others are).
    f.stop();
    std::fs::remove_file(&image).unwrap();
    std::os::unix::fs::symlink(&outside, &image).unwrap();
    f.start();
    let list = f.strata(&["disk", "list"]);
    assert!(!list.lines().any(|l| l.starts_with("op ")), "{list}");
    assert!(list.lines().any(|l| l.starts_with("x ")), "{list}");
    assert!(f
        .daemon
        .as_ref()
        .unwrap()
        .output()
        .contains("disk op: not served"));
    let config = std::fs::read_to_string(f.path("vhost-blk.toml")).unwrap();
    assert!(config.contains("added-by-operator = true"), "{config}");
}

#[test]
fn a_disk_short_of_host_space_is_flagged_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("f.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disks = format!(
        "[[disk]]\nid = \"f\"\nsocket = \"{}/f.sock\"\ndisk = \"path={}\"\n{}",
        tmp.path().display(),
        image.display(),
        null_disk("n", tmp.path())
    );
    // Every file system has less than 100% free: the threshold is crossed at once.
    let f = Fixture::with("space-alert-percent = 100\nspace-check-seconds = 1", &disks);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let daemon = f.daemon.as_ref().unwrap();
    while !daemon.output().contains("under the 100% alert threshold") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.output().contains("disk f: the file system holding"),
        "{}",
        daemon.output()
    );
    let metrics = f.strata(&["raw", "GET", "/metrics"]);
    let samples = testkit::http::parse_prometheus(&metrics).unwrap();
    let value = |name: &str, disk: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.contains(&format!("disk=\"{disk}\"")))
            .map(|s| s.value)
    };
    assert_eq!(value("strata_blk_host_fs_low_space", "f"), Some(1.0));
    // A null disk has no files, so nothing to be short of.
    assert_eq!(value("strata_blk_host_fs_low_space", "n"), Some(0.0));
    assert!(value("strata_blk_host_fs_free_bytes", "f").unwrap() > 0.0);
    assert!(
        value("strata_blk_host_fs_size_bytes", "f").unwrap()
            >= value("strata_blk_host_fs_free_bytes", "f").unwrap()
    );
}

#[test]
fn a_preallocating_resize_runs_as_a_job_that_can_be_cancelled() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("p.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disks = format!(
        "[[disk]]\nid = \"p\"\nsocket = \"{}/p.sock\"\ndisk = \"path={}\"\n",
        tmp.path().display(),
        image.display()
    );
    let f = Fixture::new(&disks);
    // Full preallocation writes zeroes: the file's blocks are really there at the end.
    let (code, out, err) = f.strata_as(
        OPERATOR,
        &[
            "disk",
            "resize",
            "p",
            "64M",
            "--preallocate",
            "full",
            "--wait",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("done") && out.contains("100%"), "{out}");
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 >= 63 << 20,
        "only {} bytes allocated",
        meta.blocks() * 512
    );
    let show: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "p"])).unwrap();
    assert_eq!(show["size"], 64u64 << 20);

    // A long one, cancelled at once: the disk keeps its size and the file its length.
    let (code, out, err) = f.strata_as(
        OPERATOR,
        &[
            "--json",
            "disk",
            "resize",
            "p",
            "8G",
            "--preallocate",
            "full",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["state"], "running");
    // Until it is done, the disk keeps its size.
    let show: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "p"])).unwrap();
    assert_eq!(show["size"], 64u64 << 20);
    // While it runs, the disk is not removed under it, nor resized twice.
    let (code, _, err) = f.strata_as(ADMIN, &["disk", "remove", "p"]);
    assert!(
        code == 1 && err.contains("409") && err.contains(&id),
        "{err}"
    );
    let (code, _, err) = f.strata_as(VIEWER, &["jobs", "cancel", &id]);
    assert!(code == 1 && err.contains("403"), "{err}");
    let (code, _, err) = f.strata_as(OPERATOR, &["jobs", "cancel", &id]);
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let state = loop {
        let v: serde_json::Value =
            serde_json::from_str(&f.strata(&["--json", "jobs", "show", &id])).unwrap();
        if v["state"] != "running" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(state["state"], "cancelled", "{state}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    let list = f.strata(&["jobs"]);
    assert!(
        list.contains(&id) && list.contains("cancelled") && list.contains("done"),
        "{list}"
    );
    // The job's operations are in the audit log, with the canceller.
    let lines = f.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l["operation"] == "job.cancel" && l["role"] == "operator" && l["status"] == 200));
}

#[test]
fn the_api_over_tls_takes_bearer_tokens_and_only_tls_1_3() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hex = |s: &str| -> String {
        daemon_support::access::token_hash(s)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let (op_token, viewer_token) = ("1".repeat(64), "2".repeat(64));
    let top = format!(
        "[api-tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [[token]]\nname = \"ci-bot\"\nsha256 = \"{}\"\nrole = \"operator\"\n\
         [[token]]\nname = \"grafana\"\nsha256 = \"{}\"\nrole = \"viewer\"\n",
        cert.display(),
        key.display(),
        hex(&op_token),
        hex(&viewer_token)
    );
    let f = Fixture::with(&top, &null_disk("a", tmp.path()));
    let out = f.daemon.as_ref().unwrap().output();
    let port: u16 = out
        .lines()
        .find_map(|l| l.split("API (TLS) listening on 127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no TLS port in:\n{out}"));
    let url = format!("https://localhost:{port}");
    let over_tls = |token: &str, args: &[&str]| {
        let mut all = vec![
            "--url",
            url.as_str(),
            "--cacert",
            cert.to_str().unwrap(),
            "--token",
            token,
        ];
        all.extend_from_slice(args);
        f.strata_as(0, &all)
    };
    let (code, out, err) = over_tls(&op_token, &["disk", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("a ")), "{out}");
    let (code, _, err) = over_tls(
        &op_token,
        &[
            "disk",
            "add",
            "x",
            "--socket",
            f.path("x.sock").to_str().unwrap(),
            "--disk",
            "path=null,size=1M",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = over_tls(&viewer_token, &["disk", "remove", "x"]);
    assert!(
        code == 1 && err.contains("403") && err.contains("token:grafana"),
        "{err}"
    );
    let (code, _, err) = over_tls(&"3".repeat(64), &["disk", "list"]);
    assert!(
        code == 1 && err.contains("401") && err.contains("bearer token"),
        "{err}"
    );
    // Many refusals from one address make one audit line, not many.
    for _ in 0..5 {
        let (code, _, _) = over_tls(&"4".repeat(64), &["health"]);
        assert_eq!(code, 1);
    }
    // The token from a file.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{op_token}\n")).unwrap();
    let (code, _, err) = f.strata_as(
        0,
        &[
            "--url",
            url.as_str(),
            "--cacert",
            cert.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "health",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // The audit log names the token's holder and where the call came from.
    let lines = f.audit_lines();
    assert!(lines.iter().any(|l| l["operation"] == "disk.add"
        && l["principal"]
            .as_str()
            .unwrap()
            .starts_with("token:ci-bot@127.0.0.1:")
        && l["role"] == "operator"));
    assert_eq!(
        lines.iter().filter(|l| l["status"] == 401).count(),
        1,
        "{lines:#?}"
    );
    // TLS 1.3 only: a client that offers at most 1.2 gets no session; the same client
    // offering 1.3 does (so the refusal is the version's, not a wrong port).
    let handshake = |version: &str| {
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                version,
                "-servername",
                "localhost",
                "-CAfile",
                cert.to_str().unwrap(),
                "-verify_return_error",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl (Debian's openssl package) is needed for this test")
    };
    let s = handshake("-tls1_3");
    assert!(
        s.status.success(),
        "TLS 1.3: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    let s = handshake("-tls1_2");
    assert!(
        !s.status.success(),
        "a TLS 1.2 handshake succeeded: {}",
        String::from_utf8_lossy(&s.stdout)
    );
    // The token is in no log.
    assert!(!f.daemon.as_ref().unwrap().output().contains(&op_token));
    let audit = std::fs::read_to_string(f.path("audit/audit.log")).unwrap();
    assert!(!audit.contains(&op_token) && !audit.contains(&viewer_token));
}

#[test]
fn resize_requests_that_make_no_sense_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture::new(&null_disk("a", tmp.path()));
    for (body, status) in [
        (r#"{"size": "lots"}"#, "400"),
        (r#"{"size": "99999999999999999999T"}"#, "400"),
        (r#"{"size": 18446744073709551615}"#, "400"),
        (r#"{"size": -1}"#, "422"),
        (r#"{"size": 1000}"#, "400"),
        (r#"{"size": 512}"#, "400"),
        (r#"{"size": "2M", "preallocate": "sometimes"}"#, "422"),
        (r#"{"size": "2M", "extra": 1}"#, "422"),
        (r#"{}"#, "422"),
        (r#"[1, 2]"#, "400"),
    ] {
        let (code, _, err) = f.strata_as(0, &["raw", "POST", "/v1/disks/a/resize", "--data", body]);
        assert_eq!(code, 1, "{body}");
        assert!(err.contains(status), "{body}: {err}");
    }
    let show: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "a"])).unwrap();
    assert_eq!(show["size"], 1u64 << 20);
}

#[test]
fn the_role_each_operation_needs_comes_from_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fixture::with(
        "[privileges]\n\"disk.resize\" = \"admin\"\n\"metrics\" = \"operator\"\n",
        &null_disk("a", tmp.path()),
    );
    let (code, _, err) = f.strata_as(OPERATOR, &["disk", "resize", "a", "2M"]);
    assert!(
        code == 1 && err.contains("403") && err.contains("disk.resize needs the admin role"),
        "{err}"
    );
    let (code, _, err) = f.strata_as(ADMIN, &["disk", "resize", "a", "2M"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = f.strata_as(VIEWER, &["raw", "GET", "/metrics"]);
    assert!(code == 1 && err.contains("403"), "{err}");
    let (code, _, err) = f.strata_as(OPERATOR, &["raw", "GET", "/metrics"]);
    assert_eq!(code, 0, "{err}");
    // What the config does not name keeps its default: a viewer still lists.
    let (code, _, err) = f.strata_as(VIEWER, &["disk", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(f
        .audit_lines()
        .iter()
        .any(|l| l["operation"] == "disk.resize" && l["status"] == 403 && l["role"] == "operator"));

    // An operation the daemon does not have, or a role it does not know: one line, exit 2.
    for (table, expect) in [
        (
            "\"disk.destroy\" = \"admin\"",
            "no operation \"disk.destroy\"",
        ),
        ("\"disk.add\" = \"root\"", "privileges.disk.add"),
    ] {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, format!("[privileges]\n{table}\n")).unwrap();
        let out = Command::new(binary_path("vhost-blk"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(expect) && err.lines().count() == 1, "{err}");
    }
}

/// An admin gives a new disk its passphrase through the API (`strata disk add
/// --passphrase-file`): the LUKS disk serves, the passphrase reaches neither the config
/// file, the audit log nor the daemon's log, and the disk is not kept for the next start.
/// An operator may not give one; a wrong one, or one no node takes, is a 400.
#[test]
fn a_disk_given_its_passphrase_through_the_api_serves_and_is_not_kept() {
    const PASS: &str = "an api passphrase 6d1f";
    let mut f = Fixture::new("");
    let key = f.path("vm.key");
    std::fs::write(&key, PASS).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let img = f.path("images/vm.luks");
    testkit::daemon::strata_create_encrypted(&img, "4M", "luks", &key);
    let sock = f.path("vm.sock");
    let spec = format!("path={},format=luks", img.display());
    let body = |pass: &str, disk: &str| {
        serde_json::json!({
            "id": "vm", "socket": sock, "disk": disk, "passphrase": pass,
        })
        .to_string()
    };
    let (code, _, err) = f.strata_as(
        OPERATOR,
        &["raw", "POST", "/v1/disks", "--data", &body(PASS, &spec)],
    );
    assert_eq!(code, 1);
    assert!(err.contains("403") && err.contains("admin"), "{err}");
    let raw = format!("path={}", img.display());
    for (pass, disk, says) in [
        ("not it", spec.as_str(), "no keyslot opens"),
        (PASS, raw.as_str(), "no node takes it"),
    ] {
        let (code, _, err) = f.strata_as(
            0,
            &["raw", "POST", "/v1/disks", "--data", &body(pass, disk)],
        );
        assert_eq!(code, 1, "{disk}");
        assert!(err.contains("400") && err.contains(says), "{err}");
        assert!(!err.contains(pass), "{err}");
    }
    // A passphrase that is not a string, or is empty: 400, the value not quoted.
    for bad in [
        serde_json::json!(918273645),
        serde_json::json!(""),
        serde_json::json!(["x"]),
    ] {
        let text = serde_json::json!({
            "id": "vm", "socket": sock, "disk": spec, "passphrase": bad,
        })
        .to_string();
        let (code, _, err) = f.strata_as(0, &["raw", "POST", "/v1/disks", "--data", &text]);
        assert_eq!(code, 1, "{bad}");
        assert!(
            err.contains("400") && err.contains("passphrase"),
            "{bad}: {err}"
        );
        assert!(!err.contains("918273645"), "{err}");
    }
    // A misspelt key is refused, and its value is not audited either.
    let typo = serde_json::json!({
        "id": "vm", "socket": sock, "disk": spec, "passphrse": "typo secret 8a8a",
    })
    .to_string();
    let (code, _, _) = f.strata_as(0, &["raw", "POST", "/v1/disks", "--data", &typo]);
    assert_eq!(code, 1);

    let out = f.strata(&[
        "--json",
        "disk",
        "add",
        "vm",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        &spec,
        "--passphrase-file",
        key.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["persistent"], false, "{v}");
    let shown: serde_json::Value =
        serde_json::from_str(&f.strata(&["--json", "disk", "show", "vm"])).unwrap();
    assert_eq!(shown["persistent"], false, "{shown}");
    let mut client = Client::open(&sock, 1).expect("libblkio connects");
    assert_eq!(client.capacity(), 4 << 20);
    client.queue(0).write(4096, &[0x6b; 8192]).unwrap();
    assert_eq!(client.queue(0).read(4096, 8192).unwrap(), vec![0x6b; 8192]);
    drop(client);
    // Ciphertext on the image.
    let bytes = std::fs::read(&img).unwrap();
    assert!(!bytes.windows(64).any(|w| w == [0x6b; 64]));
    let config = std::fs::read_to_string(f.path("vhost-blk.toml")).unwrap();
    assert!(!config.contains("vm.luks"), "{config}");
    // Removed without the config file knowing it.
    f.strata(&["disk", "remove", "vm"]);
    let audit = std::fs::read_to_string(f.path("audit/audit.log")).unwrap();
    assert!(audit.contains("disk.add"), "{audit}");
    assert!(
        audit.contains("vm.luks"),
        "the disk's spec is audited: {audit}"
    );
    for secret in [PASS, "not it", "typo secret 8a8a", "918273645"] {
        assert!(!audit.contains(secret), "the audit log holds {secret:?}");
    }
    f.strata(&[
        "disk",
        "add",
        "vm",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        &spec,
        "--passphrase-file",
        key.to_str().unwrap(),
    ]);
    let mut daemon = f.daemon.take().unwrap();
    assert!(daemon.terminate().unwrap().success());
    let log = daemon.output();
    assert!(log.contains("vm"), "{log}");
    assert!(!log.contains(PASS), "the daemon's log holds the passphrase");
    f.start();
    let list = f.strata(&["disk", "list"]);
    assert!(!list.contains("vm"), "not kept for the next start: {list}");
}
