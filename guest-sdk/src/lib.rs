//! The Rust SDK for KVdb WebAssembly scripts.
//!
//! A script is a component of the WIT world `kvdb:script/script` (`wit/` at
//! the root of the repository, the single source of truth): it handles one
//! HTTP request with the *scoped bucket*, the same operations as the Lua
//! `kvdb` table. With this crate a script is one `impl` and one line:
//!
//! ```no_run
//! use kvdb_guest::{Handler, Request, Response};
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     fn handle(req: Request) -> Response {
//!         let name = req.var("name").unwrap_or("");
//!         Response::text(format!("Hello {}\n", kvdb_guest::escape_html(name)))
//!     }
//! }
//!
//! kvdb_guest::export!(Hello);
//! ```
//!
//! Build it as a `cdylib` with `cargo build --target wasm32-wasip2 --release`:
//! the toolchain's linker writes a component directly, ready to upload to
//! `PUT /:bucket/scripts/:name` with `Content-Type: application/wasm`.
//!
//! # The API, next to Lua's
//!
//! | Lua | Rust |
//! | --- | --- |
//! | `kvdb.get(k)` | [`get`], [`get_json`] |
//! | `kvdb.set(k, v [, ttl])` | [`set`], [`set_with_ttl`], [`set_json`] |
//! | `kvdb.delete(k)`, `kvdb.exists(k)` | [`delete`], [`exists`] |
//! | `kvdb.incr(k, n)`, merge, patch, append | [`incr`], [`merge`], [`patch`], [`append`] |
//! | `kvdb.list(prefix, opts)` | [`list`] with [`ListOptions`] |
//! | `kvdb.access_token{...}` | [`access_token`] |
//! | `kvdb.scope.prefix/permissions` | [`scope`], [`set_scope`] |
//! | `print(...)` (server log) | [`log()`], [`log::info`] and friends |
//! | `kvdb.var`, `kvdb.headers`, `kvdb.body` | [`Request`] |
//! | `kvdb.say`, `kvdb.status`, `kvdb.header`, `kvdb.redirect` | [`Response`] |
//! | `kvdb.escape_html(s)` | [`escape_html`] |
//!
//! Every data call is checked against the run's scope; a denied or failed
//! call returns an [`Error`] and never ends the run by itself.
//!
//! # Testing natively
//!
//! The functions that call the host, the data functions ([`get`] to
//! [`access_token`], [`scope`], [`set_scope`]) and the log ([`log()`],
//! [`log::info`] and friends), only work inside a running script. Natively
//! (a `cargo test`) the call panics, saying so (`#[should_panic]` catches
//! it). [`Request`], [`Response`], [`Value`], [`Number`],
//! [`Error`] and [`escape_html`] are plain Rust and work anywhere: keep the
//! logic in functions that take and answer those (parse the request, build
//! the response from values already read) and test them natively; test the
//! data calls by uploading the component to a server.

#![deny(missing_docs)]

extern crate self as kvdb_guest;

mod error;
mod html;
mod kv;
pub mod log;
mod request;
mod response;
mod value;

pub use error::Error;
pub use html::escape_html;
pub use kv::{
    Entry, ListOptions, Permission, Scope, Token, access_token, append, delete, exists, get,
    get_json, incr, list, merge, patch, scope, set, set_json, set_scope, set_with_ttl,
};
pub use log::{Level, log};
pub use request::Request;
pub use response::Response;
pub use value::{Number, Value};

/// Called first by every function that calls the host. Natively (not on
/// wasm32) it panics with what to do: the generated import it guards
/// would panic in a function that can't unwind, which aborted the whole
/// test process with "entered unreachable code" (found by a guest author).
#[inline]
pub(crate) fn host_only(function: &str) {
    // The same test as the stubs wit-bindgen generates for other targets.
    #[cfg(not(target_arch = "wasm32"))]
    panic!(
        "kvdb_guest::{function} calls the KVdb server, which only a script running in it \
         provides: in a native test, keep the logic in functions of plain values and test \
         the data calls against a server (see the crate's \"Testing natively\")"
    );
    #[cfg(target_arch = "wasm32")]
    let _ = function;
}

/// The bindings `wit-bindgen` generates from `wit/`: an implementation
/// detail of [`export!`] and of this crate's functions, not a stable API.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all, clippy::pedantic)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "script",
        pub_export_macro: true,
        export_macro_name: "__export_script",
        default_bindings_module: "::kvdb_guest::wit",
        runtime_path: "::kvdb_guest::wit::__rt",
    });

    /// The `wit-bindgen` runtime, reachable from guests that don't depend
    /// on `wit-bindgen` themselves.
    #[doc(hidden)]
    pub use wit_bindgen::rt as __rt;
}

/// A KVdb script: answers one request.
///
/// Implement it on a unit struct and export that with [`export!`]. Each
/// request runs in a fresh instance, so there is no state to keep between
/// calls: keep it in the bucket.
///
/// # Example
///
/// ```no_run
/// use kvdb_guest::{Handler, Request, Response};
///
/// struct Echo;
///
/// impl Handler for Echo {
///     fn handle(req: Request) -> Response {
///         Response::text(format!("{} {}\n", req.method(), req.path()))
///     }
/// }
///
/// kvdb_guest::export!(Echo);
/// ```
///
/// A handler that makes several data calls is shortest as a function
/// answering `Result<Response, Error>`, `?` after each call, and
/// [`Response::from_result`] in `handle`: a failed call answers its error
/// as text with the status [`Error::status`] gives (403 for a denied call,
/// and so on). Map errors yourself where the response must have another
/// shape.
///
/// ```no_run
/// use kvdb_guest::{Error, Handler, Request, Response};
///
/// struct Rename;
///
/// fn rename(req: &Request) -> Result<Response, Error> {
///     let (Some(from), Some(to)) = (req.var("from"), req.var("to")) else {
///         return Ok(Response::text("from and to are required\n").with_status(400));
///     };
///     let Some(value) = kvdb_guest::get(from)? else {
///         return Ok(Response::text("no such key\n").with_status(404));
///     };
///     kvdb_guest::set(to, value)?;
///     kvdb_guest::delete(from)?;
///     Ok(Response::text("renamed\n"))
/// }
///
/// impl Handler for Rename {
///     fn handle(req: Request) -> Response {
///         Response::from_result(rename(&req))
///     }
/// }
///
/// kvdb_guest::export!(Rename);
/// ```
pub trait Handler {
    /// Handles one request; the response is sent as it is.
    fn handle(req: Request) -> Response;
}

/// Adapts a [`Handler`] to the generated `Guest` trait; used by [`export!`].
#[doc(hidden)]
pub struct __Export<H>(core::marker::PhantomData<H>);

impl<H: Handler> wit::Guest for __Export<H> {
    fn handle(request: wit::Request) -> wit::Response {
        H::handle(Request::from_wit(request)).into()
    }
}

/// Exports a [`Handler`] as the script's `handle` function.
///
/// Use it once per crate, at the top level, with the type implementing
/// [`Handler`]. It also embeds the component type that the toolchain's
/// linker needs to write a component.
///
/// # Example
///
/// ```no_run
/// struct Ok;
///
/// impl kvdb_guest::Handler for Ok {
///     fn handle(_: kvdb_guest::Request) -> kvdb_guest::Response {
///         kvdb_guest::Response::text("ok\n")
///     }
/// }
///
/// kvdb_guest::export!(Ok);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:ty) => {
        const _: () = {
            type __KvdbGuestExport = $crate::__Export<$handler>;
            $crate::wit::__export_script! { __KvdbGuestExport with_types_in $crate::wit }
        };
    };
}
