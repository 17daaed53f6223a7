//! Connections: clients that stall are cut off after the read timeout
//! (`--read-timeout-secs`) while others are served; a client that
//! half-closes its side after its request still gets the answer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::TestServer;

fn connect(s: &TestServer) -> TcpStream {
    let host = s.base().trim_start_matches("http://");
    let stream = TcpStream::connect(host).expect("connect");
    // Far above the server's timeout: a test that would hang fails instead.
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
}

/// Everything the server sends until it closes the connection, and how long
/// that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

fn server() -> TestServer {
    TestServer::start_with(&["--read-timeout-secs", "1"])
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_read_timeout() {
    let s = server();
    let mut idle = connect(&s);
    let (answer, took) = read_until_closed(&mut idle);
    assert!(answer.is_empty(), "nothing to answer: {answer}");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
}

#[test]
fn unfinished_headers_are_cut_off_while_other_clients_are_served() {
    let s = server();
    let b = s.create_bucket("");
    let mut stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(format!("GET /{b}/k HTTP/1.1\r\nHost: x\r\n").as_bytes())
                .expect("write");
            c
        })
        .collect();
    // Meanwhile the server answers.
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
    for c in &mut stalled {
        let (answer, took) = read_until_closed(c);
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(took < Duration::from_secs(15), "closed after {took:?}");
    }
}

#[test]
fn a_body_that_stops_coming_is_a_408_and_writes_nothing() {
    let s = server();
    let b = s.create_bucket("");
    let mut c = connect(&s);
    c.write_all(
        format!("PUT /{b}/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").as_bytes(),
    )
    .expect("write");
    let (answer, took) = read_until_closed(&mut c);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("application/problem+json") && answer.contains("stalled"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    assert_eq!(s.get(&format!("/{b}/k")).status, 404, "nothing was written");

    // A chunked body cut off mid-chunk: the same.
    let mut c = connect(&s);
    c.write_all(
        format!("PUT /{b}/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
            .as_bytes(),
    )
    .expect("write");
    let (answer, _) = read_until_closed(&mut c);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(s.get(&format!("/{b}/k")).status, 404, "nothing was written");
}

#[test]
fn a_client_that_half_closes_after_its_write_gets_the_answer() {
    let s = TestServer::start();
    let b = s.create_bucket("");
    for i in 0..5 {
        let mut c = connect(&s);
        c.write_all(
            format!("PUT /{b}/hc{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
                .as_bytes(),
        )
        .expect("write");
        c.shutdown(Shutdown::Write).expect("half-close");
        let (answer, _) = read_until_closed(&mut c);
        assert!(answer.starts_with("HTTP/1.1 204"), "write {i}: {answer:?}");
        assert_eq!(s.get(&format!("/{b}/hc{i}")).text(), "abc");
    }
    let mut c = connect(&s);
    c.write_all(
        format!("PATCH /{b}/n HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n+1").as_bytes(),
    )
    .expect("write");
    c.shutdown(Shutdown::Write).expect("half-close");
    let (answer, _) = read_until_closed(&mut c);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(s.get(&format!("/{b}/n")).text(), "1");
}
