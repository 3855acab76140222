//! The cluster's API token in the store: its SHA-256 digest, never the
//! token. The first node to start offers the digest of its token; every
//! other node must bring the same token (`halo agent --token-file`, or the
//! one it kept in its data directory from an earlier run), and is refused,
//! with the way to fix it, if it does not. The read-only token is derived
//! from the admin token, so one secret is all a node is given.
//!
//! A store written by an older halo holds the token in clear: the first
//! node to start on it adopts that token and replaces it by its digest
//! (and removes the clear read-only token beside it).

use halo_store::{Compare, Store, Txn, TxnOp};

use crate::backup::sha256;
use crate::keys::API_TOKEN;
use crate::node::NodeError;

/// Where an older halo kept the read-only token in clear.
const LEGACY_READ_TOKEN: &str = "/halo/api-read-token";
const PREFIX: &str = "sha256:";

/// What the store keeps of `token`.
pub fn digest(token: &str) -> String {
    format!("{PREFIX}{}", sha256(token.as_bytes()))
}

/// The read-only token that goes with the admin token `admin` (the same
/// on every node; it reveals nothing of `admin`).
pub fn read_token(admin: &str) -> String {
    sha256(format!("halo read-only API token\n{admin}").as_bytes())[..48].to_string()
}

/// Checks `local` (this node's admin token) against the cluster's, which
/// the first node to start sets; returns the token the node answers to:
/// `local`, or the cluster's own when the store still held it in clear.
/// `source` names where `local` came from, for the error. `exclusive`: the
/// store is this node's alone (`halo up`'s embedded one), so a different
/// digest (a backup restored into a new data directory) is replaced by
/// this node's.
pub async fn join(store: &dyn Store, local: &str, source: &str, exclusive: bool) -> Result<String, NodeError> {
    check_format(local, source)?;
    let offer = Txn::new().when(Compare::absent(API_TOKEN)).and_then(TxnOp::put(API_TOKEN, digest(local), None));
    store.txn(offer).await?;
    let Some(kv) = store.get(API_TOKEN).await? else {
        return Err(NodeError::Start(format!("{API_TOKEN} vanished while this node joined; start it again")));
    };
    let stored = String::from_utf8_lossy(&kv.value).trim().to_string();
    if stored.starts_with(PREFIX) {
        if halo_proxy::config::Secret::new(&stored).matches(&digest(local)) {
            return Ok(local.to_string());
        }
        if exclusive {
            store.put(API_TOKEN, digest(local).into_bytes(), None).await?;
            tracing::info!(
                token = source,
                "the store answered another API token (restored from a backup?): it answers this node's now"
            );
            return Ok(local.to_string());
        }
        return Err(NodeError::Start(format!(
            "this node's API token ({source}) is not the cluster's: give every node the token of the \
             first one (its data directory's `token` file) with --token-file"
        )));
    }
    // An older halo's token in clear: this node adopts it and the store
    // keeps its digest from now on (only if nobody changed it meanwhile).
    check_format(&stored, API_TOKEN)?;
    let seal = Txn::new()
        .when(Compare::mod_revision(API_TOKEN, kv.mod_revision))
        .and_then(TxnOp::put(API_TOKEN, digest(&stored), None))
        .and_then(TxnOp::Delete(LEGACY_READ_TOKEN.into()));
    store.txn(seal).await?;
    tracing::info!("the store kept the API token in clear: adopted it, and the store now keeps only its digest");
    Ok(stored)
}

fn check_format(token: &str, source: &str) -> Result<(), NodeError> {
    if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NodeError::Start(format!(
            "the API token in {source} is not a token: 32 or more hex digits are accepted"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use halo_store::EmbeddedStore;

    const A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210";

    #[tokio::test]
    async fn the_store_keeps_a_digest_and_a_different_token_is_refused() {
        let dir = tempdir();
        let store = EmbeddedStore::open(&dir).await.unwrap();
        assert_eq!(join(&store, A, "n1", false).await.unwrap(), A);
        let kept = String::from_utf8(store.get(API_TOKEN).await.unwrap().unwrap().value).unwrap();
        assert!(kept.starts_with("sha256:") && !kept.contains(A), "{kept}");
        assert_eq!(join(&store, A, "n2", false).await.unwrap(), A);
        let e = join(&store, B, "/etc/halo/token", false).await.unwrap_err().to_string();
        assert!(e.contains("/etc/halo/token") && e.contains("--token-file"), "{e}");
        let e = join(&store, "short", "x", false).await.unwrap_err().to_string();
        assert!(e.contains("32 or more hex digits"), "{e}");
        // A store of its own (restored into a new data directory) takes
        // the node's token.
        assert_eq!(join(&store, B, "restored", true).await.unwrap(), B);
        assert_eq!(join(&store, B, "restored", false).await.unwrap(), B);
        assert_ne!(read_token(A), read_token(B));
        assert!(!read_token(A).contains(&A[..16]));
    }

    #[tokio::test]
    async fn a_token_an_older_halo_stored_in_clear_is_adopted_and_sealed() {
        let dir = tempdir();
        let store = EmbeddedStore::open(&dir).await.unwrap();
        store.put(API_TOKEN, A.as_bytes().to_vec(), None).await.unwrap();
        store.put(LEGACY_READ_TOKEN, B.as_bytes().to_vec(), None).await.unwrap();
        assert_eq!(join(&store, B, "n2", false).await.unwrap(), A, "the cluster's token wins");
        let kept = String::from_utf8(store.get(API_TOKEN).await.unwrap().unwrap().value).unwrap();
        assert_eq!(kept, digest(A));
        assert!(store.get(LEGACY_READ_TOKEN).await.unwrap().is_none());
        assert_eq!(join(&store, A, "n3", false).await.unwrap(), A);
    }

    fn tempdir() -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("halo-token-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
