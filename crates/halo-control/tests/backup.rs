//! A backup holds one revision's state exactly, even under a steady write
//! load: a writer keeps two keys equal in every transaction; every backup
//! taken meanwhile must hold them equal, and restore them as they were.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use halo_control::backup;
use halo_store::{EmbeddedStore, Store, Txn, TxnOp};
use halo_testkit::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_writes_hold_one_revision_each() {
    let dir = TempDir::new("backup-consistency");
    std::fs::create_dir_all(dir.0.join("live")).unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.0.join("live")).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (store.clone(), stop.clone());
    let writer = tokio::spawn(async move {
        let mut i = 0u64;
        // Bounded: at most 100,000 writes, or until told to stop.
        while !st.load(Ordering::SeqCst) && i < 100_000 {
            i += 1;
            let v = i.to_string().into_bytes();
            let txn = Txn::new().and_then(TxnOp::put("/halo/test/a", v.clone(), None)).and_then(TxnOp::put(
                "/halo/test/b",
                v,
                None,
            ));
            s.txn(txn).await.unwrap();
        }
        i
    });
    let mut seen = Vec::new();
    for n in 0..20 {
        let bytes = backup::create(&*store, Vec::new(), Vec::new()).await.unwrap();
        let b = backup::open(&bytes).unwrap();
        let get = |k: &str| b.entries.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("/halo/test/a"), get("/halo/test/b"), "backup {n} mixes two revisions");
        seen.push(b.manifest.revision);
        if n == 19 {
            let target = dir.0.join("restored");
            let floor = backup::restore(&b, &target).await.unwrap();
            assert!(floor > b.manifest.revision);
            let restored = EmbeddedStore::open(&target).await.unwrap();
            assert_eq!(restored.get("/halo/test/a").await.unwrap().map(|kv| kv.value), get("/halo/test/a"));
            // Time only moves forward: the next write is above the floor.
            let rev = restored.put("/halo/x", b"1".to_vec(), None).await.unwrap();
            assert!(rev > floor, "revision {rev} after a restore to {floor}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(seen.windows(2).any(|w| w[0] != w[1]), "the writer never ran between backups ({writes} writes)");
}
