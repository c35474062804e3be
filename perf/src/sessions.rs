//! `sessions`: N concurrent sessions through the proxy, spread over M backends. Measures how
//! fast they are set up (a token query, the token datagram, then one datagram out and its
//! reply back per client socket), the proxy's resident memory per session, and that every
//! session still reaches its own client afterwards.
//!
//! A process's open-file limit (20,000 on the development machines, and root cannot raise it)
//! caps the client sockets one process can hold, so the clients live in child processes
//! (`sessions-client`), at most `--per-process` each, every child on its own source address
//! (127.0.1.k) so the ephemeral ports of one address are not the limit either. The backends
//! are one multi-socket echo in this process.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::echo::MultiEcho;
use crate::proxy::{ProxyArgs, Server, raise_fd_limit, status_kib};

#[derive(Debug, clap::Args)]
pub(crate) struct SessionsArgs {
    /// Concurrent sessions to open.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) sessions: usize,
    /// Backends (echo sockets) the sessions are spread over.
    #[arg(long, default_value_t = 1)]
    pub(crate) backends: usize,
    /// Most client sockets per client process.
    #[arg(long, default_value_t = 15_000)]
    pub(crate) per_process: usize,
    /// Setups in flight at once, per client process.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch: usize,
    #[command(flatten)]
    pub(crate) proxy: ProxyArgs,
    /// Label for the JSON line.
    #[arg(long, default_value = "sessions")]
    pub(crate) label: String,
}

/// One client process's share (internal: started by `sessions`).
#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    /// The proxy's data port.
    #[arg(long)]
    target: SocketAddr,
    /// The proxy's query port.
    #[arg(long)]
    query: SocketAddr,
    /// Client sockets in this process.
    #[arg(long)]
    count: usize,
    /// Global index of this process's first client (its id on the wire).
    #[arg(long)]
    first: usize,
    /// Backends: client `i` asks for backend `s{i % backends}`.
    #[arg(long)]
    backends: usize,
    /// Source address of this process's sockets.
    #[arg(long)]
    bind_ip: Ipv4Addr,
    /// Setups in flight at once.
    #[arg(long)]
    batch: usize,
}

struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ClientProcess {
    /// The child's next report line, split into numbers after its keyword.
    fn expect(&mut self, keyword: &str) -> anyhow::Result<Vec<u64>> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        if words.next() != Some(keyword) {
            bail!("a client process said {line:?}, not {keyword}");
        }
        words
            .map(|w| w.parse::<u64>().context("a client's number"))
            .collect()
    }

    fn say(&mut self, word: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{word}")?;
        Ok(())
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn run(args: &SessionsArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    if args.backends == 0 || args.per_process == 0 {
        bail!("--backends and --per-process must be at least 1");
    }
    let echo = MultiEcho::start(args.backends, |_, _| {})?;
    let servers: Vec<Server> = echo
        .addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| Server {
            name: Box::leak(format!("s{i}").into_boxed_str()),
            addr,
        })
        .collect();
    let extra = format!(
        "maxSessions: {}\nmaxQueryConnectionsPerIp: 256\n",
        args.sessions + 1000
    );
    let proxy = args.proxy.start(&servers, &extra)?;
    let exe = std::env::current_exe()?;
    let processes = args.sessions.div_ceil(args.per_process);
    let mut clients = Vec::with_capacity(processes);
    for k in 0..processes {
        let first = k * args.per_process;
        let count = args.per_process.min(args.sessions - first);
        let mut child = Command::new(&exe)
            .args(["sessions-client", "--target", &proxy.data.to_string()])
            .args(["--query", &proxy.query.to_string()])
            .args(["--count", &count.to_string(), "--first", &first.to_string()])
            .args(["--backends", &args.backends.to_string()])
            .args(["--bind-ip", &format!("127.0.1.{}", k + 1)])
            .args(["--batch", &args.batch.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        clients.push(ClientProcess {
            child,
            stdin,
            stdout,
        });
    }
    // Every client has its sockets and its token.
    for c in &mut clients {
        c.expect("ready")?;
    }
    let rss_before = status_kib(proxy.pid, "VmRSS").unwrap_or(0);
    let started = Instant::now();
    for c in &mut clients {
        c.say("setup")?;
    }
    let (mut opened, mut wrong) = (0u64, 0u64);
    for c in &mut clients {
        let r = c.expect("setup")?;
        opened += r.first().copied().unwrap_or(0);
        wrong += r.get(1).copied().unwrap_or(0);
    }
    let setup_seconds = started.elapsed().as_secs_f64();
    // Let the control thread take in the session events before reading memory.
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = status_kib(proxy.pid, "VmRSS").unwrap_or(0);
    for c in &mut clients {
        c.say("check")?;
    }
    let mut answered = 0u64;
    for c in &mut clients {
        let r = c.expect("check")?;
        answered += r.first().copied().unwrap_or(0);
        wrong += r.get(1).copied().unwrap_or(0);
    }
    let upstream_sockets = proxy_metric(&proxy, "udp_director_upstream_sockets");
    drop(clients);

    let per_session = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / opened.max(1) as f64;
    let rate = opened as f64 / setup_seconds;
    println!(
        "{:<12} {} sessions over {} backends from {processes} processes: {opened} opened in {:.2} s \
         ({:.0} setups/s); proxy RSS {:.1} → {:.1} MiB, {:.0} B per session; {} upstream sockets; \
         second round {answered} answered, {wrong} misdelivered",
        args.label,
        args.sessions,
        args.backends,
        setup_seconds,
        rate,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_session,
        upstream_sockets.map_or("?".into(), |n| format!("{n:.0}")),
    );
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "sessions": args.sessions, "backends": args.backends,
            "client_processes": processes, "opened": opened,
            "setup_seconds": setup_seconds, "setups_per_second": rate,
            "proxy_rss_before_kib": rss_before, "proxy_rss_after_kib": rss_after,
            "proxy_bytes_per_session": per_session, "upstream_sockets": upstream_sockets,
            "answered_second_round": answered, "misdelivered": wrong,
        })
    );
    Ok(())
}

/// A metric of the proxy's admin endpoint, read from its `/metrics`.
fn proxy_metric(proxy: &crate::proxy::ProxyProcess, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(proxy.admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

fn id_of(reply: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(reply.get(..4)?.try_into().ok()?))
}

/// Sends one datagram per socket (`batch` at a time), optionally after its token, and waits
/// for each reply; returns (answered, misdelivered).
fn round(
    sockets: &[UdpSocket],
    tokens: Option<&[String]>,
    first: usize,
    target: SocketAddr,
    batch: usize,
) -> std::io::Result<(usize, usize)> {
    let (mut ok, mut wrong) = (0, 0);
    let mut buf = [0u8; 64];
    for (chunk_index, chunk) in sockets.chunks(batch.max(1)).enumerate() {
        for (i, s) in chunk.iter().enumerate() {
            let index = chunk_index * batch + i;
            if let Some(tokens) = tokens {
                s.send_to(tokens[index].as_bytes(), target)?;
            }
            s.send_to(&((first + index) as u32).to_be_bytes(), target)?;
        }
        for (i, s) in chunk.iter().enumerate() {
            let id = (first + chunk_index * batch + i) as u32;
            match s.recv(&mut buf) {
                Ok(n) if id_of(&buf[..n]) == Some(id) => ok += 1,
                Ok(_) => wrong += 1,
                Err(_) => {}
            }
        }
    }
    Ok((ok, wrong))
}

/// Tokens for `count` clients from one pipelined query connection.
fn tokens(
    query: SocketAddr,
    first: usize,
    count: usize,
    backends: usize,
) -> anyhow::Result<Vec<String>> {
    let stream = TcpStream::connect(query).context("query port")?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(&mut writer);
        for i in first..first + count {
            writeln!(
                out,
                r#"{{"resourceType":"gameserver","labelSelector":{{"id":"s{}"}}}}"#,
                i % backends
            )?;
        }
        out.flush()?;
        drop(out);
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = BufReader::new(stream);
    let mut tokens = Vec::with_capacity(count);
    let mut line = String::new();
    for _ in 0..count {
        line.clear();
        reader.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).context("a query answer")?;
        match v["token"].as_str() {
            Some(t) => tokens.push(t.to_string()),
            None => bail!("query failed: {line}"),
        }
    }
    sender
        .join()
        .map_err(|_panic| anyhow::anyhow!("the query writer panicked"))??;
    Ok(tokens)
}

/// A client process: binds its sockets, gets their tokens, says `ready`, then runs the setup
/// round on `setup` and the check round on `check`, reporting each on stdout.
pub(crate) fn run_client(args: &ClientArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let sockets: Vec<UdpSocket> = (0..args.count)
        .map(|_| {
            let s = UdpSocket::bind((args.bind_ip, 0))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("binding {} sockets on {}", args.count, args.bind_ip))?;
    let tokens = tokens(args.query, args.first, args.count, args.backends)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut command = String::new();
    let stdin = std::io::stdin();
    loop {
        command.clear();
        if stdin.lock().read_line(&mut command)? == 0 {
            return Ok(());
        }
        let (answered, wrong) = match command.trim() {
            "setup" => round(&sockets, Some(&tokens), args.first, args.target, args.batch)?,
            "check" => round(&sockets, None, args.first, args.target, args.batch)?,
            _ => return Ok(()),
        };
        writeln!(stdout, "{} {answered} {wrong}", command.trim())?;
        stdout.flush()?;
    }
}
