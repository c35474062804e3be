//! Harness for end-to-end tests: runs the real `udp-director` binary on loopback (every port 0)
//! with a file inventory in a scratch directory, and talks to it over real sockets.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use testkit::*;

pub mod agones;
pub mod cluster;
pub mod netns;

/// A running proxy process and its scratch directory.
pub struct Proxy {
    pub child: Child,
    pub dir: PathBuf,
    pub query: SocketAddr,
    pub admin: SocketAddr,
    /// Data port name → bound address.
    pub data: Vec<(String, SocketAddr)>,
    /// Route entry point name → bound address.
    pub entry: Vec<(String, SocketAddr)>,
}

/// A scratch directory unique to this test process and call.
pub fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "udp-director-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The config every test starts from: all ports 0 on loopback, file inventory `inventory.yaml`.
pub fn base_config(extra: &str) -> String {
    format!(
        r#"
bindAddress: 127.0.0.1
queryPort: 0
dataPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
inventory: {{kind: file, path: inventory.yaml, pollIntervalMillis: 50}}
resourceQueryMapping:
  gameserver: {{group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: default}}
{extra}"#
    )
}

/// One Agones GameServer object at `addr`.
pub fn gameserver(name: &str, state: &str, addr: SocketAddr, labels: &str) -> String {
    format!(
        r#"- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: {name}, namespace: starx, labels: {{agones.dev/fleet: f1{labels}}}}}
  status: {{state: {state}, address: "{}", ports: [{{name: default, port: {}}}]}}
"#,
        addr.ip(),
        addr.port()
    )
}

impl Proxy {
    /// Writes `config` and `inventory` into a scratch dir, starts the binary on them and waits
    /// until it has loaded the inventory.
    pub fn start(config: &str, inventory: &str) -> Self {
        let proxy = Self::launch(config, inventory, &[]);
        proxy.eventually("inventory loaded", |p| {
            !std::fs::exists(p.dir.join("inventory.yaml")).unwrap()
                || p.http("GET", "/readyz").0 == 200
        });
        proxy
    }

    /// Starts the binary with extra environment variables, once it has printed its addresses;
    /// it may not be ready yet.
    pub fn launch(config: &str, inventory: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        Self::launch_under(&[], config, inventory, env)
    }

    /// [`Self::launch`], run by `wrapper` (a command and its arguments, e.g. `setpriv` with
    /// capabilities dropped) when it is not empty.
    pub fn launch_under(
        wrapper: &[&str],
        config: &str,
        inventory: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let dir = scratch_dir();
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        if !inventory.is_empty() {
            std::fs::write(dir.join("inventory.yaml"), inventory).unwrap();
        }
        let config = dir.join("config.yaml");
        Self::spawn(wrapper, dir, &config, env)
    }

    /// Runs the binary on the config file `config` (another proxy's, say), logging into
    /// `dir`, once it has printed its addresses.
    pub fn spawn(
        wrapper: &[&str],
        dir: PathBuf,
        config: &std::path::Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let binary = env!("CARGO_BIN_EXE_udp-director");
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let mut child = command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
            panic!("the proxy did not start:\n{log}");
        }
        let field = |key: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .to_string()
        };
        // `name/udp=addr,name/tcp=addr`
        let ports = |list: &str| -> Vec<(String, SocketAddr)> {
            list.split(',')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let (port, addr) = d.split_once('=').unwrap();
                    let name = port.split_once('/').map_or(port, |(name, _)| name);
                    (name.to_string(), addr.parse().unwrap())
                })
                .collect()
        };
        let data = ports(&field("data"));
        let entry = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("entry="))
            .map(ports)
            .unwrap_or_default();
        Self {
            query: field("query").parse().unwrap(),
            admin: field("admin").parse().unwrap(),
            data,
            entry,
            child,
            dir,
        }
    }

    /// What the proxy has logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    /// Entry point `name`'s address.
    pub fn entry_addr(&self, name: &str) -> SocketAddr {
        self.entry
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no entry point {name}"))
            .1
    }

    /// The first data port's address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data[0].1
    }

    /// Replaces the inventory file (picked up within the poll interval).
    pub fn write_inventory(&self, inventory: &str) {
        let tmp = self.dir.join("inventory.yaml.tmp");
        std::fs::write(&tmp, inventory).unwrap();
        std::fs::rename(tmp, self.dir.join("inventory.yaml")).unwrap();
    }

    /// Sends raw bytes on a new query connection and returns every answer line until close.
    pub fn query_raw(&self, bytes: &[u8]) -> Vec<serde_json::Value> {
        let mut s = TcpStream::connect(self.query).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    /// One query, one answer.
    pub fn query(&self, json: &str) -> serde_json::Value {
        let mut answers = self.query_raw(format!("{json}\n").as_bytes());
        assert_eq!(answers.len(), 1, "{answers:?}");
        answers.remove(0)
    }

    /// Queries and returns the token, panicking on an error answer.
    pub fn token(&self, json: &str) -> String {
        let a = self.query(json);
        a["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token: {a}"))
            .to_string()
    }

    /// A minimal HTTP/1.1 request to the admin port: (status, body).
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        http_request(self.admin, method, path, "")
    }

    /// The value of a metric line (exact name with labels), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http("GET", "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Every live session, following `GET /sessions`'s pages to the last.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut path = "/sessions".to_string();
        loop {
            let (status, body) = self.http("GET", &path);
            assert_eq!(status, 200, "{body}");
            let mut page: serde_json::Value = serde_json::from_str(&body).unwrap();
            all.append(page["sessions"].as_array_mut().expect("a sessions list"));
            match page["continue"].as_str() {
                Some(token) => path = format!("/sessions?continue={token}"),
                None => return all,
            }
        }
    }

    pub fn eventually(&self, what: &str, f: impl FnMut(&Self) -> bool) {
        self.eventually_within(Duration::from_secs(10), what, f);
    }

    pub fn eventually_within(&self, limit: Duration, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}--- end of proxy log ---", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.1 request with extra header lines (each ending in `\r\n`): (status, body);
/// status 0 when the connection failed or closed without an answer.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
    );
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

pub fn control_packet(token: &str) -> Vec<u8> {
    let mut p = b"\xFF\xFF\xFF\xFFRESET".to_vec();
    p.extend_from_slice(token.as_bytes());
    p
}

/// Runs the binary with arguments and returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_udp-director"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A Service `voice` in `games` whose one ready endpoint is `endpoint`, and a Route on entry
/// point `voice` to it.
pub fn route_to(endpoint: SocketAddr) -> String {
    format!(
        "- {{apiVersion: v1, kind: Service, metadata: {{name: voice, namespace: games}}, spec: {{ports: [{{name: voice, port: 5000}}]}}}}\n\
         - {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: voice-1, namespace: games, labels: {{kubernetes.io/service-name: voice}}}}, \
         ports: [{{name: voice, port: {}}}], endpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]}}\n\
         - {{apiVersion: udp-director.dev/v1alpha1, kind: Route, metadata: {{name: voice, namespace: games}}, \
         spec: {{entryPoint: voice, rules: [{{backends: [{{service: voice, port: voice}}]}}]}}}}\n",
        endpoint.port(),
        endpoint.ip()
    )
}
