//! The dashboard at /ui, in a real headless Chromium against a real
//! `halo up`: it signs in with the token, shows three ready instances and
//! the traffic through the proxy, an instance killed with kill -9 comes
//! back on the page with its restart and exit counted, the events say so,
//! and a canary's Promote button promotes it. A screenshot is left under
//! the target directory to look at.

use std::time::{Duration, Instant};

use halo_testkit::{chromium, Browser, Client, Halo, Page};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// Evaluates `js` until it is true, or fails after `within` saying `what`.
async fn until(page: &mut Page, within: Duration, what: &str, js: &str) {
    let start = Instant::now();
    loop {
        let v = page.eval(js).await.unwrap_or_default();
        if v == serde_json::Value::Bool(true) {
            return;
        }
        if start.elapsed() > within {
            let body = page.eval("document.body.innerText").await.unwrap_or_default();
            panic!("{what}: not seen within {within:?}; the page shows:\n{}", body.as_str().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_shows_instances_and_traffic_and_follows_a_kill() {
    let Some(program) = chromium("the dashboard test") else { return };
    let h = Halo::up(BIN, &halo_testkit::quickstart(3)).unwrap();
    let browser = Browser::start(&program, 1400, 1800).unwrap();
    let mut page = browser.open(&h.api_url("/ui")).await.unwrap();
    until(&mut page, Duration::from_secs(20), "the sign-in form", "!!document.querySelector('#login:not([hidden])')")
        .await;

    // A wrong token is refused, and said so.
    page.eval(
        "document.querySelector('#token').value = 'nope'; document.querySelector('#login').requestSubmit(); true",
    )
    .await
    .unwrap();
    until(
        &mut page,
        Duration::from_secs(10),
        "the refusal",
        "document.querySelector('#login-error').textContent.includes('Wrong token')",
    )
    .await;

    let token = h.token();
    page.eval(&format!(
        "document.querySelector('#token').value = '{token}'; document.querySelector('#login').requestSubmit(); true"
    ))
    .await
    .unwrap();
    let ready = "document.querySelectorAll('[data-test=instance][data-ready=true]').length";
    until(&mut page, Duration::from_secs(30), "three ready instances", &format!("{ready} === 3")).await;
    until(
        &mut page,
        Duration::from_secs(10),
        "the leader node",
        "!!document.querySelector('[data-test=node][data-name=local]')",
    )
    .await;

    // Traffic through the proxy shows up per route.
    let c = Client::new();
    let url = h.url("http", "/");
    let load = tokio::spawn(async move {
        for _ in 0..400 {
            let _ = c.get(&url).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    until(
        &mut page,
        Duration::from_secs(30),
        "requests per second on a route",
        "[...document.querySelectorAll('[data-test=traffic][data-kind=route]')].some(r => Number(r.dataset.rps) > 1)",
    )
    .await;

    // kill -9 of one instance: the page shows it restarted and ready.
    let victim = h.status()["services"][0]["instances"][0].clone();
    let (id, pid) = (victim["id"].as_str().unwrap().to_string(), victim["pid"].as_i64().unwrap());
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let back = format!(
        "(() => {{ const r = document.querySelector('[data-test=instance][data-id=\"{id}\"]'); \
         return !!r && r.dataset.restarts === '1' && r.dataset.ready === 'true'; }})()"
    );
    until(&mut page, Duration::from_secs(30), "the killed instance back, restarted once", &back).await;
    until(&mut page, Duration::from_secs(10), "three ready instances again", &format!("{ready} === 3")).await;
    until(
        &mut page,
        Duration::from_secs(10),
        "the exit in the events",
        "[...document.querySelectorAll('[data-test=event][data-kind=exited]')].some(r => r.textContent.includes('SIGKILL'))",
    )
    .await;

    // A canary shows its progress, and the page's Promote button ends it.
    let canary = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/canary.toml"))
        .unwrap()
        .replace("pause = \"10s\"", "pause = \"10m\"");
    let (code, _, err) = h.cli_with_input(&["apply", "-f", "-"], &canary);
    assert_eq!(code, 0, "{err}");
    until(
        &mut page,
        Duration::from_secs(30),
        "the canary's row with its Promote button",
        "!!document.querySelector('[data-test=rollout][data-service=demo] button[data-order=promote]')",
    )
    .await;
    page.eval(
        "window.confirm = () => true; \
         document.querySelector('[data-test=rollout][data-service=demo] button[data-order=promote]').click(); true",
    )
    .await
    .unwrap();
    until(
        &mut page,
        Duration::from_secs(30),
        "the canary promoted",
        "(() => { const r = document.querySelector('[data-test=rollout][data-service=demo]'); \
         return !!r && r.textContent.includes('promoted'); })()",
    )
    .await;
    load.abort();

    // An autoscaled service shows its bounds, target and measured value.
    let scaled = "name = \"scaled\"\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\"]\n[[routes]]\nhost = \"scaled.localhost\"\n\
                  [autoscale]\nmin = 1\nmax = 4\nin_flight = 8\n";
    let (code, _, err) = h.cli_with_input(&["apply", "-f", "-"], scaled);
    assert_eq!(code, 0, "{err}");
    until(
        &mut page,
        Duration::from_secs(30),
        "the autoscaled service's bounds and target",
        "(() => { const r = document.querySelector('[data-test=autoscale][data-service=scaled]'); \
         return !!r && r.textContent.includes('(1 to 4)') && r.textContent.includes('in_flight') \
         && r.textContent.includes('(target 8)'); })()",
    )
    .await;

    let png = page.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    println!("dashboard screenshot: {} ({} bytes)", out.display(), png.len());
}
