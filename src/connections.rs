//! The HTTP connection loop, with bounds a hostile or broken client cannot
//! exhaust: at most `max_connections` open at once (more wait in the
//! listen queue until one closes), and a request's headers must arrive
//! within the header timeout, which also closes idle keep-alive
//! connections. On shutdown it stops accepting and lets open connections
//! finish their requests.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics as m;

/// How long accepting pauses after an error such as running out of file
/// descriptors, so that the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest a request's headers may take to arrive (and an idle
    /// keep-alive connection may stay open).
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then waits for open
/// connections to finish.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(AtomicUsize::new(0));
    let graceful = GracefulShutdown::new();
    m::http_connections(0);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: the next connection waits in the listen queue.
                m::http_connection_refused("limit");
                debug!(max = limits.max_connections, "at the connection limit; new connections wait");
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    if !is_per_connection(&e) {
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        m::http_connections(open.fetch_add(1, Ordering::Relaxed) + 1);
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                if e.is_timeout() {
                    m::http_connection_refused("header_timeout");
                }
                debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
            m::http_connections(open.fetch_sub(1, Ordering::Relaxed) - 1);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors that concern one connection only (it was reset before it was
/// accepted), after which accepting goes on at once.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
