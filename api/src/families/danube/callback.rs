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
//! - one attempt, bounded by [`CALLBACK_TIMEOUT`]; the answer's status is logged; no
//!   retry;
//! - an invalid `cb_url` or `cb_method` is ignored (logged), as upstream does: the call
//!   itself is not refused;
//! - plain `http://` only: the HTTP client is built without TLS, so an `https://`
//!   callback is skipped with a warning;
//! - drplane's identity has no per-user callback key yet, so the key is empty and
//!   `security_token` = md5(`random_token`): it proves nothing about the sender.
//!
//! The URL is the user's choice, as upstream: only users who may start tasks (`member`,
//! `admin`) can make the node call it.

use std::time::Duration;

use axum::http::Method;
use drplane_statemachine::Store;
use serde_json::{Map, Value};

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
    pub(crate) url: reqwest::Url,
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
    let mut parsed = reqwest::Url::parse(url).map_err(|_| invalid())?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(Skip::Unsupported(
                "https callbacks are not supported (no TLS client)".into(),
            ))
        }
        _ => return Err(invalid()),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Skip::Unsupported(
            "credentials in cb_url are not supported".into(),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) || parsed.port() == Some(0) {
        return Err(invalid());
    }
    parsed.set_fragment(None);
    Ok(Callback {
        method,
        url: parsed,
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

/// One request with a JSON body; the answer's status code.
async fn send(cb: &Callback, body: &str, limit: Duration) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .timeout(limit)
        .user_agent(format!("DanubeCloud/{ES_VERSION}"))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let resp = client
        .request(cb.method.clone(), cb.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                format!("no answer within {} ms", limit.as_millis())
            } else {
                format!("send: {e}")
            }
        })?;
    Ok(resp.status().as_u16())
}

/// MD5 as lowercase hex: what upstream's `security_token` is made with.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::Digest as _;
    hex::encode(md5::Md5::digest(data))
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
        assert_eq!(cb.url.as_str(), "http://127.0.0.1:8080/hook?x=1");
        let cb = from_data(&data(
            json!({"cb_url": "HTTP://example.org", "cb_method": "PUT"}),
        ))
        .expect("asked")
        .expect("valid");
        assert_eq!(
            (cb.method, cb.url.as_str()),
            (Method::PUT, "http://example.org/")
        );
        let cb = from_data(&data(json!({"cb_url": "http://[::1]:9/a"})))
            .expect("asked")
            .expect("valid");
        assert_eq!(cb.url.as_str(), "http://[::1]:9/a");
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
            assert!(
                got.to_ascii_lowercase().contains("content-length: 7\r\n"),
                "{got}"
            );
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
