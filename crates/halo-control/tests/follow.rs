//! `state::follow` against a real 3-member etcd: a watch whose member
//! dies resumes on another from the last revision seen + 1, so changes made
//! after the loss still wake the follower and none is skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halo_control::state::{follow, Feed};
use halo_store::{EtcdStore, Store};
use halo_testkit::{eventually, Etcd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_resumes_after_its_member_dies() {
    let mut etcd = tokio::task::spawn_blocking(|| Etcd::cluster(3)).await.unwrap();
    let store = EtcdStore::connect(&etcd.endpoints(), "").await.unwrap();
    let wakes = Arc::new(AtomicU64::new(0));
    let w = wakes.clone();
    let task = tokio::spawn(follow(
        Arc::new(store.clone()),
        "/f/",
        0,
        // Listings, events and breaks wake; the watch's (re)start alone does not.
        move |feed| {
            if !matches!(feed, Feed::Watching) {
                w.fetch_add(1, Ordering::SeqCst);
            }
        },
    ));
    eventually(Duration::from_secs(5), "the first wake (the listing)", || async { wakes.load(Ordering::SeqCst) > 0 })
        .await;
    store.put("/f/a", b"1".to_vec(), None).await.unwrap();
    eventually(Duration::from_secs(5), "a wake for a put", || async { wakes.load(Ordering::SeqCst) >= 2 }).await;
    // The store is pinned to the first member: kill it under the watch.
    etcd.kill(0);
    let before = wakes.load(Ordering::SeqCst);
    // A write on the survivors (the store moves on by itself).
    let writer = EtcdStore::connect(&etcd.endpoints()[1..], "").await.unwrap();
    let start = std::time::Instant::now();
    while writer.put("/f/b", b"2".to_vec(), None).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(15), "no write on the surviving members");
    }
    // By now the broken watch was noticed (its own wake included); a
    // change from here on wakes only through the resumed watch.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(wakes.load(Ordering::SeqCst) > before, "no wake at all after the member under the watch died");
    let settled = wakes.load(Ordering::SeqCst);
    writer.put("/f/c", b"3".to_vec(), None).await.unwrap();
    eventually(Duration::from_secs(5), "a wake from the resumed watch", || async {
        wakes.load(Ordering::SeqCst) > settled
    })
    .await;
    task.abort();
}
