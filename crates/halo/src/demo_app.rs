//! `halo demo-app`: a small HTTP app for the quickstart and the tests. It
//! answers with its version and instance id; flags and admin calls make it
//! slow, failing, unready, crash or hang.
//!
//! - `GET /` and any other path: `demo-app VERSION instance ID`
//! - `GET /healthz`: 200, or 503 once `/admin/unready` was called
//! - with `--admin` only (they take the app down; never for a public
//!   listener): `/admin/slow?ms=N`, `/admin/fail?rate=R` (0.0-1.0), `/admin/unready`,
//!   `/admin/ready`, `/admin/crash` (exit 1), `/admin/hang` (SIGSTOP itself),
//!   `/admin/hog?mib=N` (allocates and touches N MiB more, kept)
//! - with `--counter-file`: `GET /count` (the value), `POST /count` (adds one)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use halo_model::lock::LockExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Reported in every answer.
    #[arg(long, default_value = "v1")]
    version: String,
    /// Port to listen on [default: $PORT].
    #[arg(long, env = "PORT")]
    port: u16,
    /// Address to listen on [default: $HOST, else 127.0.0.1].
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Delay added to every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Share of requests answered with 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Exit with status 1 this many seconds after starting.
    #[arg(long)]
    crash_after: Option<u64>,
    /// Keep a counter in this file: `GET /count` reads it, `POST /count`
    /// adds one (application data for backup and restore tests).
    #[arg(long)]
    counter_file: Option<std::path::PathBuf>,
    /// Serve at most this many requests at once; the others wait their turn
    /// (a backend of fixed capacity: workers / delay requests a second).
    #[arg(long)]
    workers: Option<std::num::NonZeroU32>,
    /// Serve the fault-injection endpoints under /admin/ (slow, fail,
    /// unready, crash, hang, hog): for tests and demonstrations; off, they
    /// answer 404.
    #[arg(long)]
    admin: bool,
}

struct App {
    version: String,
    id: String,
    delay_ms: AtomicU64,
    /// Fail rate in millionths.
    fail_ppm: AtomicU64,
    unready: AtomicBool,
    served: AtomicU64,
    counter: Option<std::path::PathBuf>,
    counting: tokio::sync::Mutex<()>,
    hogged: std::sync::Mutex<Vec<Vec<u8>>>,
    /// `--admin`: the fault-injection endpoints answer.
    admin: bool,
    /// `--workers`: a permit per request being served.
    workers: Option<tokio::sync::Semaphore>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        anyhow::bail!("--fail-rate must be between 0.0 and 1.0, got {}", args.fail_rate);
    }
    let id = std::env::var("HALO_INSTANCE").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    let app = Arc::new(App {
        admin: args.admin,
        version: args.version,
        id,
        delay_ms: AtomicU64::new(args.delay_ms),
        fail_ppm: AtomicU64::new((args.fail_rate * 1e6) as u64),
        unready: AtomicBool::new(false),
        served: AtomicU64::new(0),
        counter: args.counter_file,
        counting: tokio::sync::Mutex::new(()),
        hogged: std::sync::Mutex::new(Vec::new()),
        workers: args.workers.map(|n| tokio::sync::Semaphore::new(n.get() as usize)),
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        eprintln!("demo-app {} instance {} listening on {}", app.version, app.id, listener.local_addr()?);
        if let Some(secs) = args.crash_after {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                eprintln!("crashing as asked (--crash-after {secs})");
                std::process::exit(1);
            });
        }
        loop {
            let (stream, _) = listener.accept().await?;
            let app = app.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert("x-instance", app.id.parse().expect("ids are header-safe"));
        Ok(r)
    };
    if let (Some(file), "/count") = (&app.counter, req.uri().path()) {
        let _one_at_a_time = app.counting.lock().await;
        let read = || std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        let mut n = read();
        if req.method() == http::Method::POST {
            n += 1;
            let tmp = file.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, format!("{n}\n")).and_then(|()| std::fs::rename(&tmp, file)) {
                return reply(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot write {}: {e}\n", file.display()));
            }
        }
        return reply(StatusCode::OK, format!("{n}\n"));
    }
    if req.uri().path().starts_with("/admin/") && !app.admin {
        return reply(StatusCode::NOT_FOUND, "not found (the /admin/ endpoints need demo-app --admin)\n".into());
    }
    match req.uri().path() {
        "/healthz" if app.unready.load(Ordering::Relaxed) => reply(StatusCode::SERVICE_UNAVAILABLE, "unready\n".into()),
        "/healthz" => reply(StatusCode::OK, "ok\n".into()),
        "/admin/slow" => {
            let ms = param("ms").and_then(|v| v.parse().ok()).unwrap_or(0);
            app.delay_ms.store(ms, Ordering::Relaxed);
            reply(StatusCode::OK, format!("delay {ms}ms\n"))
        }
        "/admin/fail" => {
            let rate = param("rate").and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0).clamp(0.0, 1.0);
            app.fail_ppm.store((rate * 1e6) as u64, Ordering::Relaxed);
            reply(StatusCode::OK, format!("fail rate {rate}\n"))
        }
        "/admin/unready" => {
            app.unready.store(true, Ordering::Relaxed);
            reply(StatusCode::OK, "unready\n".into())
        }
        "/admin/ready" => {
            app.unready.store(false, Ordering::Relaxed);
            reply(StatusCode::OK, "ready\n".into())
        }
        "/admin/crash" => {
            eprintln!("crashing as asked (/admin/crash)");
            std::process::exit(1);
        }
        "/admin/hog" => {
            let mib: usize = param("mib").and_then(|v| v.parse().ok()).unwrap_or(0).min(1 << 16);
            let mut hogged = app.hogged.locked();
            for _ in 0..mib {
                // Written, so the pages are really taken.
                hogged.push(vec![1u8; 1 << 20]);
            }
            let total = hogged.len();
            drop(hogged);
            reply(StatusCode::OK, format!("holding {total} MiB\n"))
        }
        "/admin/hang" => {
            eprintln!("hanging as asked (/admin/hang)");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            reply(StatusCode::OK, "resumed\n".into())
        }
        _ => {
            let _worker = match &app.workers {
                Some(w) => Some(w.acquire().await.expect("the semaphore is never closed")),
                None => None,
            };
            let delay = app.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let n = app.served.fetch_add(1, Ordering::Relaxed);
            // Deterministic spread of failures: every request whose share
            // of a million falls under the rate.
            let ppm = app.fail_ppm.load(Ordering::Relaxed);
            if ppm > 0 && (n.wrapping_mul(7_919) % 1_000_000) < ppm {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("demo-app {} instance {} failing\n", app.version, app.id),
                );
            }
            reply(StatusCode::OK, format!("demo-app {} instance {}\n", app.version, app.id))
        }
    }
}
