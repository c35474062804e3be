//! Observability shipped with the manifests (SPEC §8), checked by the real thing.
//!
//! - The Grafana dashboard (deploy/observability/udp-director-dashboard.json) is importable: a
//!   `datasource` variable, no hard-coded data source or instance, every selector narrowed by
//!   `$instance` (and `$forwarder`, `$route` on their metrics).
//! - The alert rules (udp-director-alerts.yaml) pass `promtool check rules`, their unit tests
//!   (udp-director-alerts.test.yaml, every alert firing and staying quiet) pass `promtool test
//!   rules`, the PrometheusRule carries the same groups, and every runbook_url names a section of
//!   docs/operations.md.
//! - A real Prometheus scrapes a running proxy that carries token, forwarder and route traffic
//!   and evaluates the rules: every dashboard expression parses, the traffic panels return
//!   series that move, every variable query finds values, every rule evaluates without error,
//!   and the listen failure of a forwarder on a squatted port fires its alert. Every metric name
//!   and label the dashboard, the rules and their unit tests use is in a real scrape.
//!
//! promtool and prometheus come from Debian's `prometheus` package (scripts/setup.sh); without
//! them the tool tests say so loudly, and fail under CI=true.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ANY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;

/// Panels that may come back empty against this test's proxy, and why.
const MAY_BE_EMPTY: [&str; 2] = [
    // Kubernetes inventory only; the test's proxy reads a file.
    "Inventory watches stale",
    // Kept by the status writers, Kubernetes inventory only (tests/kubernetes_events.rs and
    // tests/kubernetes_status.rs read it against the real API server).
    "Objects with problems now",
];

/// Metrics with no series on this test's file inventory, so absent from its scrape (an empty
/// family is not encoded): kept by the Kubernetes status writers, and read with every label
/// against the real API server by tests/kubernetes_events.rs and tests/kubernetes_status.rs.
const KUBERNETES_ONLY: [&str; 1] = ["udp_director_object_problems"];

/// Series Prometheus makes itself for each target, in no scrape.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

/// Panels whose series must show traffic moving (a value above zero) while the test's
/// traffic flows, and for each the label values that must each have such a series.
const TRAFFIC: [(&str, &[(&str, &str)]); 9] = [
    (
        "Packets by direction and protocol",
        &[("direction", "upstream"), ("direction", "downstream")],
    ),
    (
        "Bytes by direction and protocol",
        &[("protocol", "udp"), ("protocol", "tcp")],
    ),
    (
        "Sessions opened by kind and protocol",
        &[("kind", "token"), ("kind", "forwarder"), ("kind", "route")],
    ),
    ("Sessions live by protocol", &[("protocol", "udp")]),
    (
        "Tokens issued, redeemed, rejected",
        &[("__legend", "issued"), ("__legend", "redeemed")],
    ),
    (
        "Queries by result",
        &[("result", "ok"), ("result", "unknown_resource_type")],
    ),
    ("Query latency", &[("__legend", "p50"), ("__legend", "p99")]),
    (
        "Forwarder traffic",
        &[("forwarder", "fw"), ("forwarder", "tcp-fw")],
    ),
    (
        "Route sessions opened by backend Service",
        &[("route", "games/voice")],
    ),
];

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

const DASHBOARD: &str = "deploy/observability/udp-director-dashboard.json";
const RULES: &str = "deploy/observability/udp-director-alerts.yaml";
const RULE_TESTS: &str = "deploy/observability/udp-director-alerts.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/observability/prometheusrule.yaml";
const RUNBOOK: &str = "docs/operations.md";

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

fn yaml(relative: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every panel, those inside collapsed rows too, rows left out.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// (panel title, expr, legendFormat) of every query of every panel.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().expect("expr").to_string(),
                t["legendFormat"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// The alerting rules: (name, expr, annotations).
fn alert_rules(rules: &serde_yaml::Value) -> Vec<(String, String, serde_yaml::Value)> {
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push((
                rule["alert"].as_str().expect("an alert name").to_string(),
                rule["expr"].as_str().expect("expr").to_string(),
                rule["annotations"].clone(),
            ));
        }
    }
    out
}

/// The dashboard's variables replaced as Grafana would with "All" selected, and its built-in
/// intervals with values fit for a 1 s scrape interval.
fn concrete(expr: &str, variables: &[String]) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    for v in variables {
        out = out
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    assert!(!out.contains('$'), "a variable left in {out}");
    out
}

// ----------------------------------------------------------------------------------------------
// A little PromQL reading: metric names, selectors and their matchers.

const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
];

/// Aggregation operators, which a `by`/`without` clause may separate from their parenthesis.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// A vector selector: the metric name and its matchers (label, operator, value).
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// The index just past the string literal that starts at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        if b[j] == b'\\' && quote != b'`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The index just past the bracket that closes the one at `i`, strings skipped.
fn skip_group(b: &[u8], i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(b, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    panic!(
        "unbalanced {} in {}",
        open as char,
        String::from_utf8_lossy(b)
    );
}

fn matchers(inside: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let b = inside.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        let label = inside[start..i].to_string();
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        let op_start = i;
        while matches!(b[i], b'=' | b'!' | b'~') {
            i += 1;
        }
        let op = inside[op_start..i].to_string();
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        let end = skip_string(b, i);
        let value = inside[i + 1..end - 1].to_string();
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "cannot read the matchers {inside:?}"
        );
        out.push((label, op, value));
        i = end;
    }
    out
}

/// Every vector selector of a PromQL expression.
fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i);
        } else if c == b'[' {
            i = skip_group(b, i, b'[', b']');
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let next = b.get(j).copied();
            if KEYWORDS.contains(&word) {
                // A label list follows some of them: `by (a, b)`.
                if next == Some(b'(') && word != "and" && word != "or" && word != "unless" {
                    i = skip_group(b, j, b'(', b')');
                }
                continue;
            }
            if next == Some(b'(') || AGGREGATIONS.contains(&word) {
                continue; // a function or an aggregation (`sum by (a) (…)`)
            }
            if word.eq_ignore_ascii_case("inf") || word.eq_ignore_ascii_case("nan") {
                continue;
            }
            let (selector_matchers, end) = if next == Some(b'{') {
                let end = skip_group(b, j, b'{', b'}');
                (matchers(&expr[j + 1..end - 1]), end)
            } else {
                (Vec::new(), i)
            };
            out.push(Selector {
                metric: word.to_string(),
                matchers: selector_matchers,
            });
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

// ----------------------------------------------------------------------------------------------
// What a scrape of the proxy holds.

/// Metric name → (label name → values seen), from a Prometheus text exposition; families
/// declared by `# TYPE` without samples (a Kubernetes-only gauge on a file inventory) are in
/// with no labels.
fn scrape_index(text: &str) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut index: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            for n in names {
                index.entry(n).or_default();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap();
        let entry = index.entry(line[..name_end].to_string()).or_default();
        if line.as_bytes()[name_end] == b'{' {
            let close = line.rfind('}').unwrap();
            for (label, _, value) in matchers(&line[name_end + 1..close]) {
                entry.entry(label).or_default().insert(value);
            }
        }
    }
    index
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Whether a scrape shows every value `label` of `metric` can take: not for object names (a
/// forwarder's, a route's, a Service's), nor for query results (each appears with its first
/// answer).
fn values_known(metric: &str, label: &str) -> bool {
    let object_name = ["forwarder", "route", "service"].contains(&label);
    let query_result = metric == "udp_director_queries_total" && label == "result";
    !object_name && !query_result
}

/// Every metric of `selectors` is in the scrape, with every label its matchers name; every
/// value a positive matcher asks for (a plain word or alternatives of plain words) is one the
/// proxy exports. Returns the problems found.
fn check_against_scrape(
    what: &str,
    selectors: &[Selector],
    index: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for s in selectors {
        if KUBERNETES_ONLY.contains(&s.metric.as_str())
            || PROMETHEUS_OWN.contains(&s.metric.as_str())
        {
            continue;
        }
        let Some(labels) = index.get(&s.metric) else {
            problems.push(format!("{what}: {} is not in a scrape", s.metric));
            continue;
        };
        let has_samples = !labels.is_empty()
            || s.matchers
                .iter()
                .all(|(l, _, _)| TARGET_LABELS.contains(&l.as_str()));
        for (label, op, value) in &s.matchers {
            if TARGET_LABELS.contains(&label.as_str()) || !has_samples {
                continue;
            }
            let Some(values) = labels.get(label) else {
                problems.push(format!("{what}: {} has no label {label}", s.metric));
                continue;
            };
            let plain = |v: &str| {
                !v.is_empty()
                    && v.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            };
            if (op == "=" || op == "=~")
                && value.split('|').all(plain)
                && values_known(&s.metric, label)
            {
                for v in value.split('|') {
                    if !values.contains(v) {
                        problems.push(format!(
                            "{what}: {}{{{label}=\"{v}\"}} is not in the scrape (it has {values:?})",
                            s.metric
                        ));
                    }
                }
            }
        }
    }
    problems
}

// ----------------------------------------------------------------------------------------------
// Tests that need no tools.

#[test]
fn the_dashboard_is_importable_and_narrowed_by_its_variables() {
    let d = dashboard();
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "Grafana 9.4+ schema"
    );
    let variables = d["templating"]["list"].as_array().unwrap();
    let names: Vec<&str> = variables
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for name in ["instance", "forwarder", "route"] {
        let v = variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["allValue"], ".*", "{name}");
        // A plain query string: what every Grafana version reads the same way.
        assert_eq!(v["query"], v["definition"], "{name}");
    }
    assert!(names.len() == 4, "{names:?}");

    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id {}",
            p["id"]
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{}", p["title"]);
    }
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    // Every selector is narrowed by the instance variable (so none names an instance), and
    // the per-forwarder and per-route ones by theirs.
    for (title, expr, _) in dashboard_queries(&d) {
        let found = selectors(&expr);
        assert!(!found.is_empty(), "{title}: no metric in {expr}");
        for s in found {
            let has = |label: &str, variable: &str| {
                s.matchers
                    .iter()
                    .any(|(l, op, v)| l == label && op == "=~" && v == variable)
            };
            assert!(
                has("instance", "$instance"),
                "{title}: {} without instance=~\"$instance\"",
                s.metric
            );
            assert!(
                !s.metric.starts_with("udp_director_forwarder_") || has("forwarder", "$forwarder"),
                "{title}: {} without forwarder=~\"$forwarder\"",
                s.metric
            );
            assert!(
                !s.metric.starts_with("udp_director_route_") || has("route", "$route"),
                "{title}: {} without route=~\"$route\"",
                s.metric
            );
        }
    }
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_is_documented_unit_tested_and_in_the_prometheus_rule() {
    let rules = yaml(RULES);
    let prometheus_rule = yaml(PROMETHEUS_RULE);
    assert_eq!(prometheus_rule["kind"], "PrometheusRule");
    assert_eq!(prometheus_rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        prometheus_rule["spec"]["groups"], rules["groups"],
        "{PROMETHEUS_RULE} and {RULES} differ: the PrometheusRule must carry the same groups"
    );

    let runbook = read(RUNBOOK);
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let tests = yaml(RULE_TESTS);
    let alerts = alert_rules(&rules);
    assert!(alerts.len() >= 7, "{alerts:?}");
    for (name, _, annotations) in &alerts {
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                annotations[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no {key}"
            );
        }
        let url = annotations["runbook_url"].as_str().unwrap();
        let (doc, section) = url
            .rsplit_once('#')
            .unwrap_or_else(|| panic!("{name}: {url} names no section"));
        assert!(doc.ends_with(RUNBOOK), "{name}: {url}");
        assert!(
            anchors.contains(section),
            "{name}: {RUNBOOK} has no section #{section}"
        );
        // Unit-tested both ways: a case where it fires and one where it stays quiet.
        let cases: Vec<&serde_yaml::Value> = tests["tests"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
            .filter(|c| c["alertname"].as_str() == Some(name))
            .collect();
        let fires = cases
            .iter()
            .any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()));
        let quiet = cases
            .iter()
            .any(|c| c["exp_alerts"].as_sequence().is_none_or(|a| a.is_empty()));
        assert!(fires, "{RULE_TESTS}: no case where {name} fires");
        assert!(quiet, "{RULE_TESTS}: no case where {name} stays quiet");
    }
}

// ----------------------------------------------------------------------------------------------
// promtool

/// True when `tool` runs; otherwise says so loudly (a failure under CI=true).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_test(&format!(
            "{tool} not found (scripts/setup.sh installs Debian's prometheus package)"
        ));
    }
    found
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = Command::new("promtool")
            .args(&args[..2])
            .arg(repo_path(args[2]))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ----------------------------------------------------------------------------------------------
// A real Prometheus scraping a real proxy.

/// A `prometheus` process, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(admin: SocketAddr, rules: &Path) -> Self {
        let dir = scratch_dir();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{rules:?}]\n\
                 scrape_configs:\n\
                 - job_name: udp-director\n  static_configs: [{{targets: ['{admin}']}}]\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self { child, addr, dir };
        prometheus.eventually("prometheus is ready", |p| p.get("/-/ready").0 == 200);
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET over HTTP/1.0 (a plain body, never chunked): (status, body).
    fn get(&self, path_and_query: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: test\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    }

    /// An API call's `data`, panicking unless the answer is `status: success`.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let (code, body) = self.get(&format!("{path}?{}", query.join("&")));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path} {params:?}: HTTP {code}, {e}: {body}"));
        assert_eq!(
            answer["status"], "success",
            "{path} {params:?}: HTTP {code}: {answer}"
        );
        answer["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().unwrap().clone(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => panic!("{expr}: result type {other:?}"),
        }
    }

    fn eventually(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}\n--- prometheus log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}--- end ---", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding of a query-string component.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The selector and the label of a Grafana `label_values(selector, label)` variable query.
fn label_values(definition: &str) -> (&str, &str) {
    let inner = definition
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{definition}: not label_values(selector, label)"));
    let (selector, label) = inner.rsplit_once(',').unwrap();
    (selector.trim(), label.trim())
}

fn value_of(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A `Forwarder` list entry.
fn forwarder(name: &str, protocol: &str, listen: u16, host: &str, port: u16) -> String {
    format!(
        "- apiVersion: udp-director.dev/v1alpha1\n  kind: Forwarder\n  metadata: {{name: {name}, \
         namespace: games, creationTimestamp: \"2025-01-01T00:00:00Z\"}}\n  spec: {{{protocol}: \
         {{listenPort: {listen}, targetHost: \"{host}\", targetPort: {port}}}}}\n"
    )
}

fn answers(c: &UdpSocket, to: SocketAddr) -> bool {
    if c.send_to(b"ping", to).is_err() {
        return false;
    }
    datagram_within(c, Duration::from_millis(500)).as_deref() == Some(b"ping")
}

/// One exchange with a tagged TCP echo (its tag byte comes first, once).
fn tcp_answers(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while !got.ends_with(b"ping") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

#[test]
fn a_real_prometheus_scraping_the_proxy_evaluates_every_panel_and_rule() {
    if !have("prometheus") {
        return;
    }
    let game = Echo::plain();
    let voice = Echo::plain();
    let forwarded = Echo::plain();
    let tcp_echo = TcpEcho::tagged(b'T');
    let (fw_port, tcp_port) = (free_port(), free_port());
    // Another process's socket on a forwarder's port: its listener cannot open ("listen").
    let squatted_port = free_port();
    let _squatter = UdpSocket::bind(("127.0.0.1", squatted_port)).unwrap();
    let inventory = gameserver("gs", "Ready", game.addr, "")
        + &route_to(voice.addr)
        + &forwarder("fw", "udp", fw_port, "127.0.0.1", forwarded.addr.port())
        + &forwarder("tcp-fw", "tcp", tcp_port, "127.0.0.1", tcp_echo.addr.port())
        + &forwarder("squatted", "udp", squatted_port, "127.0.0.1", 9)
        // A Service the inventory does not have: its target does not resolve ("resolve").
        + &forwarder("unresolved", "udp", free_port(), "nosuch.games.svc", 9);
    let proxy = Proxy::start(
        &base_config("forwarders: {namespace: games}\nentryPoints: [{name: voice, port: 0}]\n"),
        &inventory,
    );
    let fw = SocketAddr::from(([127, 0, 0, 1], fw_port));
    let tcp_at = SocketAddr::from(([127, 0, 0, 1], tcp_port));
    let entry = proxy.entry_addr("voice");
    proxy.eventually("the forwarder listens", |_| answers(&client(), fw));
    proxy.eventually("the TCP forwarder listens", |_| {
        TcpStream::connect(tcp_at).is_ok()
    });
    proxy.eventually("the squatted and unresolved forwarders are counted", |p| {
        p.metric(r#"udp_director_forwarder_errors_total{forwarder="squatted",type="listen"}"#)
            >= 1.0
            && p.metric(
                r#"udp_director_forwarder_errors_total{forwarder="unresolved",type="resolve"}"#,
            ) >= 1.0
    });

    let rules = repo_path(RULES);
    let prometheus = Prometheus::start(proxy.admin, &rules);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Traffic of every kind, all along: queries (one an error), a token session on the
        // data port, a stranger dropped there, the route, both forwarders.
        scope.spawn(|| {
            let player = client();
            player
                .send_to(proxy.token(ANY).as_bytes(), proxy.data_addr())
                .unwrap();
            let _ = datagram_within(&player, Duration::from_millis(500));
            let (on_route, on_fw, stranger) = (client(), client(), client());
            let mut tcp = tcp_client(tcp_at);
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if round.is_multiple_of(5) {
                    let _ = proxy.token(ANY);
                    let _ = proxy.query(r#"{"resourceType":"nosuch"}"#);
                    // A new token session now and then, so sessions keep opening.
                    let _ = client().send_to(proxy.token(ANY).as_bytes(), proxy.data_addr());
                    let _ = answers(&client(), entry);
                    let _ = answers(&client(), fw);
                    tcp = tcp_client(tcp_at);
                }
                let _ = answers(&player, proxy.data_addr());
                let _ = answers(&on_route, entry);
                let _ = answers(&on_fw, fw);
                let _ = stranger.send_to(b"who", proxy.data_addr());
                let _ = tcp_answers(&mut tcp);
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            evaluate(&proxy, &prometheus);
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

/// What the test checks once Prometheus scrapes the busy proxy.
fn evaluate(proxy: &Proxy, prometheus: &Prometheus) {
    // A few scrapes, all up, and every rule evaluated at least once.
    prometheus.eventually("10 scrapes of the proxy", |p| {
        p.query(r#"count_over_time(up{job="udp-director"}[1m]) >= 10"#)
            .len()
            == 1
    });
    assert_eq!(
        value_of(&prometheus.query(r#"min_over_time(up{job="udp-director"}[1m])"#)[0]),
        1.0,
        "every scrape succeeded"
    );
    let rules = |p: &Prometheus| -> Vec<Value> {
        p.api("/api/v1/rules", &[])["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect()
    };
    prometheus.eventually("every rule evaluated", |p| {
        let r = rules(p);
        !r.is_empty() && r.iter().all(|r| r["health"] != "unknown")
    });
    let loaded = rules(prometheus);
    assert_eq!(
        loaded.len(),
        alert_rules(&yaml(RULES)).len(),
        "every rule loaded"
    );
    for r in &loaded {
        assert_eq!(
            r["health"], "ok",
            "rule {} fails: {}",
            r["name"], r["lastError"]
        );
    }
    // The squatted forwarder's listen failure fires; nothing that is fine does.
    let alerts = prometheus.api("/api/v1/alerts", &[])["alerts"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        alerts.iter().any(
            |a| a["labels"]["alertname"] == "UdpDirectorForwarderListenFailed"
                && a["labels"]["forwarder"] == "squatted"
        ),
        "the listen failure fires: {alerts:?}"
    );
    for quiet in [
        "UdpDirectorDown",
        "UdpDirectorRestarting",
        "UdpDirectorThreadDown",
        "UdpDirectorDescriptorsNearLimit",
        "UdpDirectorReloadRefused",
        "UdpDirectorRouteNoReadyEndpoints",
        "UdpDirectorStatusWritesFailing",
        "UdpDirectorEventsFailing",
    ] {
        assert!(
            !alerts.iter().any(|a| a["labels"]["alertname"] == quiet),
            "{quiet} fires on a healthy proxy: {alerts:?}"
        );
    }

    // Every panel's query parses and evaluates; all but MAY_BE_EMPTY return series, and those
    // series carry the labels their legends name.
    let d = dashboard();
    let variables: Vec<String> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut results: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for (title, expr, legend) in dashboard_queries(&d) {
        let series = prometheus.query(&concrete(&expr, &variables));
        if !MAY_BE_EMPTY.contains(&title.as_str()) {
            assert!(!series.is_empty(), "{title}: {expr} returns no series");
        }
        for label in legend
            .split("{{")
            .skip(1)
            .filter_map(|s| s.split_once("}}"))
        {
            let label = label.0.trim();
            for s in &series {
                assert!(
                    s["metric"][label].is_string(),
                    "{title}: {expr}: the legend's {label} is not in {s}"
                );
            }
        }
        results
            .entry(title)
            .or_default()
            .extend(series.into_iter().map(|s| (legend.clone(), s)));
    }
    for (title, wanted) in TRAFFIC {
        let series = results
            .get(title)
            .unwrap_or_else(|| panic!("no panel {title}"));
        let moving = |label: &str, value: &str| {
            series.iter().any(|(legend, s)| {
                let matches = if label == "__legend" {
                    legend == value
                } else {
                    s["metric"][label] == value
                };
                matches && value_of(s) > 0.0
            })
        };
        for (label, value) in wanted {
            assert!(
                moving(label, value),
                "{title}: no series with {label}={value} above zero: {series:?}"
            );
        }
    }

    // Every variable's query finds values.
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let definition = v["definition"].as_str().unwrap();
        let (selector, label) = label_values(definition);
        let found = prometheus.api(
            "/api/v1/series",
            &[("match[]", &concrete(selector, &variables))],
        );
        let values: BTreeSet<&str> = found
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s[label].as_str())
            .collect();
        assert!(!values.is_empty(), "{definition} finds nothing");
    }

    // Every metric and label the dashboard, the rules and their unit tests use is one a real
    // scrape of the proxy has.
    let (status, text) = proxy.http("GET", "/metrics");
    assert_eq!(status, 200);
    let index = scrape_index(&text);
    let mut problems = Vec::new();
    for (title, expr, _) in dashboard_queries(&d) {
        problems.extend(check_against_scrape(
            &format!("dashboard {title}"),
            &selectors(&expr),
            &index,
        ));
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(definition) = v["definition"].as_str() {
            let (selector, label) = label_values(definition);
            let found = selectors(selector);
            problems.extend(check_against_scrape(
                &format!("variable {}", v["name"]),
                &found,
                &index,
            ));
            let labelled = |s: &Selector| {
                TARGET_LABELS.contains(&label)
                    || index
                        .get(&s.metric)
                        .is_some_and(|labels| labels.contains_key(label))
            };
            if !found.iter().all(labelled) {
                problems.push(format!("variable {}: no label {label}", v["name"]));
            }
        }
    }
    for (name, expr, _) in alert_rules(&yaml(RULES)) {
        problems.extend(check_against_scrape(
            &format!("rule {name}"),
            &selectors(&expr),
            &index,
        ));
    }
    for t in yaml(RULE_TESTS)["tests"].as_sequence().unwrap() {
        for s in t["input_series"].as_sequence().into_iter().flatten() {
            let series = s["series"].as_str().unwrap();
            problems.extend(check_against_scrape(
                &format!("{RULE_TESTS} input {series}"),
                &selectors(series),
                &index,
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_promql_reader_finds_metrics_and_matchers() {
    let found = selectors(
        r#"sum by (instance, reason) (rate(a_total{reason=~"x|y", b!="c"}[5m] offset 1h)) / on (instance) group_left max(b) > 0.9 unless c{d="e,f"} or vector(0) and histogram_quantile(0.5, sum by (le) (rate(d_bucket[1m]))) + sum without (x) (Inf * e)"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["a_total", "b", "c", "d_bucket", "e"]);
    assert_eq!(
        found[0].matchers,
        [
            ("reason".into(), "=~".into(), "x|y".into()),
            ("b".into(), "!=".into(), "c".into())
        ]
    );
    assert_eq!(found[2].matchers, [("d".into(), "=".into(), "e,f".into())]);
    let index = scrape_index(
        "# TYPE a counter\na_total{reason=\"x\"} 1\n# TYPE h histogram\n# TYPE g gauge\n",
    );
    assert!(index.contains_key("h_bucket") && index.contains_key("g"));
    assert_eq!(
        check_against_scrape("t", &selectors(r#"a_total{reason=~"x|z"}"#), &index),
        ["t: a_total{reason=\"z\"} is not in the scrape (it has {\"x\"})"]
    );
    assert!(check_against_scrape("t", &selectors(r#"g{any="thing"}"#), &index).is_empty());
    assert_eq!(
        check_against_scrape("t", &selectors("nope"), &index),
        ["t: nope is not in a scrape"]
    );
}
