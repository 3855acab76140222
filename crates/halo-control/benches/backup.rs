//! Backup and restore at size: `cargo bench -p halo-control --bench backup`.
//! A store of 10,000 keys (service-record-sized values), and a backup
//! carrying 1 GiB of hook output: time to build the archive, to open it
//! (every checksum and record checked), to restore it into a new embedded
//! store (fsync included), and the archive's size. Median of 3 runs; the
//! hook's own run (its pipe) is not included. A benchmark: nothing asserts
//! a time.

use std::time::{Duration, Instant};

use halo_control::backup;
use halo_store::{EmbeddedStore, Store, Txn, TxnOp};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let root = std::env::temp_dir().join(format!("halo-bench-backup-{}", std::process::id()));
    let live = root.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let store = EmbeddedStore::open(&live).await.unwrap();
    let value = serde_json::json!({ "spec": "x".repeat(180), "restart_generation": 0 }).to_string().into_bytes();
    for chunk in (0..10_000).collect::<Vec<_>>().chunks(500) {
        let mut txn = Txn::new();
        txn.success = chunk.iter().map(|i| TxnOp::put(&format!("/halo/bench/{i:05}"), value.clone(), None)).collect();
        store.txn(txn).await.unwrap();
    }
    for (what, hooks) in
        [("10,000 keys", vec![]), ("10,000 keys + 1 GiB of hook output", vec![("big".to_string(), vec![7u8; 1 << 30])])]
    {
        let (mut made, mut opened, mut restored) = (Vec::new(), Vec::new(), Vec::new());
        let mut size = 0;
        for run in 0..3 {
            let t = Instant::now();
            let bytes = backup::create(&store, hooks.clone(), Vec::new()).await.unwrap();
            made.push(t.elapsed());
            size = bytes.len();
            let t = Instant::now();
            let b = backup::open(&bytes).unwrap();
            opened.push(t.elapsed());
            let target = root.join(format!("restored-{}-{run}", hooks.len()));
            let t = Instant::now();
            backup::restore(&b, &target).await.unwrap();
            restored.push(t.elapsed());
            let _ = std::fs::remove_dir_all(&target);
        }
        println!(
            "{what}: archive {:.1} MiB; create {:?}, open and check {:?}, restore {:?}",
            size as f64 / (1 << 20) as f64,
            median(made),
            median(opened),
            median(restored)
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
