//! `cb_url` callbacks of asynchronous Danube calls (spec §1.2, upstream `api/task/callback.py`):
//! every call that starts a task accepts `cb_url` and `cb_method` (`GET`, `POST`, `PUT`,
//! `DELETE`; default `POST`). When the task ends, the node that accepted the request sends
//! the task-status body (`{"task_id", "status", "result"}`, as DANUBE-TASK-STATUS shows it)
//! there as JSON, with `random_token` and `security_token` = md5(`random_token` + the
//! user's callback key) added.
//!
//! The spec makes this best effort (PROPOSAL), and so it is here:
//! - a watcher on the accepting node follows the task in its local store (it never touches
//!   the task); if that node stops first, the callback is lost;
//! - one attempt, bounded by [`CALLBACK_TIMEOUT`] (connect, send, status line); the answer's
//!   status is logged, nothing else is read; no retry;
//! - an invalid `cb_url` or `cb_method` is ignored (logged), as upstream does: the call
//!   itself is not refused;
//! - plain `http://` only: this crate has no TLS client, so an `https://` callback is
//!   skipped with a warning;
//! - drplane's identity has no per-user callback key yet, so the key is empty and
//!   `security_token` = md5(`random_token`): it proves nothing about the sender.
//!
//! The URL is the user's choice, as upstream: only users who may start tasks (`member`,
//! `admin`) can make the node call it.

use std::time::Duration;

use axum::http::Method;
use drplane_statemachine::Store;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::task::status_body;
use super::ES_VERSION;

/// How long one callback may take: connect, send and read the status line.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watcher looks at the task.
const WATCH_PERIOD: Duration = Duration::from_millis(500);
/// How long a watcher follows a task at most (finished jobs are kept 24 h).
const WATCH_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Longest `cb_url` accepted.
const URL_MAX: usize = 2048;

/// A parsed `http://` callback target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Callback {
    pub(crate) method: Method,
    pub(crate) url: String,
    /// `host:port` to connect to (IPv6 literals bracketed).
    pub(crate) addr: String,
    /// The `Host` header.
    pub(crate) host_header: String,
    /// Path and query.
    pub(crate) target: String,
}

/// Why a callback request is not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    Invalid(String),
    Unsupported(String),
}

/// The callback a request's data asks for: `None` without `cb_url`.
pub(crate) fn from_data(data: &Map<String, Value>) -> Option<Result<Callback, Skip>> {
    let url = data.get("cb_url")?;
    let Value::String(url) = url else {
        return Some(Err(Skip::Invalid("cb_url: Enter a valid URL.".into())));
    };
    let method = match data.get("cb_method") {
        None | Some(Value::Null) => Method::POST,
        Some(Value::String(m)) => match m.as_str() {
            "POST" => Method::POST,
            "GET" => Method::GET,
            "PUT" => Method::PUT,
            "DELETE" => Method::DELETE,
            other => {
                return Some(Err(Skip::Invalid(format!(
                    "cb_method: \"{other}\" is not a valid choice."
                ))))
            }
        },
        Some(other) => {
            return Some(Err(Skip::Invalid(format!(
                "cb_method: \"{other}\" is not a valid choice."
            ))))
        }
    };
    Some(parse_url(url, method))
}

fn parse_url(url: &str, method: Method) -> Result<Callback, Skip> {
    let invalid = || Skip::Invalid("cb_url: Enter a valid URL.".into());
    if url.len() > URL_MAX || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &url[7..]
    } else if lower.starts_with("https://") {
        return Err(Skip::Unsupported(
            "https callbacks are not supported (no TLS client)".into(),
        ));
    } else {
        return Err(invalid());
    };
    let rest = rest.split('#').next().unwrap_or("");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(Skip::Unsupported(
            "credentials in cb_url are not supported".into(),
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(invalid)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(invalid)?),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let host_ok = if host.starts_with('[') {
        host.len() > 2
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if !host_ok {
        return Err(invalid());
    }
    let port: u16 = match port {
        None => 80,
        Some(p) => p.parse().ok().filter(|p| *p > 0).ok_or_else(invalid)?,
    };
    let target = if tail.is_empty() {
        "/".to_string()
    } else if tail.starts_with('?') {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    let host_header = if port == 80 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    Ok(Callback {
        method,
        url: url.to_string(),
        addr: format!("{host}:{port}"),
        host_header,
        target,
    })
}

/// Starts the watcher of `job_id` for the callback the request data asks for, if any.
pub(crate) fn watch(store: &Store, job_id: &str, data: &Map<String, Value>) {
    let cb = match from_data(data) {
        None => return,
        Some(Ok(cb)) => cb,
        Some(Err(Skip::Invalid(why))) => {
            tracing::info!(job_id, reason = %why, "danube callback ignored: invalid");
            return;
        }
        Some(Err(Skip::Unsupported(why))) => {
            tracing::warn!(job_id, reason = %why, "danube callback skipped");
            return;
        }
    };
    let store = store.clone();
    let id = job_id.to_string();
    tracing::info!(job_id = %id, method = %cb.method, url = %cb.url, "danube callback registered");
    tokio::spawn(async move {
        let Some(payload) = wait_for_end(&store, &id).await else {
            return;
        };
        let body = with_tokens(payload, "").to_string();
        match send(&cb, &body, CALLBACK_TIMEOUT).await {
            Ok(status) => {
                tracing::info!(job_id = %id, url = %cb.url, status, "danube callback sent")
            }
            Err(e) => {
                tracing::warn!(job_id = %id, url = %cb.url, error = %e, "danube callback failed")
            }
        }
    });
}

/// Follows the task until it ends; its task-status body then (`None`: gone, or too long).
async fn wait_for_end(store: &Store, id: &str) -> Option<Map<String, Value>> {
    let start = tokio::time::Instant::now();
    loop {
        let (s, i) = (store.clone(), id.to_string());
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, drplane_statemachine::StoreError>((s.get_job(&i)?, s.danube_task(&i)?))
        })
        .await;
        match read {
            Ok(Ok((Some(job), meta))) if job.status.is_terminal() => {
                let (state, result) = status_body(&job, meta.as_ref());
                let mut m = Map::new();
                m.insert("task_id".into(), Value::String(job.id.clone()));
                m.insert("status".into(), Value::String(state.into()));
                m.insert("result".into(), result);
                return Some(m);
            }
            // Not applied here yet, or running.
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(job_id = %id, error = %e, "danube callback: cannot read the task")
            }
            Err(e) => tracing::warn!(job_id = %id, error = %e, "danube callback: read failed"),
        }
        if start.elapsed() >= WATCH_LIMIT {
            tracing::warn!(job_id = %id, "danube callback given up: the task did not end");
            return None;
        }
        tokio::time::sleep(WATCH_PERIOD).await;
    }
}

/// The payload with `random_token` and `security_token` = md5(random_token + key).
fn with_tokens(mut payload: Map<String, Value>, callback_key: &str) -> Value {
    let random = uuid::Uuid::new_v4().simple().to_string();
    let security = md5_hex(format!("{random}{callback_key}").as_bytes());
    payload.insert("random_token".into(), Value::String(random));
    payload.insert("security_token".into(), Value::String(security));
    Value::Object(payload)
}

/// One HTTP/1.1 request with a JSON body; the answer's status code.
async fn send(cb: &Callback, body: &str, limit: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(&cb.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", cb.addr))?;
        let head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: DanubeCloud/{}\r\nAccept: */*\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            cb.method,
            cb.target,
            cb.host_header,
            ES_VERSION,
            body.len()
        );
        conn.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        conn.write_all(body.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        conn.flush().await.map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.lines().next().unwrap_or("");
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|_| line.starts_with("HTTP/"))
            .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

/// MD5 (RFC 1321) as lowercase hex: what upstream's `security_token` is made with.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());
    let (mut a0, mut b0, mut c0, mut d0) = (
        0x6745_2301u32,
        0xefcd_ab89u32,
        0x98ba_dcfeu32,
        0x1032_5476u32,
    );
    for block in msg.chunks_exact(64) {
        let m: Vec<u32> = block
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    [a0, b0, c0, d0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn md5_vectors() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            md5_hex(b"The quick brown fox jumps over the lazy dog"),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        assert_eq!(
            md5_hex(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            ),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    #[test]
    fn callback_from_data() {
        let data = |v: Value| v.as_object().expect("object").clone();
        assert_eq!(from_data(&data(json!({"node": "n2"}))), None);
        let cb = from_data(&data(json!({"cb_url": "http://127.0.0.1:8080/hook?x=1#f"})))
            .expect("asked")
            .expect("valid");
        assert_eq!(cb.method, Method::POST);
        assert_eq!(cb.addr, "127.0.0.1:8080");
        assert_eq!(cb.host_header, "127.0.0.1:8080");
        assert_eq!(cb.target, "/hook?x=1");
        let cb = from_data(&data(
            json!({"cb_url": "HTTP://example.org", "cb_method": "PUT"}),
        ))
        .expect("asked")
        .expect("valid");
        assert_eq!(
            (cb.method, cb.addr.as_str(), cb.target.as_str()),
            (Method::PUT, "example.org:80", "/")
        );
        let cb = from_data(&data(json!({"cb_url": "http://[::1]:9/a"})))
            .expect("asked")
            .expect("valid");
        assert_eq!(cb.addr, "[::1]:9");
        for bad in [
            json!({"cb_url": "ftp://x/"}),
            json!({"cb_url": "http://"}),
            json!({"cb_url": "http://a b/"}),
            json!({"cb_url": "http://host:0/"}),
            json!({"cb_url": "http://host:99999/"}),
            json!({"cb_url": 5}),
            json!({"cb_url": "http://h/", "cb_method": "PATCH"}),
        ] {
            assert!(
                matches!(from_data(&data(bad.clone())), Some(Err(Skip::Invalid(_)))),
                "{bad}"
            );
        }
        assert!(matches!(
            from_data(&data(json!({"cb_url": "https://example.org/"}))),
            Some(Err(Skip::Unsupported(_)))
        ));
    }

    #[test]
    fn tokens() {
        let v = with_tokens(Map::new(), "key");
        let random = v["random_token"].as_str().expect("random");
        assert_eq!(random.len(), 32);
        assert_eq!(
            v["security_token"].as_str().expect("security"),
            md5_hex(format!("{random}key").as_bytes())
        );
    }

    #[tokio::test]
    async fn send_reads_the_status_and_gives_up_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains("{\"a\":1}") {
                let n = c.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            c.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("answer");
            let got = String::from_utf8_lossy(&got).into_owned();
            assert!(got.starts_with("PUT /cb HTTP/1.1\r\n"), "{got}");
            assert!(got.contains("Content-Length: 7\r\n"), "{got}");
            // A second client that never gets an answer.
            let (_silent, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let cb = parse_url(&format!("http://127.0.0.1:{port}/cb"), Method::PUT).expect("url");
        let status = send(&cb, "{\"a\":1}", Duration::from_secs(5))
            .await
            .expect("sent");
        assert_eq!(status, 204);
        let started = std::time::Instant::now();
        let err = send(&cb, "{}", Duration::from_millis(300))
            .await
            .expect_err("times out");
        assert!(err.contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        server.abort();
    }
}
