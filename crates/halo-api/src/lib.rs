//! halo's admin API: the axum server a node runs ([`serve`]), its bearer
//! token ([`token`]), and the client the CLI uses ([`ApiClient`]).

mod client;
mod code;
mod server;
pub mod token;

pub use client::{ApiClient, ClientError};
pub use code::ErrorCode;
pub use server::{router, serve, Tokens};
