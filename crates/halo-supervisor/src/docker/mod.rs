//! The docker driver: each run of an instance is one container of the
//! service's image, created and started through the Docker Engine API on
//! the local socket ([`api`]), its `run.port` published on the instance's
//! host port on the node's address, its output copied into the instance's
//! log file, its exit seen on the daemon's event stream (`events.rs`).
//!
//! Every container is named `halo-SCOPE-INSTANCE` (SCOPE: a hash of the
//! data dir) and labelled with its instance, service, revision, node and
//! data dir. The name is unique per daemon, so one instance never has two
//! containers: a start removes whatever holds its name first. A halo
//! restart adopts a running container by id when its labels name the
//! instance; the sweep removes every container labelled with this data
//! dir that no record names. Docker's own restart policy is off: halo
//! restarts with the service's backoff like any instance.

pub mod api;
mod events;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use halo_model::{DockerRun, Pull, RunDriver};
use http::Method;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::driver::{Driver, Exit, Handle, Workload};
use crate::error::{RunError, StartError};
use crate::runner::{finish, Runner, MAX_OUTPUT};
use crate::InstanceSpec;
use api::{escape, ApiError, Client, Stream};
use events::Events;

/// Where the daemon listens unless `DOCKER_HOST` names another socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Longest wait for an exit without any event (a safety net).
const BACKSTOP: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct DockerDriver {
    api: Client,
    node: String,
    data_dir: String,
    /// Container names start with this: `halo-` and a hash of the data dir.
    prefix: String,
    events: Arc<Events>,
}

const LABEL_DATA_DIR: &str = "halo.data_dir";
const LABEL_INSTANCE: &str = "halo.instance";

impl DockerDriver {
    /// A driver for the daemon at `socket` (`unix://` prefix accepted);
    /// nothing is asked of it until a docker service runs.
    pub fn new(socket: &str, node: &str, data_dir: &str) -> DockerDriver {
        let api = Client::new(socket.strip_prefix("unix://").unwrap_or(socket));
        let label = format!("{LABEL_DATA_DIR}={data_dir}");
        let scope = data_dir.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        DockerDriver {
            events: Events::new(api.clone(), label),
            api,
            node: node.into(),
            data_dir: data_dir.into(),
            prefix: format!("halo-{:08x}-", scope as u32),
        }
    }

    /// The socket `DOCKER_HOST` names, else the default.
    pub fn socket_from_env() -> String {
        std::env::var("DOCKER_HOST").ok().filter(|h| h.starts_with("unix://")).unwrap_or(DEFAULT_SOCKET.into())
    }

    fn name_of(&self, inst: &InstanceSpec) -> String {
        format!("{}{}", self.prefix, inst.id)
    }

    /// The image is here, or pulled as `pull` says.
    async fn ensure_image(&self, d: &DockerRun) -> Result<(), StartError> {
        let have = match self.api.call(Method::GET, &format!("/images/{}/json", d.image), None).await {
            Ok(_) => true,
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(StartError::Runtime(e.to_string())),
        };
        match (d.pull, have) {
            (Pull::Never, false) => Err(StartError::Image(format!(
                "image '{}' is not on this node and run.pull = \"never\"; build or load it here \
                 (docker build, docker load, docker import), or set pull = \"if_missing\"",
                d.image
            ))),
            (Pull::Never | Pull::IfMissing, true) => Ok(()),
            (Pull::IfMissing, false) | (Pull::Always, _) => self.pull(&d.image).await,
        }
    }

    async fn pull(&self, image: &str) -> Result<(), StartError> {
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') && !image.contains('@') => (n, t),
            _ => (image, "latest"),
        };
        let path = format!("/images/create?fromImage={}&tag={}", escape(name), escape(tag));
        let failed = |e: String| StartError::Image(format!("pulling image '{image}' failed: {e}"));
        let resp = self.api.send(Method::POST, &path, None).await.map_err(|e| failed(e.to_string()))?;
        let mut progress = Stream::new(resp);
        while let Some(v) = progress.next_json().await.map_err(|e| failed(e.to_string()))? {
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                return Err(failed(e.to_string()));
            }
        }
        Ok(())
    }

    fn create_body(&self, inst: &InstanceSpec, d: &DockerRun, host: IpAddr) -> Value {
        let run = &inst.spec.run;
        let mut env: Vec<String> = run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(container_env(inst, d));
        let mut cmd = Vec::new();
        if !run.command.is_empty() {
            cmd.push(run.command.clone());
        }
        cmd.extend(run.args.iter().cloned());
        let port = format!("{}/tcp", d.port);
        let labels = json!({
            LABEL_INSTANCE: inst.id,
            "halo.service": inst.service,
            "halo.revision": inst.revision,
            "halo.node": self.node,
            LABEL_DATA_DIR: self.data_dir,
        });
        // run.user and run.group as Docker takes them; else the image's user.
        let user = match (&run.user, &run.group) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            (Some(u), None) => u.clone(),
            _ => String::new(),
        };
        let mut body = json!({
            "Image": d.image,
            "User": user,
            "Env": env,
            "Labels": labels,
            "ExposedPorts": { &port: {} },
            "StopSignal": Signal::try_from(inst.spec.stop.signal.number()).map_or("SIGTERM", |s| s.as_str()),
            "StopTimeout": inst.spec.stop.grace_period.as_secs().max(1),
            "HostConfig": {
                "PortBindings": { &port: [{ "HostIp": host.to_string(), "HostPort": inst.port.to_string() }] },
                "Binds": d.volumes.iter().map(|v| v.bind()).collect::<Vec<_>>(),
                // A small init as PID 1: signals reach the app (PID 1
                // ignores those it has no handler for) and zombies are reaped.
                "Init": true,
                "RestartPolicy": { "Name": "no" },
            },
        });
        if !cmd.is_empty() {
            body["Cmd"] = json!(cmd);
        }
        if let Some(dir) = &run.workdir {
            body["WorkingDir"] = json!(dir);
        }
        if let Some(n) = d.nano_cpus {
            body["HostConfig"]["NanoCpus"] = json!(n);
        }
        if let Some(m) = d.memory {
            // No swap beyond the limit: the limit is what the app gets.
            body["HostConfig"]["Memory"] = json!(m);
            body["HostConfig"]["MemorySwap"] = json!(m);
        }
        body
    }

    /// Removes the container `name_or_id`, running or not; gone is fine.
    async fn remove_container(&self, name_or_id: &str) -> Result<(), ApiError> {
        match self.api.call(Method::DELETE, &format!("/containers/{name_or_id}?force=1"), None).await {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn workload(&self, id: String, inst: &InstanceSpec, log: &Path, since: u64) -> Result<Container, StartError> {
        let info = self
            .api
            .call(Method::GET, &format!("/containers/{id}/json"), None)
            .await
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        let RunDriver::Docker(d) = &inst.spec.run.driver else { unreachable!("docker driver for a docker service") };
        let ip: Option<Ipv4Addr> =
            info.pointer("/NetworkSettings/IPAddress").and_then(Value::as_str).and_then(|s| s.parse().ok());
        let probe_addr = match ip {
            Some(ip) => SocketAddr::from((ip, d.port)),
            None => SocketAddr::from((Ipv4Addr::LOCALHOST, inst.port)),
        };
        let logs = tokio::spawn(copy_logs(self.api.clone(), id.clone(), log.to_path_buf(), since));
        Ok(Container {
            api: self.api.clone(),
            events: self.events.clone(),
            pid: info.pointer("/State/Pid").and_then(Value::as_i64).unwrap_or(0) as i32,
            runner: Arc::new(ContainerRunner { api: self.api.clone(), id: id.clone(), env: container_env(inst, d) }),
            id,
            probe_addr,
            memory: d.memory,
            logs,
        })
    }
}

/// What halo sets in every container, and in commands run inside it.
fn container_env(inst: &InstanceSpec, d: &DockerRun) -> Vec<String> {
    vec![
        "HOST=0.0.0.0".into(),
        format!("PORT={}", d.port),
        format!("HALO_INSTANCE={}", inst.id),
        format!("HALO_SERVICE={}", inst.service),
    ]
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, inst: &InstanceSpec, host: IpAddr, log: &Path) -> Result<Box<dyn Workload>, StartError> {
        let RunDriver::Docker(d) = &inst.spec.run.driver else {
            return Err(StartError::WrongDriver(
                "the docker driver runs only services with run.driver = \"docker\"".into(),
            ));
        };
        self.ensure_image(d).await?;
        let name = self.name_of(inst);
        // One container per instance: whatever holds the name goes first.
        self.remove_container(&name).await.map_err(|e| StartError::Runtime(e.to_string()))?;
        let body = self.create_body(inst, d, host);
        let created = self
            .api
            .call(Method::POST, &format!("/containers/create?name={name}"), Some(&body))
            .await
            .map_err(|e| StartError::Runtime(format!("creating the container failed: {e}")))?;
        let id = created
            .get("Id")
            .and_then(Value::as_str)
            .ok_or_else(|| StartError::Runtime("the daemon gave no container id".into()))?
            .to_string();
        if let Err(e) = self.api.call(Method::POST, &format!("/containers/{id}/start"), None).await {
            let _ = self.remove_container(&id).await;
            return Err(StartError::Runtime(format!("starting the container failed: {e}")));
        }
        tracing::info!(instance = %inst.id, container = %&id[..12], image = %d.image, "container started");
        Ok(Box::new(self.workload(id, inst, log, 0).await?))
    }

    async fn adopt(&self, handle: &Handle, inst: &InstanceSpec, log: &Path) -> Option<Box<dyn Workload>> {
        let id = handle.container.as_deref()?;
        let info = self.api.call(Method::GET, &format!("/containers/{id}/json"), None).await.ok()?;
        let ours = labels_of(&info).get(LABEL_INSTANCE) == Some(&inst.id);
        let running = info.pointer("/State/Running").and_then(Value::as_bool) == Some(true);
        if !(ours && running) {
            return None;
        }
        // Output while halo was away is in the daemon's log: from the
        // last write to ours on.
        let since = std::fs::metadata(log)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() + 1);
        self.workload(id.to_string(), inst, log, since).await.ok().map(|c| Box::new(c) as Box<dyn Workload>)
    }

    async fn available(&self) -> bool {
        let ping = self.api.call(Method::GET, "/_ping", None);
        matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
    }

    async fn remove(&self, handle: &Handle) {
        if let Some(id) = &handle.container {
            if let Err(e) = self.remove_container(id).await {
                tracing::warn!(container = %id, error = %e, "removing the container failed");
            }
        }
    }

    async fn sweep(&self, known: &[Handle]) {
        let filters = json!({"label": [format!("{LABEL_DATA_DIR}={}", self.data_dir)]});
        let path = format!("/containers/json?all=1&filters={}", escape(&filters.to_string()));
        // A daemon that hangs does not hold up the node's start.
        let listing = match tokio::time::timeout(Duration::from_secs(10), self.api.call(Method::GET, &path, None)).await
        {
            Ok(Ok(l)) => l,
            Ok(Err(ApiError::Unreachable { .. })) => return,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "listing this node's containers failed");
                return;
            }
            Err(_) => {
                tracing::warn!("the Docker daemon did not list this node's containers within 10s; orphans stay");
                return;
            }
        };
        for c in listing.as_array().into_iter().flatten() {
            let Some(id) = c.get("Id").and_then(Value::as_str) else { continue };
            if known.iter().any(|h| h.container.as_deref() == Some(id)) {
                continue;
            }
            tracing::warn!(container = %&id[..12.min(id.len())], "removing a container of this node that no instance owns");
            if let Err(e) = self.remove_container(id).await {
                tracing::warn!(container = %id, error = %e, "removing an orphaned container failed");
            }
        }
    }
}

/// Copies the container's stdout and stderr into the instance log until
/// the container ends. A stream that ends while the container runs (the
/// daemon restarted with live-restore) is followed again from then on.
async fn copy_logs(api: Client, id: String, path: std::path::PathBuf, mut since: u64) {
    let Ok(mut file) = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await else { return };
    loop {
        let q = format!("/containers/{id}/logs?follow=1&stdout=1&stderr=1&since={since}");
        if let Ok(resp) = api.send(Method::GET, &q, None).await {
            let mut stream = Stream::new(resp);
            while let Ok(Some((_, data))) = stream.next_frame().await {
                if file.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        since = halo_model::clock::unix_secs();
        tokio::time::sleep(Duration::from_secs(1)).await;
        match api.call(Method::GET, &format!("/containers/{id}/json"), None).await {
            Ok(info) if info.pointer("/State/Running").and_then(Value::as_bool) == Some(true) => {}
            Ok(_) => return,
            Err(e) if e.is_not_found() => return,
            // The daemon is away: its return is waited for.
            Err(_) => {}
        }
    }
}

/// One container, started or adopted.
pub struct Container {
    api: Client,
    events: Arc<Events>,
    id: String,
    pid: i32,
    probe_addr: SocketAddr,
    runner: Arc<ContainerRunner>,
    memory: Option<u64>,
    logs: tokio::task::JoinHandle<()>,
}

impl Drop for Container {
    fn drop(&mut self) {
        self.logs.abort();
        self.events.forget(&self.id);
    }
}

impl Container {
    /// How the container ended, from its state.
    fn exit(&self, state: &Value) -> Exit {
        let code = state.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
        let oom = state.get("OOMKilled").and_then(Value::as_bool) == Some(true);
        let error = state.get("Error").and_then(Value::as_str).unwrap_or_default();
        let detail = if oom {
            let limit = self.memory.map_or(String::new(), |m| format!(" (the {}MiB of run.memory)", m >> 20));
            format!("killed: out of memory{limit}")
        } else if !error.is_empty() {
            format!("failed: {error}")
        } else if code > 128 {
            let sig =
                Signal::try_from((code - 128) as i32).map_or_else(|_| (code - 128).to_string(), |s| s.as_str().into());
            format!("killed by {sig}")
        } else {
            format!("exited with status {code}")
        };
        Exit { success: code == 0 && !oom, detail }
    }
}

#[async_trait]
impl Workload for Container {
    fn handle(&self) -> Handle {
        Handle { pid: self.pid, start_time: 0, container: Some(self.id.clone()) }
    }

    fn probe_addr(&self) -> SocketAddr {
        self.probe_addr
    }

    fn runner(&self) -> Arc<dyn Runner> {
        self.runner.clone()
    }

    async fn wait(&mut self) -> Exit {
        loop {
            let mut sub = self.events.subscribe(&self.id);
            match self.api.call(Method::GET, &format!("/containers/{}/json", self.id), None).await {
                Ok(info) => {
                    let state = info.get("State").cloned().unwrap_or_default();
                    if state.get("Running").and_then(Value::as_bool) != Some(true) {
                        return self.exit(&state);
                    }
                }
                Err(e) if e.is_not_found() => {
                    return Exit { success: false, detail: "the container was removed".into() };
                }
                // The daemon is away (restarting): its return wakes us.
                Err(_) => {}
            }
            sub.changed(BACKSTOP).await;
        }
    }

    async fn signal(&self, sig: Signal) {
        let path = format!("/containers/{}/kill?signal={}", self.id, sig.as_str());
        match self.api.call(Method::POST, &path, None).await {
            Ok(_) => {}
            // Not running (409) or gone (404): nothing to signal.
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 409)) => {}
            Err(e) => {
                tracing::warn!(container = %self.id, signal = ?sig, error = %e, "signalling the container failed")
            }
        }
    }

    async fn stop(&mut self, sig: Signal, grace: Duration) -> Exit {
        self.signal(sig).await;
        let exit = crate::driver::wait_or_kill(self, grace).await;
        if let Err(e) = self.api.call(Method::DELETE, &format!("/containers/{}?force=1", self.id), None).await {
            if !e.is_not_found() {
                tracing::warn!(container = %self.id, error = %e, "removing the stopped container failed");
            }
        }
        exit
    }
}

/// Runs commands inside a container (`docker exec`), stdin carried over
/// the hijacked connection.
#[derive(Debug)]
pub struct ContainerRunner {
    api: Client,
    id: String,
    env: Vec<String>,
}

#[async_trait]
impl Runner for ContainerRunner {
    async fn run_with(
        &self,
        argv: &[String],
        env: &std::collections::BTreeMap<String, String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RunError> {
        let mut all = self.env.clone();
        all.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        let program = argv.first().ok_or(RunError::NoCommand)?.clone();
        let runtime = |e: String| RunError::Runtime(e);
        let body = json!({
            "AttachStdin": stdin.is_some(),
            "AttachStdout": true,
            "AttachStderr": true,
            "Cmd": argv,
            "Env": all,
        });
        let created = self
            .api
            .call(Method::POST, &format!("/containers/{}/exec", self.id), Some(&body))
            .await
            .map_err(|e| runtime(format!("cannot run {program} in the container: {e}")))?;
        let exec = created
            .get("Id")
            .and_then(Value::as_str)
            .ok_or_else(|| runtime("the daemon gave no exec id".into()))?
            .to_string();
        let talk = async {
            let mut io = self
                .api
                .hijack(&format!("/exec/{exec}/start"), &json!({"Detach": false, "Tty": false}))
                .await
                .map_err(|e| runtime(format!("cannot run {program} in the container: {e}")))?;
            if let Some(input) = &stdin {
                io.write_all(input).await.map_err(|e| runtime(format!("{program}: writing its stdin: {e}")))?;
                io.shutdown().await.map_err(|e| runtime(format!("{program}: closing its stdin: {e}")))?;
            }
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let mut buf = bytes::BytesMut::new();
            loop {
                while let Some((stream, data)) = api::split_frame(&mut buf) {
                    let out = if stream == 2 { &mut stderr } else { &mut stdout };
                    if out.len() <= MAX_OUTPUT {
                        out.extend_from_slice(&data);
                    }
                }
                let mut chunk = [0u8; 16 << 10];
                match io.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(runtime(format!("{program}: reading its output: {e}"))),
                }
            }
            Ok((stdout, stderr))
        };
        let result = tokio::time::timeout(timeout, talk).await;
        let inspect = self.api.call(Method::GET, &format!("/exec/{exec}/json"), None).await.unwrap_or_default();
        match result {
            Ok(Ok((stdout, stderr))) => {
                let code = inspect.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
                finish(&program, code == 0, &format!("status {code}"), stdout, &stderr)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // Docker cannot stop an exec; its process is ours to kill.
                if let Some(pid) = inspect.get("Pid").and_then(Value::as_i64).filter(|p| *p > 0) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                Err(RunError::Timeout { program, timeout })
            }
        }
    }
}

fn labels_of(info: &Value) -> BTreeMap<String, String> {
    let labels = info.pointer("/Config/Labels").and_then(Value::as_object);
    labels.into_iter().flatten().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
}
