//! The etcd store against a real etcd: the same conformance suite as the
//! embedded store (each case on its own etcd, since revisions are
//! store-wide), plus what only etcd has: namespaces and a watch that ends,
//! rather than hangs, when its server goes away.

use std::time::Duration;

use halo_store::{EtcdStore, Store, StoreError};
use halo_testkit::Etcd;

async fn fresh() -> (EtcdStore, Etcd) {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint()], "/conformance").await.unwrap();
    (store, etcd)
}

halo_store::conformance_tests!(fresh);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_see_each_other() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let a = EtcdStore::connect(&[etcd.endpoint()], "/a").await.unwrap();
    let b = EtcdStore::connect(&[etcd.endpoint()], "/b").await.unwrap();
    a.put("/k", b"a".to_vec(), None).await.unwrap();
    b.put("/k", b"b".to_vec(), None).await.unwrap();
    assert_eq!(a.get("/k").await.unwrap().unwrap().value, b"a");
    let l = b.list("").await.unwrap();
    assert_eq!(l.kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/k"], "keys come back without namespace");
    for bad in ["a", "/a/"] {
        let err = EtcdStore::connect(&[etcd.endpoint()], bad).await.unwrap_err();
        assert!(err.to_string().contains("must start with '/'"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_etcd_dies_and_requests_fail_fast() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let s = EtcdStore::connect(&[etcd.endpoint()], "/w").await.unwrap();
    let mut w = s.watch("/", 0).await.unwrap();
    s.put("/x", b"1".to_vec(), None).await.unwrap();
    assert!(w.next().await.is_some());
    drop(etcd);
    let ended = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
    assert!(matches!(ended, Ok(None)), "the watch did not end within 10s of etcd's death");
    let t = std::time::Instant::now();
    let err = s.get("/x").await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "a request to a dead etcd hung for {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_does_not_fail_or_slow_requests() {
    let mut etcd = tokio::task::spawn_blocking(|| Etcd::cluster(3)).await.unwrap();
    let s = EtcdStore::connect(&etcd.endpoints(), "/m").await.unwrap();
    s.put("/k", b"v".to_vec(), None).await.unwrap();
    etcd.kill(1);
    // If it was the raft leader, requests fail (time out) until the
    // others elect a new one; then none may fail.
    let t = std::time::Instant::now();
    while s.put("/k", b"v".to_vec(), None).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(15), "no write succeeded within 15s of losing one member");
    }
    println!("first write after the kill succeeded after {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let mut slow = Vec::new();
    for i in 0..60 {
        let one = std::time::Instant::now();
        let r = s.put(&format!("/k{i}"), b"v".to_vec(), None).await;
        let took = one.elapsed();
        assert!(r.is_ok(), "request {i} failed with a member down after {took:?}: {r:?}");
        assert!(s.get("/k").await.is_ok(), "a read failed with a member down");
        if took > Duration::from_millis(500) {
            slow.push(took);
        }
    }
    println!("60 writes and reads with one of three members dead: {:?}, slow: {slow:?}", t.elapsed());
    assert!(slow.is_empty(), "writes took long with a member down: {slow:?}");
}
