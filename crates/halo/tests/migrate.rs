//! A data directory written by the `halo up` of before the one control
//! plane (fixtures/v1-data, made with that binary) keeps working: today's
//! `halo up` moves its records to the cluster layout and adopts the running
//! instances with the same ids and pids, restarting none.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use halo_store::{EmbeddedStore, Store};
use halo_testkit::{eventually, Client, Halo, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_halo");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-data/store.redb");

/// The start time of `pid` (field 22 of /proc/PID/stat), as halo records it.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(19).unwrap().parse().unwrap()
}

/// Instances "left running by the old halo": demo-app processes in their
/// own process groups, marked with the data directory as halo marks them.
struct Leftovers(Vec<Child>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_old_layout_is_migrated_and_its_instances_adopted() {
    let dir = TempDir::new("migrate");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(FIXTURE, data.join("store.redb")).unwrap();
    let data = data.canonicalize().unwrap();

    // Point the fixture's instance records at live processes.
    let mut leftovers = Leftovers(Vec::new());
    let mut expected = Vec::new();
    {
        let store = EmbeddedStore::open(&data).await.unwrap();
        let records = store.list("/halo/instances/").await.unwrap().kvs;
        assert_eq!(records.len(), 2, "the fixture holds two instance records");
        for kv in records {
            assert_eq!(kv.key.split('/').count(), 5, "not the old layout: {}", kv.key);
            let mut rec: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
            let port = halo_testkit::free_addr().port();
            let child = Command::new(BIN)
                .args(["demo-app", "--version", "v1"])
                .env("HOST", "127.0.0.1")
                .env("PORT", port.to_string())
                .env("HALO_INSTANCE", rec["id"].as_str().unwrap())
                .env("HALO_DATA_DIR", &data)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            rec["pid"] = child.id().into();
            rec["start_time"] = start_time(child.id()).into();
            rec["port"] = port.into();
            expected.push((rec["id"].as_str().unwrap().to_string(), i64::from(child.id())));
            leftovers.0.push(child);
            store.put(&kv.key, serde_json::to_vec(&rec).unwrap(), None).await.unwrap();
        }
    }
    expected.sort();

    // The stored service (2 replicas) wins over the node file's.
    let node = halo_testkit::quickstart(3);
    let file = dir.write("halo.toml", &node);
    let h =
        Halo::start(BIN, &["up", "-c", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &dir.0).unwrap();
    let instances = || {
        let s = h.status();
        let svc = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "demo").cloned();
        svc.map(|s| s["instances"].as_array().unwrap().clone()).unwrap_or_default()
    };
    eventually(Duration::from_secs(20), "both instances adopted and ready", || async {
        let all = instances();
        all.len() == 2 && all.iter().all(|i| i["ready"] == true)
    })
    .await;
    let mut adopted: Vec<(String, i64)> =
        instances().iter().map(|i| (i["id"].as_str().unwrap().to_string(), i["pid"].as_i64().unwrap())).collect();
    adopted.sort();
    assert_eq!(adopted, expected, "instances were replaced instead of adopted");
    assert!(instances().iter().all(|i| i["restarts"] == 0 && i["current"] == true), "{:?}", instances());
    // Still the same two a moment later: the scheduler kept them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut pids: Vec<i64> = halo_testkit::processes_of(&data).into_iter().map(i64::from).collect();
    pids.sort();
    let mut want: Vec<i64> = expected.iter().map(|(_, p)| *p).collect();
    want.sort();
    assert_eq!(pids, want, "processes of the data directory changed");
    let r = Client::new().get(&h.url("http", "/")).await.unwrap();
    assert!(r.body.starts_with("demo-app v1 instance demo-"), "{}", r.body);
    let (code, out, err) = h.cli(&["node", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local"), "{out}");
}
