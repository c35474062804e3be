//! TCP data ports through the real binary: a multi-port mapping over a TCP and a UDP port (the
//! TCP one declared first, so its index differs from its place among UDP ports), the query
//! answer, `GET /sessions` with the protocol, `DELETE`, and the per-protocol metrics.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::*;

fn config() -> String {
    r#"
bindAddress: 127.0.0.1
queryPort: 0
adminPort: 0
workers: 2
drainSeconds: 1
dataPorts:
  - {name: chat, port: 0, protocol: tcp}
  - {name: game, port: 0, protocol: udp}
inventory: {kind: file, path: inventory.yaml, pollIntervalMillis: 50}
resourceQueryMapping:
  gameserver:
    group: agones.dev
    version: v1
    resource: gameservers
    addressPath: status.address
    ports: [{name: game, portName: game}, {name: chat, portName: chat}]
"#
    .to_string()
}

fn inventory(udp: SocketAddr, tcp: SocketAddr) -> String {
    format!(
        r#"- apiVersion: agones.dev/v1
  kind: GameServer
  metadata: {{name: gs-1, namespace: starx}}
  status: {{state: Ready, address: "127.0.0.1", ports: [{{name: game, port: {}}}, {{name: chat, port: {}}}]}}
"#,
        udp.port(),
        tcp.port()
    )
}

const QUERY: &str = r#"{"resourceType":"gameserver","namespace":"starx"}"#;

#[test]
fn one_token_opens_a_tcp_and_a_udp_port_and_the_admin_api_shows_both() {
    let game = Echo::tagged(b'G');
    let chat = TcpEcho::tagged(b'C');
    let proxy = Proxy::start(&config(), &inventory(game.addr, chat.addr));
    let chat_port = proxy.data.iter().find(|(n, _)| n == "chat").unwrap().1;
    let game_port = proxy.data.iter().find(|(n, _)| n == "game").unwrap().1;

    let answer = proxy.query(QUERY);
    assert_eq!(answer["ports"]["chat"], chat_port.port(), "{answer}");
    assert_eq!(answer["ports"]["game"], game_port.port(), "{answer}");
    let token = answer["token"].as_str().unwrap().to_string();

    let mut tcp = tcp_client(chat_port);
    tcp.write_all(format!("{token}\r\nhello").as_bytes())
        .unwrap();
    assert_eq!(read_exact_within(&mut tcp, 6), b"Chello");
    let udp = client();
    udp.send_to(token.as_bytes(), game_port).unwrap();
    udp.send_to(b"ping", game_port).unwrap();
    assert_eq!(expect_datagram(&udp), b"Gping");

    // Spent on the TCP port: a second connection with it is closed and counted.
    let mut again = tcp_client(chat_port);
    again.write_all(token.as_bytes()).unwrap();
    expect_closed(&mut again);

    let sessions = proxy.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let tcp_session = sessions
        .iter()
        .find(|s| s["protocol"] == "tcp")
        .expect("a TCP session");
    assert_eq!(tcp_session["dataPort"], "chat");
    assert_eq!(tcp_session["origin"], "token");
    assert_eq!(tcp_session["target"], chat.addr.to_string());
    assert_eq!(tcp_session["client"], tcp.local_addr().unwrap().to_string());
    let udp_session = sessions.iter().find(|s| s["protocol"] == "udp").unwrap();
    assert_eq!(udp_session["dataPort"], "game");

    assert_eq!(
        proxy.metric(r#"udp_director_sessions_active{protocol="tcp"}"#),
        1.0
    );
    assert_eq!(
        proxy.metric(r#"udp_director_sessions_created_total{kind="token",protocol="tcp"}"#),
        1.0
    );
    proxy.eventually("the TCP bytes are counted", |p| {
        p.metric(r#"udp_director_bytes_total{direction="upstream",protocol="tcp"}"#) == 5.0
    });
    assert_eq!(
        proxy.metric(
            r#"udp_director_tcp_connections_refused_total{reason="token_rejected",source="client"}"#
        ),
        1.0
    );
    assert_eq!(
        proxy.metric("udp_director_tcp_connections_accepted_total"),
        2.0
    );

    let (status, body) = proxy.http(
        "DELETE",
        &format!("/sessions/{}", tcp.local_addr().unwrap()),
    );
    assert_eq!(status, 200, "{body}");
    expect_closed(&mut tcp);
    assert_eq!(proxy.sessions().len(), 1, "the UDP session stays");
}
