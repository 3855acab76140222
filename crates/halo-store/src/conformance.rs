//! The conformance suite: what every [`Store`] implementation must do.
//!
//! Each case takes a fresh, empty store. An implementation's test file runs
//! them all with [`conformance_tests!`](crate::conformance_tests), giving an
//! async function that opens a fresh store and returns it with a guard that
//! keeps its resources (a temporary directory, a server) alive:
//!
//! ```ignore
//! async fn fresh() -> (EmbeddedStore, TempDir) { ... }
//! halo_store::conformance_tests!(fresh);
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::{Compare, CompareOp, CompareTarget, Event, EventKind, Store, StoreError, Txn, TxnOp, Watch};

/// Declares one `#[tokio::test]` per conformance case, each on a store
/// from `$fresh`.
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:path) => {
        $crate::conformance_tests!(@cases $fresh;
            put_get_and_revisions, list_by_prefix_is_sorted_and_bounded, a_large_listing_is_whole, delete_and_recreate,
            txn_compare_and_swap, txn_is_atomic_and_checks_leases, concurrent_cas_loses_no_update,
            watch_from_a_revision_replays_then_follows, watch_filters_by_prefix_and_sees_deletes,
            watch_from_compacted_revision_fails, lease_keep_alive_and_expiry, lease_revoke_deletes_keys,
            bad_requests_are_refused);
    };
    (@cases $fresh:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $fresh().await;
                $crate::conformance::$case(&store).await;
            }
        )*
    };
}

fn put(key: &str, value: &str) -> TxnOp {
    TxnOp::put(key, value.as_bytes().to_vec(), None)
}

async fn next(w: &mut Watch) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no watch event within 10s")
        .expect("watch ended")
}

pub async fn put_get_and_revisions<S: Store>(s: &S) {
    assert_eq!(s.get("/a").await.unwrap(), None);
    let r1 = s.put("/a", b"one".to_vec(), None).await.unwrap();
    let kv = s.get("/a").await.unwrap().expect("written key is readable");
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version), (&b"one"[..], r1, r1, 1));
    let r2 = s.put("/a", b"two".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revisions must increase: {r1} then {r2}");
    let kv = s.get("/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version), (&b"two"[..], r1, r2, 2));
    let r3 = s.put("/b", Vec::new(), None).await.unwrap();
    assert!(r3 > r2);
    assert_eq!(s.get("/b").await.unwrap().unwrap().value, Vec::<u8>::new(), "an empty value is a value");
}

pub async fn list_by_prefix_is_sorted_and_bounded<S: Store>(s: &S) {
    for k in ["/svc/b", "/svc/a", "/svc/a/x", "/svd", "/sv"] {
        s.put(k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    let last = s.put("/svc/c", b"c".to_vec(), None).await.unwrap();
    let l = s.list("/svc/").await.unwrap();
    let keys: Vec<&str> = l.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/svc/a", "/svc/a/x", "/svc/b", "/svc/c"]);
    assert_eq!(l.kvs[0].value, b"/svc/a");
    assert!(l.revision >= last, "listing revision {} is older than the last write {last}", l.revision);
    assert!(s.list("/nothing/").await.unwrap().kvs.is_empty());
    assert_eq!(s.list("").await.unwrap().kvs.len(), 6, "the empty prefix lists everything");
}

/// More than gRPC's 4 MiB message limit in one listing (a large
/// cluster's root): every key, in order, at one revision.
pub async fn a_large_listing_is_whole<S: Store>(s: &S) {
    let value = vec![b'x'; 4096];
    let mut last = 0;
    for chunk in 0..12 {
        let mut txn = Txn::new();
        for i in 0..100 {
            txn = txn.and_then(TxnOp::put(&format!("/big/{:05}", chunk * 100 + i), value.clone(), None));
        }
        last = s.txn(txn).await.unwrap().revision;
    }
    s.put("/bigger", b"outside".to_vec(), None).await.unwrap();
    let l = s.list("/big/").await.unwrap();
    assert_eq!(l.kvs.len(), 1200);
    assert!(l.kvs.windows(2).all(|w| w[0].key < w[1].key), "listed in key order");
    assert!(l.kvs.iter().all(|kv| kv.value == value && kv.mod_revision <= l.revision));
    assert!(l.revision >= last);
}

pub async fn delete_and_recreate<S: Store>(s: &S) {
    let r1 = s.put("/k", b"v".to_vec(), None).await.unwrap();
    let rd = s.delete("/k").await.unwrap().expect("deleting an existing key reports its revision");
    assert!(rd > r1);
    assert_eq!(s.get("/k").await.unwrap(), None);
    assert_eq!(s.delete("/k").await.unwrap(), None, "deleting a missing key reports nothing deleted");
    let r2 = s.put("/k", b"w".to_vec(), None).await.unwrap();
    let kv = s.get("/k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r2, 1), "a recreated key starts over");
    s.put("/p/1", vec![], None).await.unwrap();
    s.put("/p/2", vec![], None).await.unwrap();
    s.put("/q", vec![], None).await.unwrap();
    s.txn(Txn::new().and_then(TxnOp::DeletePrefix("/p/".into()))).await.unwrap();
    assert!(s.list("/p/").await.unwrap().kvs.is_empty());
    assert!(s.get("/q").await.unwrap().is_some(), "delete by prefix stays inside its prefix");
}

pub async fn txn_compare_and_swap<S: Store>(s: &S) {
    // Create only if absent.
    let create = || Txn::new().when(Compare::absent("/leader")).and_then(put("/leader", "n1"));
    let r = s.txn(create()).await.unwrap();
    assert!(r.succeeded);
    let again = s.txn(create()).await.unwrap();
    assert!(!again.succeeded, "create-if-absent succeeded twice");
    assert_eq!(again.revision, r.revision, "a txn that changed nothing moved the revision");
    // Swap on the mod revision; a stale revision runs the failure branch.
    let swap = |rev| {
        Txn::new()
            .when(Compare::mod_revision("/leader", rev))
            .and_then(put("/leader", "n2"))
            .or_else(put("/lost", "yes"))
    };
    let ok = s.txn(swap(r.revision)).await.unwrap();
    assert!(ok.succeeded && ok.revision > r.revision);
    let stale = s.txn(swap(r.revision)).await.unwrap();
    assert!(!stale.succeeded);
    assert_eq!(s.get("/leader").await.unwrap().unwrap().value, b"n2");
    assert_eq!(s.get("/lost").await.unwrap().unwrap().value, b"yes", "the failure branch did not run");
    // Value and version compares, and several compares together.
    let both = Txn::new()
        .when(Compare::new("/leader", CompareOp::Equal, CompareTarget::Value(b"n2".to_vec())))
        .when(Compare::new("/leader", CompareOp::Greater, CompareTarget::Version(1)))
        .and_then(put("/both", "1"));
    assert!(s.txn(both).await.unwrap().succeeded);
    let one_fails = Txn::new()
        .when(Compare::new("/leader", CompareOp::Equal, CompareTarget::Value(b"n2".to_vec())))
        .when(Compare::new("/missing", CompareOp::Equal, CompareTarget::Value(Vec::new())))
        .and_then(put("/never", "1"));
    assert!(!s.txn(one_fails).await.unwrap().succeeded, "a missing key compared equal to a value");
    assert_eq!(s.get("/never").await.unwrap(), None);
    let created = s.get("/leader").await.unwrap().unwrap().create_revision;
    let less = Txn::new().when(Compare::new("/leader", CompareOp::Less, CompareTarget::CreateRevision(created + 1)));
    assert!(s.txn(less).await.unwrap().succeeded);
}

pub async fn txn_is_atomic_and_checks_leases<S: Store>(s: &S) {
    let r = s
        .txn(Txn::new().and_then(put("/x/1", "a")).and_then(put("/x/2", "b")).and_then(put("/x/3", "c")))
        .await
        .unwrap();
    let l = s.list("/x/").await.unwrap();
    assert!(l.kvs.iter().all(|kv| kv.mod_revision == r.revision), "one txn, one revision");
    // A put on a missing lease fails the whole txn: nothing is applied.
    let bad = Txn::new().and_then(put("/x/1", "changed")).and_then(TxnOp::put("/x/4", "d", Some(0x7fff_0000)));
    assert!(matches!(s.txn(bad).await, Err(StoreError::LeaseNotFound(_))));
    assert_eq!(s.get("/x/1").await.unwrap().unwrap().value, b"a", "a failed txn applied part of its ops");
    assert_eq!(s.get("/x/4").await.unwrap(), None);
}

pub async fn concurrent_cas_loses_no_update<S: Store + Clone>(s: &S) {
    s.put("/counter", b"0".to_vec(), None).await.unwrap();
    let (tasks, per_task) = (4, 10);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while done < per_task {
                let kv = s.get("/counter").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                let txn = Txn::new()
                    .when(Compare::mod_revision("/counter", kv.mod_revision))
                    .and_then(put("/counter", &(n + 1).to_string()));
                if s.txn(txn).await.unwrap().succeeded {
                    done += 1;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let kv = s.get("/counter").await.unwrap().unwrap();
    assert_eq!(kv.value, (tasks * per_task).to_string().as_bytes(), "a compare-and-swap update was lost");
}

pub async fn watch_from_a_revision_replays_then_follows<S: Store>(s: &S) {
    let r1 = s.put("/w/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/w/a", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/w/b", b"3".to_vec(), None).await.unwrap();
    let mut w = s.watch("/w/", r2).await.unwrap();
    let first = next(&mut w).await;
    assert_eq!((first.len(), first[0].kv.mod_revision, first[0].kv.value.as_slice()), (1, r2, &b"2"[..]));
    assert_eq!(next(&mut w).await[0].kv.mod_revision, r3);
    let r4 = s.txn(Txn::new().and_then(put("/w/c", "4")).and_then(put("/w/d", "5"))).await.unwrap().revision;
    let live = next(&mut w).await;
    let keys: Vec<&str> = live.iter().map(|e| e.kv.key.as_str()).collect();
    assert_eq!(keys, ["/w/c", "/w/d"], "one txn arrives as one batch");
    assert!(live.iter().all(|e| e.kind == EventKind::Put && e.kv.mod_revision == r4));
    // From 0: only what happens after the watch starts.
    let mut now = s.watch("/w/", 0).await.unwrap();
    let r5 = s.put("/w/e", b"6".to_vec(), None).await.unwrap();
    assert_eq!(next(&mut now).await[0].kv.mod_revision, r5);
    assert!(r1 < r2);
}

pub async fn watch_filters_by_prefix_and_sees_deletes<S: Store>(s: &S) {
    let mut w = s.watch("/only/", 0).await.unwrap();
    s.put("/other", b"x".to_vec(), None).await.unwrap();
    s.put("/only/k", b"v".to_vec(), None).await.unwrap();
    let put_batch = next(&mut w).await;
    assert_eq!(put_batch[0].kv.key, "/only/k", "a watch saw a key outside its prefix");
    let rd = s.delete("/only/k").await.unwrap().unwrap();
    let del = next(&mut w).await;
    assert_eq!((del[0].kind, del[0].kv.key.as_str(), del[0].kv.mod_revision), (EventKind::Delete, "/only/k", rd));
}

pub async fn watch_from_compacted_revision_fails<S: Store>(s: &S) {
    let r1 = s.put("/c", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/c", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/c", b"3".to_vec(), None).await.unwrap();
    s.compact(r3).await.unwrap();
    match s.watch("/c", r1).await {
        Err(StoreError::Compacted { requested, compacted }) => assert_eq!((requested, compacted), (r1, r3)),
        other => panic!("watch from a compacted revision: {:?}", other.map(|_| "a watch")),
    }
    assert!(r2 < r3);
    let mut w = s.watch("/c", r3).await.expect("the compact revision itself is still watchable");
    assert_eq!(next(&mut w).await[0].kv.value, b"3");
    assert!(matches!(s.compact(r3 + 100).await, Err(StoreError::Invalid(_))), "compacting the future");
    assert_eq!(s.get("/c").await.unwrap().unwrap().value, b"3", "compaction removed current data");
}

pub async fn lease_keep_alive_and_expiry<S: Store>(s: &S) {
    let ttl = Duration::from_secs(2);
    let lease = s.grant(ttl).await.unwrap();
    s.put("/nodes/n1", b"up".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(s.get("/nodes/n1").await.unwrap().unwrap().lease, Some(lease));
    let mut w = s.watch("/nodes/", 0).await.unwrap();
    // Kept alive for longer than its TTL: the key stays.
    let start = Instant::now();
    while start.elapsed() < ttl + Duration::from_secs(1) {
        assert!(s.keep_alive(lease).await.unwrap() >= Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(s.get("/nodes/n1").await.unwrap().is_some(), "a kept-alive lease expired");
    // Left alone, it expires and its key goes, with a delete event.
    let stopped = Instant::now();
    let del = next(&mut w).await;
    assert_eq!((del[0].kind, del[0].kv.key.as_str()), (EventKind::Delete, "/nodes/n1"));
    let took = stopped.elapsed();
    assert!(took >= Duration::from_millis(1500), "the lease expired {took:?} after its last keep-alive");
    assert_eq!(s.get("/nodes/n1").await.unwrap(), None);
    let r = s.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "keep-alive of an expired lease: {r:?}");
    assert!(matches!(s.put("/nodes/n1", vec![], Some(lease)).await, Err(StoreError::LeaseNotFound(_))));
}

pub async fn lease_revoke_deletes_keys<S: Store>(s: &S) {
    let lease = s.grant(Duration::from_secs(30)).await.unwrap();
    let other = s.grant(Duration::from_secs(30)).await.unwrap();
    s.put("/l/a", vec![], Some(lease)).await.unwrap();
    s.put("/l/b", vec![], Some(lease)).await.unwrap();
    s.put("/l/c", vec![], Some(other)).await.unwrap();
    // Re-putting without the lease detaches the key from it.
    s.put("/l/b", b"kept".to_vec(), None).await.unwrap();
    s.revoke(lease).await.unwrap();
    let left: BTreeSet<String> = s.list("/l/").await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(left, BTreeSet::from(["/l/b".to_string(), "/l/c".to_string()]));
    assert!(matches!(s.revoke(lease).await, Err(StoreError::LeaseNotFound(_))));
}

pub async fn bad_requests_are_refused<S: Store>(s: &S) {
    assert!(matches!(s.put("", b"x".to_vec(), None).await, Err(StoreError::Invalid(_))));
    assert!(matches!(s.grant(Duration::ZERO).await, Err(StoreError::Invalid(_))));
    assert!(s.list("").await.unwrap().kvs.is_empty(), "a refused request wrote something");
}
