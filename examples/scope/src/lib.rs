//! The scope example of the original KVdb description: the script narrows
//! its own scope to writing under `users:1:`, then tries two writes.
//!
//! Contract (the same bytes as `scope.lua`): `200`, `text/plain;
//! charset=utf-8`, two lines `users:1:name: ok` and `users:2:name: ERR`
//! (the error text, e.g. `permission denied: ...`). The script's own scope
//! applies whoever calls it, so it needs no credential, but the bucket must
//! allow scripts (it has a secret key).

use kvdb_guest::{Error, Handler, Permission, Request, Response};

struct Scope;

fn outcome(result: Result<(), Error>) -> String {
    result.map_or_else(|e| e.to_string(), |()| "ok".to_owned())
}

impl Handler for Scope {
    fn handle(_: Request) -> Response {
        // Only allow writing to a subset of the database.
        if let Err(e) = kvdb_guest::set_scope("users:1:", &[Permission::Write]) {
            return Response::text(format!("error setting the scope: {e}\n")).with_status(500);
        }
        let bob = outcome(kvdb_guest::set("users:1:name", "bob"));
        let kim = outcome(kvdb_guest::set("users:2:name", "kim")); // this fails
        Response::text(format!("users:1:name: {bob}\nusers:2:name: {kim}\n"))
    }
}

kvdb_guest::export!(Scope);
