//! Readiness for service managers (systemd's `sd_notify` protocol): a
//! datagram to `$NOTIFY_SOCKET` when halo serves. A process that took over
//! from an old one by a binary upgrade also says `MAINPID=` (its own), so
//! a `Type=notify` unit with `NotifyAccess=all` follows it when the old
//! main process exits. Without `$NOTIFY_SOCKET` nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Says halo serves; `took_over`: this process replaced the main one.
pub fn ready(took_over: bool) {
    let state = if took_over { format!("MAINPID={}\nREADY=1\n", std::process::id()) } else { "READY=1\n".into() };
    if let Err(e) = send(&state) {
        tracing::warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}

fn send(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's usual one).
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
