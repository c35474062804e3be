//! The YAML config loader (control/src/config.rs): `Config::from_yaml` on the input as UTF-8
//! text (invalid UTF-8 is skipped: `Config::load` reads the file with `read_to_string`, which
//! refuses it before any parsing). Nothing may panic; an accepted config must hold what the
//! validation promises, turn into a data plane config, and give a watch plan and RBAC rules
//! (`udp-director rbac`) that are YAML.
//!
//! `tokenSecret.file` is read while loading: the target writes a valid, an invalid and an
//! empty key file to `/tmp/udp-director-fuzz-config/` (`keys`, `bad`, `empty`) and skips inputs
//! whose `tokenSecret.file` names anything but a plain file name in that directory (a fuzzed
//! `/dev/zero` or FIFO would hang the run, not find a bug).
#![no_main]

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use control::config::Config;
use control::inventory::kube::{cluster_role, forwarders_role, plan};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "550e8400-e29b-41d4-a716-446655440000";

/// Where the key files are; the only directory a fuzzed config may name a key file in. (Not
/// the working directory: libFuzzer writes the corpus by relative path.)
const KEY_DIR: &str = "/tmp/udp-director-fuzz-config/";

static KEY_FILES: LazyLock<()> = LazyLock::new(|| {
    std::fs::create_dir_all(KEY_DIR).expect("the key file directory");
    let files = [
        (
            "keys",
            "# two keys\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\nHxwdHhscGRoXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=\n",
        ),
        ("bad", "not base64\n"),
        ("empty", ""),
    ];
    for (name, text) in files {
        // Through a rename: a parallel job never reads a half-written file.
        let tmp = format!("{KEY_DIR}.{name}.{}", std::process::id());
        std::fs::write(&tmp, text).expect("a key file");
        std::fs::rename(&tmp, format!("{KEY_DIR}{name}")).expect("a key file");
    }
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    LazyLock::force(&KEY_FILES);
    if !key_file_is_safe(text) {
        return;
    }
    let Ok(config) = Config::from_yaml(text) else {
        return;
    };
    accepted(&config);
});

/// Whether loading `text` reads no file but one in KEY_DIR: `tokenSecret`, when present, must
/// be `{file: KEY_DIR/NAME}` with a plain NAME.
fn key_file_is_safe(text: &str) -> bool {
    use serde_yaml::Value;
    if !text.contains("tokenSecret") && !text.contains('\\') && !text.contains('!') {
        return true; // no key spelled out, escaped or tagged
    }
    let Ok(root) = serde_yaml::from_str::<Value>(text) else {
        return false;
    };
    let Some(map) = root.as_mapping() else {
        return true; // not a mapping: refused before any file is read
    };
    if map.keys().any(|k| !k.is_string()) {
        return false;
    }
    let Some(secret) = map.get("tokenSecret") else {
        return true;
    };
    match secret.get("file") {
        Some(Value::String(path)) => path
            .strip_prefix(KEY_DIR)
            .is_some_and(|name| name.len() <= 16 && !name.contains('/') && !name.starts_with('.')),
        _ => false,
    }
}

fn accepted(config: &Config) {
    // controlPacketMagicBytes: 1 to 32 bytes.
    assert!((1..=32).contains(&config.control_magic.len()));
    let mut packet = config.control_magic.clone();
    packet.extend_from_slice(TOKEN.as_bytes());
    assert!(matches!(
        dataplane::policy::packet::classify(&packet, &config.control_magic),
        dataplane::policy::packet::Classified::Control(_)
    ));
    // Data ports: at least one, names unique.
    assert!(!config.data_ports.is_empty());
    let names: BTreeSet<&str> = config.data_ports.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names.len(),
        config.data_ports.len(),
        "data port names are unique"
    );
    // The durations validated to 1 s ..= 1 day.
    for d in [
        config.token_ttl,
        config.session_timeout,
        config.tcp_token_timeout,
        config.query_idle_timeout,
    ] {
        assert!(
            d >= Duration::from_secs(1) && d <= Duration::from_secs(86_400),
            "{d:?}"
        );
    }
    assert!(config.drain <= Duration::from_secs(3600));
    assert!(config.max_sessions >= 1 && config.max_query_connections >= 1);
    if let Some(q) = &config.default_endpoint {
        assert_eq!(q.validate(), Ok(()));
        assert!(config.mappings.contains_key(&q.resource_type));
    }
    if let Some(secret) = &config.token_secret {
        assert!(!secret.keys.is_empty());
        assert!(config.data_ports.len() <= dataplane::policy::seal::MAX_SEALED_PORTS);
    }
    let dp = config.dataplane();
    assert_eq!(dp.data_ports.len(), config.data_ports.len());
    assert_eq!(dp.control_magic, config.control_magic);

    let plans = plan(config);
    for p in &plans {
        let _ = p.name();
    }
    let rbac = cluster_role(config, "udp-director");
    yaml_documents(&rbac, "cluster_role");
    let role = forwarders_role(config, "udp-director");
    if !role.is_empty() {
        yaml_documents(&role, "forwarders_role");
    }
}

/// The generated RBAC text parses as YAML.
fn yaml_documents(text: &str, what: &str) {
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(text) {
        if let Err(e) = serde_yaml::Value::deserialize(doc) {
            panic!("{what} is not YAML: {e}\n{text}");
        }
    }
}
