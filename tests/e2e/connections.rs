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

/// Reads one response (its head, and a body of `Content-Length` bytes):
/// the status line and the head's lines, lower-cased.
fn read_response(stream: &mut TcpStream) -> (String, Vec<String>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the connection ended inside an answer ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let mut lines = head.lines().map(str::to_owned);
    let status = lines.next().unwrap_or_default();
    let headers: Vec<String> = lines.filter(|l| !l.is_empty()).collect();
    let length = headers
        .iter()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("the answer's body");
    (status, headers)
}

/// A write refused before its body is read (no credential, no such bucket,
/// too large) must leave the connection usable: hyper would otherwise close
/// it without a word, and a client whose next request (a PATCH) then fails
/// can't tell whether it was applied. The next request on the same
/// connection is answered.
#[test]
fn a_write_refused_before_its_body_is_read_keeps_the_connection() {
    let s = TestServer::start_with(&["--max-value-bytes", "100000"]);
    let locked = s.create_bucket("secret_key=sk&write_key=wk&read_key=rk");
    let open = s.create_bucket("");
    let missing = "AAAAAAAAAAAAAAAAAAAAAA";
    let body = vec![b'a'; 200_000];
    let mut c = connect(&s);
    let chunked = |path: &str| {
        let mut request =
            format!("PATCH {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                .into_bytes();
        for chunk in body.chunks(50_000) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        request
    };
    let with_length = |method: &str, path: &str| {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        request
    };
    for (request, expected) in [
        (with_length("PUT", &format!("/{locked}/k")), "401"),
        (chunked(&format!("/{missing}/k")), "404"),
        (with_length("PUT", &format!("/{open}/big")), "413"),
        (chunked(&format!("/{open}/big")), "413"),
        (with_length("POST", &format!("/{locked}/tokens/")), "401"),
    ] {
        c.write_all(&request).expect("write");
        let (status, headers) = read_response(&mut c);
        assert!(
            status.starts_with(&format!("http/1.1 {expected}")),
            "expected {expected}: {status}"
        );
        assert!(
            !headers.iter().any(|h| h == "connection: close"),
            "{status}: {headers:?}"
        );
    }
    c.write_all(
        format!("PUT /{open}/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").as_bytes(),
    )
    .expect("write");
    let (status, _) = read_response(&mut c);
    assert!(status.starts_with("http/1.1 204"), "{status}");
    assert_eq!(s.get(&format!("/{open}/k")).text(), "ok");
    assert_eq!(
        s.get(&format!("/{open}/big")).status,
        404,
        "nothing was written"
    );
}

/// A client that asked `Expect: 100-continue` sends no body unless asked:
/// a refusal that does not read it is answered at once, saying that the
/// connection closes (so the client does not send its next request there).
#[test]
fn a_refused_request_that_expects_100_continue_is_told_the_connection_closes() {
    let s = TestServer::start();
    let missing = "AAAAAAAAAAAAAAAAAAAAAA";
    let mut c = connect(&s);
    c.write_all(
        format!(
            "PUT /{missing}/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let (status, headers) = read_response(&mut c);
    assert!(status.starts_with("http/1.1 404"), "{status}");
    assert!(
        headers.iter().any(|h| h == "connection: close"),
        "{headers:?}"
    );
}

/// What hyper could not parse gets a problem document (it answered a bare
/// head with no body), with its status and a detail that says what to do;
/// the connection closes, nothing is written, and the server goes on.
#[test]
fn a_request_that_cannot_be_parsed_gets_a_json_problem_and_changes_nothing() {
    let s = server();
    let b = s.create_bucket("");
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let long_url = format!("/{b}/{}", "a".repeat(70_000));
    let cases = [
        // A raw < in the query, as curl sends an unencoded URL.
        (
            format!("GET /{b}/scripts/hello?name=<b> HTTP/1.1\r\nHost: x\r\n\r\n"),
            400,
            "bad-request",
            "percent-encode",
        ),
        // A malformed header on a write.
        (
            format!("PUT /{b}/k HTTP/1.1\r\nHost: x\r\nBad Header\r\nContent-Length: 1\r\n\r\nv"),
            400,
            "bad-request",
            "percent-encode",
        ),
        (
            format!("PUT /{b}/k HTTP/1.1\r\nHost: x\r\n{many_headers}Content-Length: 1\r\n\r\nv"),
            431,
            "headers-too-large",
            "at most 100 header fields",
        ),
        (
            format!("GET {long_url} HTTP/1.1\r\nHost: x\r\n\r\n"),
            414,
            "uri-too-long",
            "65,534 bytes",
        ),
    ];
    for (request, status, kind, hint) in cases {
        let mut c = connect(&s);
        c.write_all(request.as_bytes()).expect("write");
        let (answer, _) = read_until_closed(&mut c);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {answer:?}"));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status} expected: {head}"
        );
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("\r\ncontent-type: application/problem+json\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        // A page elsewhere can read it, as the routes' errors.
        assert!(
            head.contains("\r\naccess-control-allow-origin: *\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(problem["status"], status, "{problem}");
        assert_eq!(
            problem["type"],
            format!("urn:kvdb:problem:{kind}"),
            "{problem}"
        );
        let detail = problem["detail"].as_str().expect("a detail");
        assert!(detail.contains(hint), "{detail}");
    }
    // HTTP/1.0 kept alive: the answer after a good request, in HTTP/1.0.
    let mut c = connect(&s);
    c.write_all(
        format!(
            "GET /{b}/k HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /{b}/x<y HTTP/1.0\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let (answer, _) = read_until_closed(&mut c);
    let second = answer
        .find("HTTP/1.0 400 Bad Request\r\n")
        .map(|at| &answer[at..])
        .unwrap_or_else(|| panic!("no 400 in {answer:?}"));
    assert!(
        second.contains("content-type: application/problem+json"),
        "{second}"
    );
    assert!(second.contains("urn:kvdb:problem:bad-request"), "{second}");
    assert_eq!(s.get(&format!("/{b}/k")).status, 404, "nothing was written");
    assert_eq!(s.put(&format!("/{b}/k"), "v").status, 204);
    assert_eq!(s.get(&format!("/{b}/k")).text(), "v");
}

/// A run of a script that does not exist is answered 404 at once, without
/// waiting for (or taking) the body its request announced: the body was
/// read first, up to the value limit.
#[test]
fn a_run_of_a_missing_script_is_answered_before_its_body() {
    let s = TestServer::start();
    let b = s.create_bucket("secret_key=sk");
    let host = s.base().trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        stream,
        "POST /{b}/scripts/missing HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\n"
    )
    .expect("send the head");
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .expect("answered without the body being sent");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
