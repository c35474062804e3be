//! The query server (SPEC section 2): newline-delimited JSON over TCP, one answer line per
//! request, in order. A request cut by EOF without a newline is still answered, so
//! `echo '{…}' | nc host 9000` works. Oversized requests, idle connections and connections over
//! the limit get an error line and a close; nothing a client sends can stall the control thread.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use dataplane::WarnGate;
use dataplane::liveness::{BEAT_INTERVAL, Heartbeat};

use crate::query::conn_limit::ConnectionSlots;
use crate::query::director::Director;
use crate::query::{ErrorCode, Query, QueryError};

/// Largest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long writing an answer may take before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, and how much, a refused client's input is read and discarded before the close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Limits of the query server.
#[derive(Clone, Copy, Debug)]
pub struct QueryLimits {
    /// Time allowed for one complete request line.
    pub idle_timeout: Duration,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Concurrent connections from one IP address.
    pub max_connections_per_ip: usize,
}

impl QueryLimits {
    /// The query server's limits in `config`.
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            idle_timeout: config.query_idle_timeout,
            max_connections: config.max_query_connections,
            max_connections_per_ip: config.max_query_connections_per_ip,
        }
    }
}

/// Accepts query connections until `stop` turns true. The limits follow the running config
/// (a reload changes them for connections accepted from then on). The accept loop beats
/// `heart`, so a query thread that is wedged or gone shows in `/healthz`.
pub async fn serve(
    listener: TcpListener,
    director: Arc<Director>,
    mut config: watch::Receiver<Arc<crate::config::Config>>,
    mut stop: watch::Receiver<bool>,
    heart: Heartbeat,
) {
    let mut beat = tokio::time::interval(BEAT_INTERVAL);
    let mut limits = QueryLimits::of(&config.borrow_and_update());
    let slots = ConnectionSlots::new(limits.max_connections, limits.max_connections_per_ip);
    let mut config_open = true;
    // Refusals and accept errors are what a flood produces: one log line a second at most.
    let mut refusal_log = WarnGate::new();
    let mut accept_log = WarnGate::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
            _ = beat.tick() => {
                heart.beat(std::time::Instant::now());
                continue;
            }
            changed = config.changed(), if config_open => {
                match changed {
                    Ok(()) => {
                        limits = QueryLimits::of(&config.borrow_and_update());
                        slots.set_caps(limits.max_connections, limits.max_connections_per_ip);
                    }
                    Err(_) => config_open = false,
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(note) = accept_log.admit(std::time::Instant::now()) {
                    log::warn!("query server: accept failed: {e}{note}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.try_acquire(peer.ip()) {
            Ok(slot) => {
                let director = Arc::clone(&director);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, peer, &director, limits.idle_timeout).await {
                        log::debug!("query connection {peer}: {e}");
                    }
                    drop(slot);
                });
            }
            Err(refusal) => {
                director.count_refused(ErrorCode::Overloaded);
                if let Some(note) = refusal_log.admit(std::time::Instant::now()) {
                    log::warn!("query server: refusing {peer}: {refusal}{note}");
                }
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let err = QueryError::new(
                        ErrorCode::Overloaded,
                        format!("too many query connections: {refusal}"),
                    );
                    refuse(read, &mut write, &err).await;
                });
            }
        }
    }
}

fn error_line(err: &QueryError) -> Vec<u8> {
    let mut line = serde_json::to_vec(err).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

/// Writes a final error line and closes gracefully: FIN first, then discard what the client
/// still sends for a moment. Closing with unread input would make the kernel send RST, and the
/// client could lose the error line.
async fn refuse<R, W>(mut read: R, write: &mut W, err: &QueryError)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if write_line(write, &error_line(err)).await.is_err() {
        return;
    }
    let _ = write.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read its answers",
        )),
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    director: &Director,
    idle: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::with_capacity(512);
    loop {
        buf.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let read = tokio::time::timeout(idle, limited.read_until(b'\n', &mut buf)).await;
        let n = match read {
            Err(_) => {
                let err = QueryError::new(
                    ErrorCode::BadRequest,
                    format!("no complete request within {} s", idle.as_secs()),
                );
                director.count_refused(ErrorCode::BadRequest);
                refuse(reader, &mut write, &err).await;
                return Ok(());
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(()); // EOF between requests
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && buf.len() > MAX_REQUEST_BYTES {
            let err = QueryError::new(
                ErrorCode::BadRequest,
                format!("request larger than {MAX_REQUEST_BYTES} bytes"),
            );
            director.count_refused(ErrorCode::BadRequest);
            refuse(reader, &mut write, &err).await;
            return Ok(());
        }
        let line = buf.trim_ascii();
        if !line.is_empty() {
            let answer = answer(director, line, peer.ip()).await;
            write_line(&mut write, &answer).await?;
        }
        if !complete {
            return Ok(()); // the request ended at EOF
        }
    }
}

/// One request line from `client` → one answer line.
async fn answer(director: &Director, line: &[u8], client: IpAddr) -> Vec<u8> {
    let mut out = match serde_json::from_slice::<Query>(line) {
        Ok(query) => match director.query_async(&query, client).await {
            Ok(token) => serde_json::to_vec(&token).unwrap_or_default(),
            Err(e) => serde_json::to_vec(&e).unwrap_or_default(),
        },
        Err(e) => {
            director.count_refused(ErrorCode::BadRequest);
            // serde's message quotes the offending input (an unknown field's name, a string):
            // cut it to a readable length.
            serde_json::to_vec(&QueryError::new(
                ErrorCode::BadRequest,
                format!(
                    "invalid request: {}",
                    crate::quote::quote_message(&e.to_string())
                ),
            ))
            .unwrap_or_default()
        }
    };
    out.push(b'\n');
    out
}
