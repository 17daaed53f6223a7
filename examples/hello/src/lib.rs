//! Hello from API.md: greets the `name` variable (query or form field).
//!
//! Contract (the same bytes as `hello.lua`): `200`, `text/plain;
//! charset=utf-8`, `Hello <name>\n` with `name` HTML-escaped as
//! `kvdb.escape_html` does; without a name, `Hello \n`.

use kvdb_guest::{Handler, Request, Response, escape_html};

struct Hello;

impl Handler for Hello {
    fn handle(req: Request) -> Response {
        let name = req.var("name").unwrap_or("");
        Response::text(format!("Hello {}\n", escape_html(name)))
    }
}

kvdb_guest::export!(Hello);

#[cfg(test)]
mod tests {
    use super::Hello;
    use kvdb_guest::{Handler, Request};

    #[test]
    fn greets_with_the_name_escaped() {
        let r = Hello::handle(Request::new("GET", "/").with_var("name", "<b>Tom & 'Jerry'</b>"));
        assert_eq!(r.status(), 200);
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(
            r.body(),
            b"Hello &lt;b&gt;Tom &amp; &#x27;Jerry&#x27;&lt;&#x2F;b&gt;\n"
        );
    }

    #[test]
    fn greets_nobody_without_a_name() {
        assert_eq!(Hello::handle(Request::new("GET", "/")).body(), b"Hello \n");
    }
}
