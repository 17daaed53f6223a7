//! A small JSON guestbook.
//!
//! Contract (the same bytes as `guestbook.lua`; every response is
//! `application/json`):
//! - `POST` with the variables `name` and `message` (query, form or JSON
//!   body): takes the next number from the counter `guestbook-count` and
//!   stores `{"id":N,"name":...,"message":...}` as JSON under
//!   `guestbook:<N, 8 digits>`; answers `201` with that entry. A missing or
//!   empty field is `400` `{"error":"name and message are required"}`.
//! - `GET`: `200`, the entries under `guestbook:` in order, as a JSON array
//!   of such objects (keys in that order; other values there are skipped).
//! - A data call the caller's scope does not allow: `403`
//!   `{"error":"permission denied: …"}`; any other failed one: `500`
//!   `{"error":"<the error>"}`.

use kvdb_guest::{Handler, ListOptions, Request, Response, Value};
use serde::{Deserialize, Serialize};

/// The counter lives outside the `guestbook:` prefix so listings skip it.
const COUNTER: &str = "guestbook-count";
const PREFIX: &str = "guestbook:";

/// One entry; the field order is the JSON key order of every response.
#[derive(Serialize, Deserialize)]
struct Entry {
    id: i64,
    name: String,
    message: String,
}

#[derive(Serialize)]
struct Problem<'a> {
    error: &'a str,
}

fn fail(status: u16, error: &str) -> Response {
    Response::json(&Problem { error }).with_status(status)
}

fn create(req: &Request) -> Result<Response, kvdb_guest::Error> {
    let field = |name| req.var(name).filter(|v| !v.is_empty());
    let (Some(name), Some(message)) = (field("name"), field("message")) else {
        return Ok(fail(400, "name and message are required"));
    };
    let Some(id) = kvdb_guest::incr(COUNTER, 1)?.as_i64() else {
        return Ok(fail(500, "the counter is not an integer"));
    };
    let entry = Entry {
        id,
        name: name.to_owned(),
        message: message.to_owned(),
    };
    kvdb_guest::set(&format!("{PREFIX}{id:08}"), Value::json(&entry)?)?;
    Ok(Response::json(&entry).with_status(201))
}

fn entries() -> Result<Response, kvdb_guest::Error> {
    let entries: Vec<Entry> = kvdb_guest::list(PREFIX, ListOptions::default().with_values())?
        .into_iter()
        .filter_map(|e| e.value?.parse_json().ok())
        .collect();
    Ok(Response::json(&entries))
}

struct Guestbook;

impl Handler for Guestbook {
    fn handle(req: Request) -> Response {
        let result = if req.method() == "POST" {
            create(&req)
        } else {
            entries()
        };
        result.unwrap_or_else(|e| {
            let status = match e {
                kvdb_guest::Error::PermissionDenied(_) => 403,
                _ => 500,
            };
            fail(status, &e.to_string())
        })
    }
}

kvdb_guest::export!(Guestbook);

#[cfg(test)]
mod tests {
    use super::{Guestbook, Handler, Request};

    #[test]
    fn a_post_without_a_message_is_400_before_any_data_call() {
        let r = Guestbook::handle(Request::new("POST", "/").with_var("name", "ann"));
        assert_eq!(r.status(), 400);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body(), br#"{"error":"name and message are required"}"#);
    }
}
