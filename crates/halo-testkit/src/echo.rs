//! A TCP echo server: greets each connection with its name and a newline,
//! then sends back every byte it gets. For TCP listeners.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub struct EchoServer {
    pub addr: SocketAddr,
    name: Arc<str>,
    connections: Arc<AtomicU64>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl EchoServer {
    pub async fn start(name: &str) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
        let addr = listener.local_addr().expect("addr");
        let name: Arc<str> = name.into();
        let connections = Arc::new(AtomicU64::new(0));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let accept = {
            let (name, connections, tasks) = (name.clone(), connections.clone(), tasks.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = listener.accept().await else { continue };
                    connections.fetch_add(1, SeqCst);
                    let greeting = format!("{name}\n");
                    tasks.lock().expect("tasks").spawn(async move {
                        if s.write_all(greeting.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            })
        };
        EchoServer { addr, name, connections, tasks, accept: Some(accept) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(SeqCst)
    }

    /// Stops listening and drops every open connection, like a crash.
    pub fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.tasks.lock().expect("tasks").abort_all();
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.kill();
    }
}
