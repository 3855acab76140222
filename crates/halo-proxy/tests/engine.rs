//! The engine in-process: the API the cluster will drive (`Proxy::start`,
//! `set_endpoints`, `reload`, `shutdown`) over real sockets.

use std::time::Duration;

use halo_proxy::config::{self, EndpointConfig};
use halo_proxy::{Proxy, ReloadError};
use halo_testkit::{Backend, Client};

fn config_for(addrs: &[std::net::SocketAddr]) -> config::Config {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "[proxy]\nworkers = 2\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"web\"\n\
         [upstreams.web]\nendpoints = [{}]\n[upstreams.web.health]\nenabled = false\n",
        eps.join(", ")
    );
    config::parse("engine-test", &text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_updates_move_traffic_and_bad_ones_change_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(config_for(&[a.addr]), None).await.unwrap();
    let url = format!("http://{}/", proxy.listener_addrs()[0].1);
    let c = Client::new();
    assert_eq!(c.get(&url).await.unwrap().backend(), Some("a"));

    proxy.set_endpoints("web", vec![EndpointConfig { addr: b.addr, weight: 1 }]).unwrap();
    for _ in 0..10 {
        assert_eq!(c.get(&url).await.unwrap().backend(), Some("b"));
    }
    assert!(matches!(proxy.set_endpoints("nope", vec![]), Err(ReloadError::UnknownUpstream(_))));
    assert_eq!(c.get(&url).await.unwrap().backend(), Some("b"), "a refused update changed the routing");
    // No endpoint at all (a service with no ready instance) is a valid
    // state: 503 naming the upstream, at once; traffic returns with them.
    proxy.set_endpoints("web", vec![]).unwrap();
    let r = c.get(&url).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.body.contains("'web'"), "{}", r.body);
    proxy.set_endpoints("web", vec![EndpointConfig { addr: b.addr, weight: 1 }]).unwrap();
    assert_eq!(c.get(&url).await.unwrap().backend(), Some("b"));

    // A reload from a config object works the same way; without a file,
    // reload_from_source says why it cannot.
    proxy.reload(config_for(&[a.addr, b.addr])).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(c.get(&url).await.unwrap().backend().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2);
    assert!(matches!(proxy.reload_from_source(), Err(ReloadError::NoSource)));

    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown(Duration::from_secs(1))).await.unwrap();
    let refused = tokio::net::TcpStream::connect(proxy.listener_addrs()[0].1).await.is_err();
    assert!(refused, "still accepting after shutdown");
}
