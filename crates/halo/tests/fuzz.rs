//! Bounded fuzzing of everything halo parses from people and programs:
//! node, service and proxy files (every shipped example, mutated), and the
//! API's payloads through a running `halo up`. Nothing may panic; every
//! bad input gets an answer that says what is wrong.
//!
//! Deterministic per seed: `HALO_FUZZ_SEED` replays a run (the seed is
//! printed), `HALO_FUZZ_ROUNDS` sets the mutations per example file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use halo_testkit::{Client, Halo, Rng};
use http::Request;
use http_body_util::Full;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// Pieces that make parsers work hardest: TOML and JSON syntax, numbers
/// at and past the edges, units, odd strings, halo's own section names.
const TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "\"",
    "'",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\"\"\"",
    "0",
    "-1",
    "1e999",
    "nan",
    "18446744073709551616",
    "4294967296",
    "-9223372036854775809",
    "true",
    "\"\"",
    "\"0\"",
    "\"1s\"",
    "\"-5s\"",
    "\"1e9h\"",
    "\"100/s\"",
    "\"0/s\"",
    "\"/\"",
    "\"*.\"",
    "\"::\"",
    "\"127.0.0.1:0\"",
    "\"256.1.1.1:80\"",
    "\u{0}",
    "\u{feff}",
    "é",
    "[[services]]",
    "[[listeners]]",
    "[[routes]]",
    "[upstreams.x]",
    "[node]",
    "[proxy]",
    "[run]",
    "[balance]",
    "[release]",
    "[[vip]]",
    "replicas",
    "command",
    "listen",
    "endpoints",
    "rate_limit",
    "max_in_flight",
    "max_connections",
    "{\"replicas\":",
    "null",
    "[]",
    "{}",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(6) {
            0 if !b.is_empty() => {
                let end = (at + 1 + rng.below(40)).min(b.len());
                b.drain(at.min(end)..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                b.splice(at..at, t.iter().copied());
            }
            2 if at < b.len() => b[at] = (rng.next_u64() & 0xff) as u8,
            3 => b.truncate(at),
            4 => {
                // A line repeated: duplicate keys and tables.
                let s = String::from_utf8_lossy(&b).into_owned();
                let lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let l = lines[rng.below(lines.len())];
                    b.splice(at..at, format!("\n{l}\n").into_bytes());
                }
            }
            _ => {
                let digits = rng.next_u64().to_string();
                b.splice(at..at, digits.into_bytes());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn examples() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples"));
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "the examples were not found in {}", dir.display());
    out
}

/// Whether a refusal says nothing.
fn silent<T>(r: &Result<T, halo_model::Diagnostics>) -> bool {
    matches!(r, Err(d) if d.0.is_empty() || d.to_string().trim().is_empty())
}

/// Every reader of a file halo takes, on `text`: the node file, the
/// service file and the proxy file (alone and as a node's proxy part).
/// How many accepted it, and whether any refused without saying why.
fn read_all(file: &str, text: &str) -> (usize, bool) {
    let node = halo_control::parse_node(file, text);
    let service = halo_model::parse_service(file, text);
    let proxy = halo_proxy::config::parse(file, text);
    let part = halo_proxy::config::parse_with_services(file, text);
    let accepted = [node.is_ok(), service.is_ok(), proxy.is_ok(), part.is_ok()].iter().filter(|ok| **ok).count();
    (accepted, silent(&node) || silent(&service) || silent(&proxy) || silent(&part))
}

#[test]
fn mutated_node_service_and_proxy_files_never_panic_and_every_refusal_says_why() {
    let mut rng = Rng::from_env("HALO_FUZZ_SEED");
    let rounds: usize = std::env::var("HALO_FUZZ_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let (mut accepted, mut total) = (0, 0);
    for (path, text) in examples() {
        let file = path.display().to_string();
        for _ in 0..rounds {
            let input = mutate(&mut rng, &text);
            total += 1;
            match catch_unwind(AssertUnwindSafe(|| read_all(&file, &input))) {
                Ok((n, silent)) => {
                    assert!(!silent, "a refusal with no message for this mutation of {file}:\n{input}");
                    accepted += n;
                }
                Err(_) => panic!("a parser panicked on this mutation of {file}:\n{input}"),
            }
        }
    }
    println!("{total} mutated files, each read by the 4 parsers: {accepted} readings accepted, the rest refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_mutated_payloads_with_4xx_and_keeps_serving() {
    let mut rng = Rng::from_env("HALO_FUZZ_SEED");
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let c = Client::new();
    let token = h.token();
    let service = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/app.toml")).unwrap();
    let send = |method: &str, path: &str, body: String| {
        Request::builder()
            .method(method)
            .uri(h.api_url(path))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::from(body))
            .unwrap()
    };
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..150 {
        let (req, what) = if i % 3 == 0 {
            let body = mutate(&mut rng, "{\"replicas\": 2}");
            (send("POST", "/v1/services/nosuch/scale", body.clone()), body)
        } else {
            // A dry run: the same reading and validation as an apply, nothing stored.
            let body = mutate(&mut rng, &service);
            (send("PUT", "/v1/services?dry_run=true", body.clone()), body)
        };
        let r = c.send(req).await.unwrap_or_else(|e| panic!("no answer to this payload ({e}):\n{what}"));
        assert!(r.status.as_u16() < 500, "{} for this payload:\n{what}\n{}", r.status, r.body);
        if r.status.is_client_error() {
            assert!(!r.body.trim().is_empty(), "a refusal that does not say why, for:\n{what}");
        }
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    println!("answers by status: {statuses:?}");
    // Nothing stored or running was touched.
    let s = h.status();
    let names: Vec<&str> = s["services"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["demo"], "a dry run or a refused payload changed the services");
}
