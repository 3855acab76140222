//! `halo agent` on an etcd that serves clients over TLS only and asks for
//! a client certificate: with the CA and a certificate it joins (writes its
//! node, serves its API); without the certificate, in the clear or with a
//! key others can read, it is refused with an error that says why. On an
//! etcd with users, the same for a missing user or a wrong password.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use halo_store::{EtcdAuth, EtcdStore, Store};
use halo_testkit::{eventually, free_addr, Etcd, Halo, TempDir, TestCa};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn node_file(dir: &TempDir) -> String {
    let text =
        format!("[node]\napi = \"{}\"\n[[listeners]]\nname = \"http\"\nlisten = \"{}\"\n", free_addr(), free_addr());
    dir.write("node.toml", &text).to_string_lossy().into_owned()
}

/// `halo agent` run to its end (it must fail fast): exit code and stderr.
fn agent_fails(args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("refused: {}", err.trim());
    (out.status.code(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_needs_the_ca_and_a_client_certificate_to_use_a_tls_etcd() {
    let ca = TestCa::new();
    let etcd = Etcd::start_tls(&ca, &ca.issue(&["127.0.0.1"]));
    let dir = TempDir::new("etcd-tls-agent");
    let ca_file = dir.write("ca.crt", &ca.ca_pem()).to_string_lossy().into_owned();
    let client = ca.issue(&["halo-agent"]);
    let (cert, key) = client.write(&dir, "agent");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (cert, key) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    let tls_store = format!("etcds://{}", etcd.endpoint());
    let data = dir.0.join("data").to_string_lossy().into_owned();
    let node = node_file(&dir);
    let base = ["agent", "--node", "n1", "--advertise", "127.0.0.1", "-c", &node, "--data-dir", &data];

    // In the clear, to a TLS-only member.
    let plain = format!("etcd://{}", etcd.endpoint());
    let (code, err) = agent_fails(&[&base[..], &["--store", &plain]].concat());
    assert_ne!(code, Some(0));
    assert!(err.contains("cannot reach etcd"), "{err}");
    // TLS without the CA.
    let (code, err) = agent_fails(&[&base[..], &["--store", &tls_store]].concat());
    assert_ne!(code, Some(0));
    assert!(err.contains("etcds:// needs --etcd-ca"), "{err}");
    // TLS without a client certificate: etcd refuses the connection.
    let (code, err) = agent_fails(&[&base[..], &["--store", &tls_store, "--etcd-ca", &ca_file]].concat());
    assert_ne!(code, Some(0), "an agent without a client certificate ran");
    assert!(err.contains("cannot reach etcd"), "{err}");
    // A key others can read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_cert = ["--store", &tls_store, "--etcd-ca", &ca_file, "--etcd-cert", &cert, "--etcd-key", &key];
    let (code, err) = agent_fails(&[&base[..], &with_cert[..]].concat());
    assert_ne!(code, Some(0));
    assert!(err.contains("--etcd-key") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // With all of it the agent joins: its node record is in etcd.
    let args = [&base[..], &with_cert[..]].concat();
    let agent = Halo::start(BIN, &args, &dir.0).unwrap();
    let auth = EtcdAuth {
        ca: Some(ca.ca_pem().into_bytes()),
        identity: Some((client.cert_pem.clone().into_bytes(), client.key_pem.clone().into_bytes())),
        user: None,
    };
    let store = EtcdStore::connect_with(&[etcd.endpoint()], "", &auth).await.unwrap();
    eventually(Duration::from_secs(20), "the agent's node record in etcd", || async {
        store.list("/halo/nodes/").await.is_ok_and(|l| l.kvs.iter().any(|kv| kv.key.ends_with("/n1")))
    })
    .await;
    // A client without a certificate reads nothing.
    let no_cert = EtcdAuth { identity: None, ..auth.clone() };
    let refused = match EtcdStore::connect_with(&[etcd.endpoint()], "", &no_cert).await {
        Err(e) => e.to_string(),
        Ok(s) => s.list("/halo/").await.map(|l| format!("read {} keys", l.kvs.len())).unwrap_or_else(|e| e.to_string()),
    };
    assert!(!refused.starts_with("read "), "a client without a certificate {refused}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_needs_its_user_and_password_on_an_etcd_with_auth() {
    let etcd = Etcd::start();
    etcd.enable_auth("s3cret-pass").await;
    let dir = TempDir::new("etcd-auth-agent");
    let store = format!("etcd://{}", etcd.endpoint());
    let data = dir.0.join("data").to_string_lossy().into_owned();
    let node = node_file(&dir);
    let base =
        ["agent", "--node", "n1", "--advertise", "127.0.0.1", "-c", &node, "--data-dir", &data, "--store", &store];
    // No user: etcd refuses the first read.
    let (code, err) = agent_fails(&base);
    assert_ne!(code, Some(0), "an agent without the user ran");
    assert!(err.contains("cannot reach etcd") && err.contains("user name is empty"), "{err}");
    // A wrong password: refused at the authentication itself.
    let wrong = dir.write("wrong", "nope\n");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = wrong.to_string_lossy().into_owned();
    let (code, err) = agent_fails(&[&base[..], &["--etcd-user", "root", "--etcd-password-file", &wrong]].concat());
    assert_ne!(code, Some(0));
    assert!(err.contains("authentication failed"), "{err}");
    // The password from the environment: the agent joins.
    let args = [&base[..], &["--etcd-user", "root"]].concat();
    std::env::set_var("HALO_ETCD_PASSWORD", "s3cret-pass");
    let agent = Halo::start(BIN, &args, &dir.0).unwrap();
    std::env::remove_var("HALO_ETCD_PASSWORD");
    let auth = EtcdAuth { user: Some(("root".into(), "s3cret-pass".into())), ..Default::default() };
    let s = EtcdStore::connect_with(&[etcd.endpoint()], "", &auth).await.unwrap();
    eventually(Duration::from_secs(20), "the agent's node record in etcd", || async {
        s.list("/halo/nodes/").await.is_ok_and(|l| l.kvs.iter().any(|kv| kv.key.ends_with("/n1")))
    })
    .await;
    drop(agent);
}

/// The store keeps only the digest of the cluster's API token: a second
/// agent joins with the first one's token (`--token-file`) and is refused,
/// saying how to fix it, with another token; both answer the same admin
/// and read-only tokens, and the read-only one cannot change anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_token_is_kept_as_a_digest_and_a_node_must_bring_it() {
    let etcd = Etcd::start();
    let dir = TempDir::new("etcd-token");
    let store = format!("etcd://{}", etcd.endpoint());
    let agent = |n: &str| -> Vec<String> {
        let data = dir.0.join(n).to_string_lossy().into_owned();
        let node = std::fs::read_to_string(node_file(&dir)).unwrap();
        let file = dir.write(&format!("{n}.toml"), &node).to_string_lossy().into_owned();
        ["agent", "--node", n, "--advertise", "127.0.0.1", "-c", &file, "--data-dir", &data, "--store", &store]
            .map(str::to_string)
            .to_vec()
    };
    let first = agent("n1");
    let first_refs: Vec<&str> = first.iter().map(String::as_str).collect();
    let n1 = Halo::start(BIN, &first_refs, &dir.0).unwrap();
    let token = std::fs::read_to_string(dir.0.join("n1/token")).unwrap().trim().to_string();
    let s = EtcdStore::connect(&[etcd.endpoint()], "").await.unwrap();
    let kept = String::from_utf8(s.get("/halo/api-token").await.unwrap().unwrap().value).unwrap();
    assert!(kept.starts_with("sha256:") && !kept.contains(&token), "the store keeps {kept}");
    let read = std::fs::read_to_string(dir.0.join("n1/read-token")).unwrap().trim().to_string();
    let listing = s.list("/halo/").await.unwrap();
    for kv in &listing.kvs {
        let v = String::from_utf8_lossy(&kv.value);
        assert!(!v.contains(&token) && !v.contains(&read), "{} holds a token in clear", kv.key);
    }

    // Another token: refused, naming the file and the fix.
    let second = agent("n2");
    let mut refs: Vec<&str> = second.iter().map(String::as_str).collect();
    let wrong = dir.write("wrong-token", "0123456789abcdef0123456789abcdef0123456789abcdef\n");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = wrong.to_string_lossy().into_owned();
    let (code, err) = agent_fails(&[&refs[..], &["--token-file", &wrong]].concat());
    assert_ne!(code, Some(0), "an agent with another token joined");
    assert!(err.contains("not the cluster's") && err.contains(&wrong) && err.contains("--token-file"), "{err}");
    // No token file at all: its own new token is not the cluster's either.
    let (code, err) = agent_fails(&refs);
    assert!(code != Some(0) && err.contains("not the cluster's"), "{err}");
    // The first node's token: it joins, and both nodes answer both tokens.
    let right = dir.write("cluster-token", &format!("{token}\n"));
    std::fs::set_permissions(&right, std::fs::Permissions::from_mode(0o600)).unwrap();
    let right = right.to_string_lossy().into_owned();
    refs.extend(["--token-file", &right]);
    let n2 = Halo::start(BIN, &refs, &dir.0).unwrap();
    let c = halo_testkit::Client::new();
    for (h, name) in [(&n1, "n1"), (&n2, "n2")] {
        let api = h.api.expect("the agent's API address");
        for (t, want) in [(&token, 200), (&read, 200)] {
            let req = http::Request::get(format!("http://{api}/v1/status"))
                .header("authorization", format!("Bearer {t}"))
                .body(http_body_util::Full::default())
                .unwrap();
            assert_eq!(c.send(req).await.unwrap().status, want, "{name} GET /v1/status");
        }
        let req = http::Request::post(format!("http://{api}/v1/services/x/restart"))
            .header("authorization", format!("Bearer {read}"))
            .body(http_body_util::Full::default())
            .unwrap();
        assert_eq!(c.send(req).await.unwrap().status, 403, "{name}: the read-only token changed something");
    }
    drop((n1, n2));
}
