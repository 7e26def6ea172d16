//! The configurations shipped for deployment cannot rot: every TOML file under `config/` and
//! `deploy/`, and the ones inside the Kubernetes ConfigMaps (single node and fleet), pass
//! `edgecache check` (the real binary, as an operator or `ExecStartPre` runs it).

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

/// The ConfigMaps shipped, relative to the repository: each holds `edgecache.toml`.
const CONFIGMAPS: [&str; 3] = [
    "deploy/kubernetes/configmap.yaml",
    "deploy/kubernetes/fleet/configmap.yaml",
    "deploy/kubernetes/fleet-etcd/configmap.yaml",
];

/// The pod IP the fleet's StatefulSet passes in `POD_IP` (the downward API).
const POD_IP: &str = "10.42.0.7";

/// `edgecache check --config path` succeeds; its output otherwise. The environment is a
/// fleet pod's: `POD_IP` set, no admin token.
fn check(path: &Path) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .env_remove("EDGECACHE_ADMIN_TOKEN")
        .env("POD_IP", POD_IP)
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
    for (i, configmap) in CONFIGMAPS.iter().enumerate() {
        let yaml = std::fs::read_to_string(root.join(configmap)).expect("the ConfigMap");
        let from_configmap = dir.path().join(format!("configmap-{i}-edgecache.toml"));
        std::fs::write(&from_configmap, block_scalar(&yaml, "edgecache.toml")).expect("write");
        files.push(from_configmap);
    }
    let failed: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn container_and_kubernetes_configurations_listen_on_every_address_and_name_no_loopback_origin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let container = std::fs::read_to_string(root.join("deploy/container/edgecache.toml"))
        .expect("the container's configuration");
    let mut texts = vec![("deploy/container/edgecache.toml", container)];
    for configmap in CONFIGMAPS {
        let yaml = std::fs::read_to_string(root.join(configmap)).expect("the ConfigMap");
        texts.push((configmap, block_scalar(&yaml, "edgecache.toml")));
    }
    for (name, text) in texts {
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

/// The fleet's pods: the node id is the host name (the StatefulSet's stable pod name, so no
/// `node` in the file), peers dial the pod IP from `POD_IP`, and the members come from the
/// StatefulSet's own headless Service (peers_dns) or from etcd.
#[test]
fn fleet_pods_advertise_their_pod_ip_and_take_the_host_name_as_node_id() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
    let statefulset = read("deploy/kubernetes/fleet/statefulset.yaml");
    let peers = read("deploy/kubernetes/fleet/service-peers.yaml");
    for line in [
        "serviceName: edgecache-fleet-peers",
        "- name: POD_IP",
        "fieldPath: status.podIP",
        "containerPort: 7400",
        "name: edgecache-fleet",
    ] {
        assert!(statefulset.lines().any(|l| l.trim() == line), "{line}");
    }
    for line in ["name: edgecache-fleet-peers", "clusterIP: None"] {
        assert!(peers.lines().any(|l| l.trim() == line), "{line}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the host name");
    let dir = tempfile::tempdir().expect("tempdir");
    for (configmap, found) in [
        (
            CONFIGMAPS[1],
            "members from DNS edgecache-fleet-peers.default.svc.cluster.local:7400",
        ),
        (
            CONFIGMAPS[2],
            "members from etcd http://etcd.default.svc.cluster.local:2379",
        ),
    ] {
        let text = block_scalar(&read(configmap), "edgecache.toml");
        assert!(!text.lines().any(|l| l.starts_with("node")), "{configmap}");
        let path = dir.path().join("edgecache.toml");
        std::fs::write(&path, &text).expect("write");
        let summary = check(&path).unwrap_or_else(|e| panic!("{e}"));
        for part in [
            format!("node {}", host.trim()),
            format!("advertised {POD_IP}:7400"),
            found.to_owned(),
        ] {
            assert!(
                summary.contains(&part),
                "{configmap}: {part:?} not in {summary}"
            );
        }
    }
}
