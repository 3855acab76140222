//! The embedded store: the conformance suite, plus what only a store on
//! disk has to prove (restart, kill -9, one process per data directory).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use halo_store::{EmbeddedStore, Store, StoreError};
use halo_testkit::TempDir;

async fn fresh() -> (EmbeddedStore, TempDir) {
    let dir = TempDir::new("store");
    (EmbeddedStore::open(&dir.0).await.unwrap(), dir)
}

halo_store::conformance_tests!(fresh);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_data_revisions_and_leases() {
    let dir = TempDir::new("store-reopen");
    let (rev, lease) = {
        let s = EmbeddedStore::open(&dir.0).await.unwrap();
        let lease = s.grant(Duration::from_secs(60)).await.unwrap();
        s.put("/a", b"1".to_vec(), Some(lease)).await.unwrap();
        (s.put("/b", b"2".to_vec(), None).await.unwrap(), lease)
    };
    // The expiry task holds only a weak reference: the file is free again
    // once the last handle is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = EmbeddedStore::open(&dir.0).await.unwrap();
    assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
    assert_eq!(s.get("/a").await.unwrap().unwrap().lease, Some(lease));
    assert!(s.put("/c", vec![], None).await.unwrap() > rev, "revision went back after a restart");
    s.keep_alive(lease).await.expect("a lease survives a restart with a fresh TTL");
    let mut w = s.watch("/", rev).await.unwrap();
    assert_eq!(w.next().await.unwrap()[0].kv.key, "/b", "history survives a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_open_the_same_store() {
    let dir = TempDir::new("store-lock");
    let _s = EmbeddedStore::open(&dir.0).await.unwrap();
    match EmbeddedStore::open(&dir.0).await {
        Err(e @ StoreError::Open { .. }) => assert!(e.to_string().contains("already open"), "{e}"),
        other => panic!("second open: {:?}", other.map(|_| "opened")),
    }
}

/// Run by `kill_9_during_writes_loses_no_acknowledged_write` as a child
/// process: writes keys in a loop and acknowledges each on stdout.
#[test]
#[ignore = "a child process of the kill -9 test, not a test"]
fn writer_child() {
    let Some(dir) = std::env::var_os("HALO_STORE_WRITER") else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = EmbeddedStore::open(std::path::Path::new(&dir)).await.unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0.. {
            let key = format!("/k/{}-{i:06}", std::process::id());
            // Values of every size, some over a page, so the file grows
            // and pages split while it dies.
            let size = [8, 300, 5_000, 70_000][i % 4];
            let rev = s.put(&key, vec![b'0' + (i % 10) as u8; size], None).await.unwrap();
            writeln!(out, "ack {key} {rev}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = TempDir::new("store-kill9");
    let mut acked: Vec<(String, i64)> = Vec::new();
    // Where each round kills: a seeded spread of points, replayable by
    // HALO_STORE_KILL_SEED.
    let mut rng = halo_testkit::Rng::from_env("HALO_STORE_KILL_SEED");
    let mut next = move |n: u64| rng.below(n as usize) as u64;
    for round in 0..10u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["writer_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("HALO_STORE_WRITER", &dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ack ") {
                    let (key, rev) = rest.split_once(' ').unwrap();
                    let _ = tx.send((key.to_string(), rev.parse::<i64>().unwrap()));
                }
            }
        });
        // Kill at a different point each round, mid-stream: after 1 to 150
        // acknowledged writes, then up to 5 ms on (a write under way).
        let want = 1 + next(150) as usize;
        let extra = Duration::from_micros(next(5_000));
        let deadline = Instant::now() + Duration::from_secs(30);
        let before = acked.len();
        while acked.len() - before < want && Instant::now() < deadline {
            if let Ok(ack) = rx.recv_timeout(Duration::from_millis(100)) {
                acked.push(ack);
            }
        }
        assert!(acked.len() - before >= want, "the writer acknowledged only {} writes in 30s", acked.len() - before);
        std::thread::sleep(extra);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        // Also what was still in the pipe when it died: acknowledged too.
        acked.extend(rx.try_iter());
        let s = EmbeddedStore::open(&dir.0).await.unwrap();
        let kvs = s.list("/k/").await.unwrap().kvs;
        for (key, rev) in &acked {
            let kv = kvs.iter().find(|kv| &kv.key == key);
            assert_eq!(
                kv.map(|kv| kv.mod_revision),
                Some(*rev),
                "acknowledged write {key} at {rev} lost (round {round}, {want} acknowledged, then {extra:?})"
            );
        }
        let revs: Vec<i64> = acked.iter().map(|(_, r)| *r).collect();
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "revisions not monotonic across restarts");
        drop(s);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
