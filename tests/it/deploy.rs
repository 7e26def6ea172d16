//! The configurations shipped for deployment cannot rot: every TOML file under `config/` and
//! `deploy/`, and the one inside the Kubernetes ConfigMap, passes `edgecache check` (the real
//! binary, as an operator or `ExecStartPre` runs it).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

/// `edgecache check --config path` succeeds; its output otherwise.
fn check(path: &Path) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .env_remove("EDGECACHE_ADMIN_TOKEN")
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The block scalar under `key: |` in a YAML file, unindented (what a ConfigMap's `data`
/// entry holds; enough YAML for the file we ship).
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next().expect("the key");
    let outer = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("a non-empty block");
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_shipped_configuration_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(&root.join("config"), &mut files);
    toml_files(&root.join("deploy"), &mut files);
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("deploy/container/edgecache.toml")),
        "{files:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml"))
        .expect("the ConfigMap");
    let from_configmap = dir.path().join("configmap-edgecache.toml");
    std::fs::write(&from_configmap, block_scalar(&yaml, "edgecache.toml")).expect("write");
    files.push(from_configmap);
    let failed: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn container_and_kubernetes_configurations_listen_on_every_address_and_name_no_loopback_origin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml"))
        .expect("the ConfigMap");
    let container = std::fs::read_to_string(root.join("deploy/container/edgecache.toml"))
        .expect("the container's configuration");
    for (name, text) in [
        ("configmap", block_scalar(&yaml, "edgecache.toml")),
        ("container", container),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edgecache.toml");
        std::fs::write(&path, &text).expect("write");
        let summary = check(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(summary.contains("0.0.0.0:8080"), "{name}: {summary}");
        assert!(summary.contains("0.0.0.0:9090"), "{name}: {summary}");
        let urls: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("url"))
            .collect();
        assert!(!urls.is_empty(), "{name}");
        for url in urls {
            assert!(
                !["127.", "localhost", "[::1]"]
                    .iter()
                    .any(|l| url.contains(l)),
                "{name}: {url}: a container reaches only itself there"
            );
        }
    }
}

/// The Dockerfile ships the container configuration, and the systemd unit runs and reloads
/// the way the README says.
#[test]
fn the_dockerfile_and_the_unit_use_the_shipped_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("COPY deploy/container/edgecache.toml /etc/edgecache/edgecache.toml")
    );
    let unit =
        std::fs::read_to_string(root.join("deploy/systemd/edgecache.service")).expect("the unit");
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/edgecache run --config /etc/edgecache/edgecache.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=1048576",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
}
