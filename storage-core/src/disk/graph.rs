//! Named nodes, as qemu-storage-daemon takes them: `--blockdev` describes one node
//! (`driver=`, `node-name=`, children by name or inline), `--object throttle-group,...`
//! one group of limits; the disk then names its root node. Each is `key=value,...` (a `,,`
//! is a literal comma, dotted keys reach into children: `file.filename=...`) or the same as
//! a JSON object.
//!
//! Drivers and their keys (qemu-storage-daemon's names where they exist):
//! - `file` (or `host_device`): `filename`, `cache.direct`, `aio` (`io_uring`, `threads`),
//!   `locking` (`on`, `auto`: on; `off`); `engine` as in `--disk`.
//! - `null-co` (or `null`): `size`, `read-zeroes` (on by default here).
//! - `raw`: `file`; the raw format adds nothing to its child, so it is the child.
//! - `rbd`: `pool`, `image`, `conf` (a ceph.conf), `id` (or QEMU's `user`): an image on a
//!   Ceph cluster (cargo feature `rbd`).
//! - `throttle`: `file`, `throttle-group` and/or limits of its own (`iops-total`, ...;
//!   `limits.iops-total` as in QEMU's JSON).
//! - `tier` (ours): `capacity` (any node), `cache` (a `file` node: the cache file), and the
//!   cache keys of `--disk` (`cache-size`, `cache-mode`, ...).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::spec::KeySource;
use super::spec::{bad, null_size, on_off, parse_engine, parse_locking, parse_serial, TierOptions};
use super::{DiskSpec, NodeSpec, RbdSpec, SpecError, ThrottleSpec};
use crate::crypto::key_file::Passphrase;
use crate::throttle::{ThrottleGroup, ThrottleLimits};

/// How deep a graph may be: deeper is surely a mistake (or a loop).
const MAX_DEPTH: usize = 16;

/// One node's options, keys flattened (`file.filename`), in the order given.
type Options = Vec<(String, String)>;

/// The nodes and groups given on the command line (or in a config), before a disk names
/// its root.
#[derive(Debug, Default, Clone)]
pub struct GraphSpec {
    nodes: Vec<(String, Options)>,
    groups: Vec<(String, ThrottleLimits)>,
    /// `--object secret,id=ID,file=PATH`: key files by id.
    secrets: Vec<(String, PathBuf)>,
    /// A passphrase given through the API, for encrypted nodes that name no key.
    given: Option<Arc<Passphrase>>,
}

fn graph_err(msg: impl Into<String>) -> SpecError {
    SpecError::Graph(msg.into())
}

/// Splits `key=value,...` (with `,,` for a literal comma) into pairs.
fn parse_pairs(text: &str) -> Result<Options, SpecError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut out: Options = Vec::new();
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(item.clone()))?;
        push_unique(&mut out, k.to_string(), v.to_string())?;
    }
    Ok(out)
}

fn push_unique(out: &mut Options, key: String, value: String) -> Result<(), SpecError> {
    if out.iter().any(|(k, _)| *k == key) {
        return Err(SpecError::Duplicate(key));
    }
    out.push((key, value));
    Ok(())
}

/// Flattens a JSON object into dotted keys.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Options) -> Result<(), SpecError> {
    use serde_json::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&key(k), v, out)?;
            }
            Ok(())
        }
        Value::String(s) => push_unique(out, prefix.to_string(), s.clone()),
        Value::Number(n) => push_unique(out, prefix.to_string(), n.to_string()),
        Value::Bool(b) => push_unique(
            out,
            prefix.to_string(),
            if *b { "on" } else { "off" }.into(),
        ),
        Value::Null | Value::Array(_) => Err(bad(
            prefix,
            &v.to_string(),
            "expected a string, number, boolean or object",
        )),
    }
}

/// Parses one description: JSON if it starts with `{`, else `key=value,...`.
fn parse_options(text: &str) -> Result<Options, SpecError> {
    let text = text.trim();
    if text.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| graph_err(format!("invalid JSON: {e}")))?;
        let mut out = Vec::new();
        flatten("", &v, &mut out)?;
        Ok(out)
    } else {
        parse_pairs(text)
    }
}

fn take(opts: &mut Options, key: &str) -> Option<String> {
    let i = opts.iter().position(|(k, _)| k == key)?;
    Some(opts.remove(i).1)
}

/// Removes and returns the options under `prefix.` (an inline child), prefix stripped.
fn take_prefixed(opts: &mut Options, prefix: &str) -> Options {
    let dotted = format!("{prefix}.");
    let mut inner = Vec::new();
    opts.retain(|(k, v)| match k.strip_prefix(&dotted) {
        Some(rest) => {
            inner.push((rest.to_string(), v.clone()));
            false
        }
        None => true,
    });
    inner
}

impl GraphSpec {
    /// Adds a node (`--blockdev`).
    pub fn add_blockdev(&mut self, text: &str) -> Result<(), SpecError> {
        let mut opts = parse_options(text)?;
        let name = take(&mut opts, "node-name")
            .ok_or_else(|| graph_err("a --blockdev needs node-name="))?;
        if name.is_empty() {
            return Err(graph_err("node-name is empty"));
        }
        if self.nodes.iter().any(|(n, _)| *n == name) {
            return Err(graph_err(format!("node-name {name:?} is given twice")));
        }
        if !opts.iter().any(|(k, _)| k == "driver") {
            return Err(graph_err(format!("node {name:?} has no driver=")));
        }
        self.nodes.push((name, opts));
        Ok(())
    }

    /// Adds an object (`--object throttle-group,id=NAME,x-iops-total=...`, or in JSON with
    /// `qom-type`, `id` and `limits`).
    pub fn add_object(&mut self, text: &str) -> Result<(), SpecError> {
        let text = text.trim();
        // An inline secret is refused before any parsing, whose errors quote the text.
        let inline = if text.starts_with('{') {
            text.contains("\"secret\"") && text.contains("\"data\"")
        } else {
            text.starts_with("secret,")
                && text
                    .split(',')
                    .any(|kv| kv.split_once('=').map_or(kv, |(k, _)| k) == "data")
        };
        if inline {
            return Err(graph_err(
                "--object secret: give the secret in a file (file=PATH); data= is not taken, \
                 since it would show in the process list",
            ));
        }
        let mut opts = if text.starts_with('{') {
            parse_options(text)?
        } else {
            // The type comes first, without a key, as in QEMU.
            let (ty, rest) = text.split_once(',').unwrap_or((text, ""));
            let mut o = parse_pairs(rest)?;
            o.insert(0, ("qom-type".into(), ty.to_string()));
            o
        };
        let ty = take(&mut opts, "qom-type").unwrap_or_default();
        if ty == "secret" {
            return self.add_secret(opts);
        }
        if ty != "throttle-group" {
            return Err(graph_err(format!(
                "--object {ty:?}: the object types are throttle-group and secret"
            )));
        }
        let id = take(&mut opts, "id").ok_or_else(|| graph_err("a throttle-group needs id="))?;
        if self.groups.iter().any(|(n, _)| *n == id) {
            return Err(graph_err(format!("throttle-group {id:?} is given twice")));
        }
        let mut limits = ThrottleLimits::default();
        for (k, v) in opts {
            let k = k.strip_prefix("limits.").unwrap_or(&k);
            if !ThrottleLimits::is_key(k) {
                return Err(graph_err(format!(
                    "throttle-group {id:?}: unknown key {k:?}"
                )));
            }
            limits.set(k, &v)?;
        }
        self.groups.push((id, limits.check()?));
        Ok(())
    }

    /// `--object secret,id=ID,file=PATH`, as QEMU's, from a file only: a secret given inline
    /// (`data=`) would show in the process list.
    fn add_secret(&mut self, mut opts: Options) -> Result<(), SpecError> {
        let id = take(&mut opts, "id").ok_or_else(|| graph_err("a secret needs id="))?;
        if self.secrets.iter().any(|(n, _)| *n == id) {
            return Err(graph_err(format!("secret {id:?} is given twice")));
        }
        let file = take(&mut opts, "file")
            .filter(|f| !f.is_empty())
            .ok_or_else(|| graph_err(format!("secret {id:?} needs file= (data= is not taken)")))?;
        if let Some((k, _)) = opts.first() {
            return Err(graph_err(format!("secret {id:?}: unknown key {k:?}")));
        }
        self.secrets.push((id, PathBuf::from(file)));
        Ok(())
    }

    /// The disk that `--disk` describes: the shorthand (`path=...`, no nodes given), or
    /// `node=NAME[,serial=S][,readonly=on]`, a root among these nodes.
    pub fn resolve(&self, disk: &str) -> Result<DiskSpec, SpecError> {
        let mut opts = parse_pairs(disk)?;
        let Some(root) = take(&mut opts, "node") else {
            if !self.nodes.is_empty() {
                return Err(graph_err(
                    "--blockdev nodes were given: --disk names the root with node=NAME",
                ));
            }
            let mut spec = DiskSpec::parse_given(disk, self.given.clone())?;
            // A group declared with --object gives its limits to the shorthand's node.
            if let NodeSpec::Throttle {
                limits: ThrottleSpec::Group { name, limits },
                ..
            } = &mut spec.root
            {
                if let Some((_, declared)) = self.groups.iter().find(|(n, _)| n == name) {
                    if limits.is_some() {
                        return Err(graph_err(format!(
                            "throttle group {name:?} has its limits in --object; give them \
                             there only"
                        )));
                    }
                    *limits = Some(*declared);
                }
            }
            self.check_groups_used(&spec.root)?;
            return Ok(spec);
        };
        let mut read_only = false;
        let mut serial = None;
        for (k, v) in opts {
            match k.as_str() {
                "readonly" => read_only = on_off("readonly", &v)?,
                "serial" => serial = Some(parse_serial(&v)?),
                _ => {
                    return Err(graph_err(format!(
                        "with node=, --disk takes only serial= and readonly= (not {k:?}); the \
                         node's own keys go in its --blockdev"
                    )))
                }
            }
        }
        self.disk(&root, read_only, serial)
    }

    /// Every group declared with --object is named by some throttle node.
    fn check_groups_used(&self, root: &NodeSpec) -> Result<(), SpecError> {
        fn names<'a>(n: &'a NodeSpec, out: &mut Vec<&'a str>) {
            match n {
                NodeSpec::Throttle { child, limits } => {
                    if let ThrottleSpec::Group { name, .. } = limits {
                        out.push(name);
                    }
                    names(child, out);
                }
                NodeSpec::Tier { capacity, .. } => names(capacity, out),
                _ => {}
            }
        }
        let mut used = Vec::new();
        names(root, &mut used);
        match self
            .groups
            .iter()
            .find(|(g, _)| !used.contains(&g.as_str()))
        {
            Some((g, _)) => Err(graph_err(format!(
                "throttle-group {g:?} is declared but no throttle node names it"
            ))),
            None => Ok(()),
        }
    }

    /// The disk whose graph starts at node `root`. Every node must be used, once: a node
    /// reached twice would be opened twice, two writers of one image.
    pub fn disk(
        &self,
        root: &str,
        read_only: bool,
        serial: Option<String>,
    ) -> Result<DiskSpec, SpecError> {
        let mut used = HashSet::new();
        let root_spec = self.named(root, 0, &mut used)?;
        if let Some((name, _)) = self.nodes.iter().find(|(n, _)| !used.contains(n)) {
            return Err(graph_err(format!(
                "node {name:?} is not part of the disk's graph (its root is {root:?})"
            )));
        }
        self.check_groups_used(&root_spec)?;
        Ok(DiskSpec {
            root: root_spec,
            read_only,
            serial,
        })
    }

    fn named(
        &self,
        name: &str,
        depth: usize,
        used: &mut HashSet<String>,
    ) -> Result<NodeSpec, SpecError> {
        let (_, opts) = self
            .nodes
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| graph_err(format!("no node is called {name:?}")))?;
        if !used.insert(name.to_string()) {
            return Err(graph_err(format!(
                "node {name:?} is used twice (a graph is a tree: each node has one parent)"
            )));
        }
        self.build(name, opts.clone(), depth, used)
    }

    /// Gives encrypted nodes that name no key (and the shorthand's) this passphrase
    /// (given through the API).
    pub fn give_passphrase(&mut self, p: Arc<Passphrase>) {
        self.given = Some(p);
    }

    /// The key node `name` (a `driver` node) names, by `key-file=PATH` or `key-secret=ID`
    /// (an `--object secret`), else the passphrase given through the API, if any.
    fn key(
        &self,
        name: &str,
        driver: &str,
        opts: &mut Options,
    ) -> Result<Option<KeySource>, SpecError> {
        match (take(opts, "key-file"), take(opts, "key-secret")) {
            (Some(f), None) if !f.is_empty() => Ok(Some(KeySource::File(PathBuf::from(f)))),
            (None, Some(id)) => self
                .secrets
                .iter()
                .find(|(n, _)| *n == id)
                .map(|(_, f)| Some(KeySource::File(f.clone())))
                .ok_or_else(|| {
                    graph_err(format!(
                        "{driver} node {name:?}: no secret {id:?} (add --object \
                         secret,id={id},file=PATH)"
                    ))
                }),
            (Some(_), Some(_)) => Err(graph_err(format!(
                "{driver} node {name:?}: key-secret= and key-file= both name a key; give one"
            ))),
            (Some(_), None) => Err(graph_err(format!(
                "{driver} node {name:?}: key-file= names no file"
            ))),
            (None, None) => Ok(self.given.clone().map(KeySource::Given)),
        }
    }

    /// The child under `key`: inline (`key.driver=...`) or by name (`key=NAME`).
    fn child(
        &self,
        parent: &str,
        key: &str,
        opts: &mut Options,
        depth: usize,
        used: &mut HashSet<String>,
    ) -> Result<NodeSpec, SpecError> {
        let inline = take_prefixed(opts, key);
        match (take(opts, key), inline.is_empty()) {
            (Some(name), true) => self.named(&name, depth + 1, used),
            (None, false) => self.build(&format!("{parent}.{key}"), inline, depth + 1, used),
            (Some(_), false) => Err(graph_err(format!(
                "node {parent:?}: {key}= names a node and describes one inline"
            ))),
            (None, true) => Err(graph_err(format!("node {parent:?} needs {key}="))),
        }
    }

    fn build(
        &self,
        name: &str,
        mut opts: Options,
        depth: usize,
        used: &mut HashSet<String>,
    ) -> Result<NodeSpec, SpecError> {
        if depth > MAX_DEPTH {
            return Err(graph_err(format!(
                "the graph is deeper than {MAX_DEPTH} nodes at {name:?}"
            )));
        }
        let driver = take(&mut opts, "driver")
            .ok_or_else(|| graph_err(format!("node {name:?} has no driver=")))?;
        let node = match driver.as_str() {
            "file" | "host_device" => {
                let path = take(&mut opts, "filename")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| graph_err(format!("node {name:?} needs filename=")))?;
                let direct = match take(&mut opts, "cache.direct") {
                    Some(v) => on_off("cache.direct", &v)?,
                    None => false,
                };
                let engine = match (take(&mut opts, "aio"), take(&mut opts, "engine")) {
                    (Some(_), Some(_)) => {
                        return Err(graph_err(format!(
                            "node {name:?}: aio= and engine= say the same thing; give one"
                        )))
                    }
                    (Some(v), None) => Some(parse_engine("aio", &v)?),
                    (None, Some(v)) => Some(parse_engine("engine", &v)?),
                    (None, None) => None,
                };
                let locking = match take(&mut opts, "locking") {
                    Some(v) => parse_locking(&v)?,
                    None => true,
                };
                NodeSpec::File {
                    path: PathBuf::from(path),
                    direct,
                    engine,
                    locking,
                }
            }
            "null-co" | "null" => {
                let size = take(&mut opts, "size")
                    .ok_or_else(|| graph_err(format!("node {name:?} needs size=")))?;
                let read_zeroes = match take(&mut opts, "read-zeroes") {
                    Some(v) => on_off("read-zeroes", &v)?,
                    None => true,
                };
                NodeSpec::Null {
                    size: null_size(&size)?,
                    read_zeroes,
                }
            }
            "raw" => self.child(name, "file", &mut opts, depth, used)?,
            "qcow2" => {
                let file = self.child(name, "file", &mut opts, depth, used)?;
                if !matches!(file, NodeSpec::File { .. }) {
                    return Err(graph_err(format!(
                        "qcow2 node {name:?}: its file must be a file node"
                    )));
                }
                let backing = match take(&mut opts, "backing").as_deref() {
                    None => crate::qcow2::Backing::FromImage,
                    Some("null") | Some("") => crate::qcow2::Backing::Without,
                    Some(other) => {
                        return Err(graph_err(format!(
                            "qcow2 node {name:?}: backing={other:?}: only the image's own \
                             backing file (no backing=) or none (backing=null) for now"
                        )))
                    }
                };
                let l2_cache = match take(&mut opts, "l2-cache-size") {
                    Some(v) => {
                        v.parse::<crate::units::ByteSize>()
                            .map_err(|e| bad("l2-cache-size", &v, e.to_string()))?
                            .0
                    }
                    None => crate::qcow2::DEFAULT_L2_CACHE,
                };
                // QEMU's names for an encrypted image's key (`encrypt.format` may only say
                // what the image says), and the luks node's.
                match take(&mut opts, "encrypt.format").as_deref() {
                    None | Some("luks") => {}
                    Some(other) => {
                        return Err(graph_err(format!(
                            "qcow2 node {name:?}: encrypt.format={other:?}: only luks"
                        )))
                    }
                }
                let key = match take(&mut opts, "encrypt.key-secret") {
                    Some(id) => {
                        if opts
                            .iter()
                            .any(|(k, _)| k == "key-secret" || k == "key-file")
                        {
                            return Err(graph_err(format!(
                                "qcow2 node {name:?}: encrypt.key-secret= and key-secret= or \
                                 key-file= both name a key; give one"
                            )));
                        }
                        opts.push(("key-secret".into(), id));
                        self.key(name, "qcow2", &mut opts)?
                    }
                    None => self.key(name, "qcow2", &mut opts)?,
                };
                NodeSpec::Qcow2 {
                    file: Box::new(file),
                    backing,
                    l2_cache,
                    key,
                }
            }
            "rbd" => {
                let need = |opts: &mut Options, key: &str| {
                    take(opts, key)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| graph_err(format!("rbd node {name:?} needs {key}=")))
                };
                let pool = need(&mut opts, "pool")?;
                let image = need(&mut opts, "image")?;
                let conf = take(&mut opts, "conf").map(PathBuf::from);
                // `user` is qemu-storage-daemon's name for it.
                let id = match (take(&mut opts, "id"), take(&mut opts, "user")) {
                    (Some(_), Some(_)) => {
                        return Err(graph_err(format!(
                            "rbd node {name:?}: id= and user= say the same thing; give one"
                        )))
                    }
                    (a, b) => a.or(b),
                };
                NodeSpec::Rbd(RbdSpec {
                    pool,
                    image,
                    conf,
                    id,
                })
            }
            "luks" => {
                let file = self.child(name, "file", &mut opts, depth, used)?;
                let key = self.key(name, "luks", &mut opts)?.ok_or_else(|| {
                    graph_err(format!(
                        "luks node {name:?} needs one of key-secret= and key-file="
                    ))
                })?;
                NodeSpec::Luks {
                    file: Box::new(file),
                    key,
                }
            }
            "throttle" => {
                let child = self.child(name, "file", &mut opts, depth, used)?;
                let group = take(&mut opts, "throttle-group");
                let mut limits = ThrottleLimits::default();
                let mut own = false;
                let keys: Vec<String> = opts
                    .iter()
                    .map(|(k, _)| k.clone())
                    .filter(|k| ThrottleLimits::is_key(k.strip_prefix("limits.").unwrap_or(k)))
                    .collect();
                for k in keys {
                    let v = take(&mut opts, &k).unwrap_or_default();
                    limits.set(k.strip_prefix("limits.").unwrap_or(&k), &v)?;
                    own = true;
                }
                let limits = if own { Some(limits.check()?) } else { None };
                let spec = match (group, limits) {
                    (None, None) => {
                        return Err(graph_err(format!(
                            "throttle node {name:?} needs throttle-group= or limits"
                        )))
                    }
                    (None, Some(l)) => ThrottleSpec::Private(l),
                    (Some(g), own) => {
                        let declared = self.groups.iter().find(|(n, _)| *n == g).map(|(_, l)| *l);
                        let limits = match (declared, own) {
                            (Some(_), Some(_)) => {
                                return Err(graph_err(format!(
                                    "throttle node {name:?}: group {g:?} has its limits in \
                                     --object; give them there only"
                                )))
                            }
                            (d, o) => d.or(o),
                        };
                        if limits.is_none() && ThrottleGroup::find(&g).is_none() {
                            return Err(graph_err(format!(
                                "throttle node {name:?}: no throttle-group {g:?} (add --object \
                                 throttle-group,id={g},...)"
                            )));
                        }
                        ThrottleSpec::Group { name: g, limits }
                    }
                };
                NodeSpec::Throttle {
                    child: Box::new(child),
                    limits: spec,
                }
            }
            "tier" => {
                let capacity = self.child(name, "capacity", &mut opts, depth, used)?;
                let cache = self.child(name, "cache", &mut opts, depth, used)?;
                let NodeSpec::File {
                    path,
                    direct: _,
                    engine,
                    locking,
                } = cache
                else {
                    return Err(graph_err(format!(
                        "tier node {name:?}: its cache must be a file node (the tier formats it)"
                    )));
                };
                let mut tier = TierOptions::default();
                let keys: Vec<(String, String)> = opts.clone();
                for (k, v) in keys {
                    if tier.set(&k, &v)? {
                        take(&mut opts, &k);
                    }
                }
                let mut tier = tier.build("cache", path)?;
                tier.locking = locking;
                NodeSpec::Tier {
                    capacity: Box::new(capacity),
                    tier,
                    cache_engine: engine,
                }
            }
            other => {
                return Err(graph_err(format!(
                    "node {name:?}: unknown driver {other:?} (known: file, host_device, null-co, \
                     qcow2, raw, rbd, throttle, tier)"
                )))
            }
        };
        if let Some((k, _)) = opts.first() {
            return Err(graph_err(format!(
                "node {name:?} (driver {driver}): unknown key {k:?}"
            )));
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::CacheMode;

    /// A passphrase given through the API goes to the luks node, not to the qcow2 image
    /// under it (which holds the LUKS payload), nor to a node with its own key.
    #[test]
    fn a_given_passphrase_goes_to_the_topmost_encrypted_node() {
        let pass = Arc::new(Passphrase::from_bytes(b"given").unwrap());
        let mut g = graph(
            &[
                "driver=file,node-name=f,filename=/i.qcow2",
                "driver=qcow2,node-name=q,file=f",
                "driver=luks,node-name=l,file=q",
            ],
            &[],
        )
        .unwrap();
        g.give_passphrase(pass.clone());
        let mut spec = g.resolve("node=l").unwrap();
        spec.root.settle_given_key();
        match &spec.root {
            NodeSpec::Luks { file, key } => {
                assert_eq!(*key, KeySource::Given(pass.clone()));
                assert!(
                    matches!(&**file, NodeSpec::Qcow2 { key: None, .. }),
                    "{file:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(spec.root.takes_given_key());
        // An encrypted qcow2 image on its own takes it.
        let mut g = graph(
            &[
                "driver=file,node-name=f,filename=/i.qcow2",
                "driver=qcow2,node-name=q,file=f",
            ],
            &[],
        )
        .unwrap();
        g.give_passphrase(pass.clone());
        let mut spec = g.resolve("node=q").unwrap();
        spec.root.settle_given_key();
        assert!(spec.root.takes_given_key());
        // A raw disk does not.
        let mut spec = DiskSpec::parse_given("path=/d.img", Some(pass)).unwrap();
        spec.root.settle_given_key();
        assert!(!spec.root.takes_given_key());
    }

    fn graph(blockdevs: &[&str], objects: &[&str]) -> Result<GraphSpec, SpecError> {
        let mut g = GraphSpec::default();
        for o in objects {
            g.add_object(o)?;
        }
        for b in blockdevs {
            g.add_blockdev(b)?;
        }
        Ok(g)
    }

    #[test]
    fn a_luks_node_takes_its_key_from_a_secret_or_a_file_as_the_shorthand_does() {
        let short: DiskSpec = "path=/d.luks,format=luks,key-file=/k,cache=/ssd/c,cache-size=1G"
            .parse()
            .unwrap();
        let by_secret = graph(
            &[
                "driver=file,node-name=f,filename=/d.luks",
                "driver=file,node-name=ssd,filename=/ssd/c",
                "driver=tier,node-name=t,capacity=f,cache=ssd,cache-size=1G",
                "driver=luks,node-name=l,file=t,key-secret=s0",
            ],
            &["secret,id=s0,file=/k"],
        )
        .unwrap()
        .disk("l", false, None)
        .unwrap();
        assert_eq!(by_secret.root, short.root);
        let by_file = graph(
            &[
                "driver=file,node-name=f,filename=/d.luks",
                "driver=file,node-name=ssd,filename=/ssd/c",
                "driver=tier,node-name=t,capacity=f,cache=ssd,cache-size=1G",
                "driver=luks,node-name=l,file=t,key-file=/k",
            ],
            &[],
        )
        .unwrap()
        .disk("l", false, None)
        .unwrap();
        assert_eq!(by_file.root, short.root);
        for (nodes, objects, needle) in [
            (
                &["driver=luks,node-name=l,file.driver=file,file.filename=/d,key-secret=x"][..],
                &[][..],
                "no secret \"x\"",
            ),
            (
                &["driver=luks,node-name=l,file.driver=file,file.filename=/d"],
                &[],
                "needs one of key-secret= and key-file=",
            ),
            (&[], &["secret,id=s,data=hunter2"], "in a file"),
            (&[], &["secret,id=s,data=hunter2,more"], "in a file"),
            (&[], &[r#"{"qom-type":"secret","id":"s","data":["hunter2"]}"#], "in a file"),
            (&[], &["secret,id=s"], "needs file="),
            // A path or an id holding "data" is no inline secret.
            (
                &["driver=luks,node-name=l,file.driver=file,file.filename=/d,key-secret=x"],
                &["secret,id=metadata,file=/data/vm.key"],
                "no secret \"x\"",
            ),
            (
                &["driver=luks,node-name=l,file.driver=file,file.filename=/d,key-file=/k,key-secret=s"],
                &["secret,id=s,file=/k"],
                "give one",
            ),
        ] {
            let err = graph(nodes, objects)
                .and_then(|g| g.disk("l", false, None))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{nodes:?} {objects:?}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn a_three_node_graph_by_name_equals_the_disk_shorthand() {
        let g = graph(
            &[
                "driver=file,node-name=cap,filename=/cap.img,cache.direct=on,aio=io_uring",
                "driver=file,node-name=ssd,filename=/ssd/c",
                "driver=tier,node-name=t,capacity=cap,cache=ssd,cache-size=1G,cache-mode=writeback",
                "driver=throttle,node-name=q,file=t,throttle-group=vm1",
            ],
            &["throttle-group,id=vm1,x-iops-total=500"],
        )
        .unwrap();
        let by_name = g.disk("q", false, None).unwrap();
        let short: DiskSpec = "path=/cap.img,direct=on,engine=io_uring,cache=/ssd/c,\
                               cache-size=1G,cache-mode=writeback,throttle-group=vm1,iops-total=500"
            .parse()
            .unwrap();
        // The shorthand's engine= applies to the cache file too; the graph gave the cache
        // none.
        let NodeSpec::Throttle { child, limits } = &by_name.root else {
            panic!("{:?}", by_name.root)
        };
        assert_eq!(Some(limits), short.root.throttle());
        let NodeSpec::Tier {
            capacity,
            tier,
            cache_engine,
        } = &**child
        else {
            panic!("{child:?}")
        };
        assert_eq!(tier.mode, CacheMode::WriteBack);
        assert_eq!(short.root.tier(), Some(tier));
        assert_eq!(*cache_engine, None);
        assert_eq!(
            **capacity,
            NodeSpec::File {
                path: "/cap.img".into(),
                direct: true,
                engine: Some(crate::engine::EngineKind::IoUring),
                locking: true,
            }
        );
    }

    #[test]
    fn a_file_node_takes_locking_on_off_or_auto() {
        let locking = |value: &str| {
            graph(
                &[&format!(
                    "driver=file,node-name=f,filename=/a.img,locking={value}"
                )],
                &[],
            )?
            .disk("f", false, None)
            .map(|d| matches!(d.root, NodeSpec::File { locking: true, .. }))
        };
        assert!(locking("on").unwrap());
        assert!(locking("auto").unwrap());
        assert!(!locking("off").unwrap());
        let e = locking("sometimes").unwrap_err().to_string();
        assert!(e.contains("locking"), "{e}");
    }

    #[test]
    fn json_and_inline_children_describe_the_same_graph() {
        let a = graph(
            &[
                r#"{"driver": "throttle", "node-name": "q", "limits": {"iops-read": 100},
                  "file": {"driver": "raw", "file": {"driver": "file", "filename": "/a.img"}}}"#,
            ],
            &[],
        )
        .unwrap()
        .disk("q", true, Some("s1".into()))
        .unwrap();
        let b = graph(
            &["driver=throttle,node-name=q,iops-read=100,file.driver=file,file.filename=/a.img"],
            &[],
        )
        .unwrap()
        .disk("q", true, Some("s1".into()))
        .unwrap();
        assert_eq!(a, b);
        assert!(a.read_only);
    }

    #[test]
    fn mistakes_are_named() {
        for (nodes, objects, root, needle) in [
            (
                &["driver=file,filename=/a"][..],
                &[][..],
                "a",
                "needs node-name",
            ),
            (&["driver=file,node-name=a"], &[], "a", "needs filename"),
            (
                &["driver=file,node-name=a,filename=/a"],
                &[],
                "b",
                "no node is called \"b\"",
            ),
            (&["driver=qcow3,node-name=a"], &[], "a", "unknown driver"),
            (
                &["driver=file,node-name=a,filename=/a,colour=red"],
                &[],
                "a",
                "unknown key \"colour\"",
            ),
            (
                &[
                    "driver=file,node-name=a,filename=/a",
                    "driver=file,node-name=b,filename=/b",
                ],
                &[],
                "a",
                "not part of the disk's graph",
            ),
            (&["driver=raw,node-name=a,file=a"], &[], "a", "used twice"),
            (
                &[
                    "driver=file,node-name=f,filename=/a",
                    "driver=throttle,node-name=x,file=f",
                ],
                &[],
                "x",
                "needs throttle-group= or limits",
            ),
            (
                &[
                    "driver=file,node-name=f,filename=/a",
                    "driver=throttle,node-name=x,file=f,throttle-group=nope",
                ],
                &[],
                "x",
                "no throttle-group \"nope\"",
            ),
            (
                &[
                    "driver=null-co,node-name=f,size=1M",
                    "driver=null-co,node-name=c,size=1M",
                    "driver=tier,node-name=t,capacity=f,cache=c,cache-size=1M",
                ],
                &[],
                "t",
                "must be a file node",
            ),
            (&["{\"driver\": [1]}"], &[], "a", "expected a string"),
            (&["{not json"], &[], "a", "invalid JSON"),
            (&[], &["memory-backend-file,id=m"], "a", "object types are"),
            (
                &[],
                &["throttle-group,id=g,iops-total=1,iops-read=1"],
                "a",
                "cannot be used together",
            ),
        ] {
            let err = graph(nodes, objects)
                .and_then(|g| g.disk(root, false, None))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{nodes:?} {objects:?}: {err:?}");
        }
    }

    #[test]
    fn a_graph_deeper_than_the_limit_is_refused() {
        let mut nodes = vec!["driver=null-co,node-name=n0,size=1M".to_string()];
        for i in 1..=MAX_DEPTH + 1 {
            nodes.push(format!("driver=raw,node-name=n{i},file=n{}", i - 1));
        }
        let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let err = graph(&refs, &[])
            .unwrap()
            .disk(&format!("n{}", MAX_DEPTH + 1), false, None)
            .unwrap_err();
        assert!(err.to_string().contains("deeper than"), "{err}");
    }

    #[test]
    fn the_disk_names_its_root_or_uses_the_shorthand() {
        let g = graph(&["driver=null-co,node-name=n,size=1M"], &[]).unwrap();
        let d = g.resolve("node=n,serial=abc,readonly=on").unwrap();
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert!(d.read_only);
        let err = g.resolve("path=/a.img").unwrap_err().to_string();
        assert!(err.contains("node=NAME"), "{err}");
        let err = g.resolve("node=n,direct=on").unwrap_err().to_string();
        assert!(err.contains("only serial= and readonly="), "{err}");
        let none = GraphSpec::default();
        assert!(none.resolve("path=null,size=1M").is_ok());
        // An --object group gives its limits to the shorthand's throttle-group=.
        let g = graph(&[], &["throttle-group,id=vm9,x-iops-total=500"]).unwrap();
        let d = g.resolve("path=/a.img,throttle-group=vm9").unwrap();
        assert_eq!(
            d.root.throttle().map(|t| matches!(
                t,
                ThrottleSpec::Group {
                    limits: Some(_),
                    ..
                }
            )),
            Some(true)
        );
        let err = g
            .resolve("path=/a.img,throttle-group=vm9,iops-read=5")
            .unwrap_err();
        assert!(err.to_string().contains("in --object"), "{err}");
        let err = g.resolve("path=/a.img").unwrap_err();
        assert!(
            err.to_string().contains("no throttle node names it"),
            "{err}"
        );
    }

    #[test]
    fn a_literal_comma_is_doubled() {
        let g = graph(&["driver=file,node-name=a,filename=/x,,y.img"], &[]).unwrap();
        let d = g.disk("a", false, None).unwrap();
        assert!(
            matches!(d.root, NodeSpec::File { ref path, .. } if path.as_os_str() == "/x,y.img")
        );
    }
}
