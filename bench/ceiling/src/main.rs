//! The benchmark ceiling: the cheapest HTTP answer axum can give on this machine.
//!
//! It answers every `GET` with the fixed 5-byte body `hello`, so that `bench/run.sh`
//! can compare KVdb against the framework's own cost under the same load generator.

use axum::{Router, routing::get};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let app = Router::new().fallback(get(|| async { "hello" }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
