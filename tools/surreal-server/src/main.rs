#![recursion_limit = "256"]
//! `surreal start …`: SurrealDB's own server, as its binary runs it.

fn main() -> std::process::ExitCode {
    surrealdb_server::init(surrealdb_server::core::CommunityComposer())
}
