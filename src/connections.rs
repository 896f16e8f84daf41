//! The HTTP connection loop, with bounds a hostile or broken client cannot
//! exhaust: at most `max_connections` open at once (more wait in the
//! listen queue until one closes), and a request's headers must arrive
//! within the header timeout, which also closes idle keep-alive
//! connections (a connection that sent part of a request is answered 408
//! first). On shutdown it stops accepting and lets open connections
//! finish their requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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
        let stream =
            Watched { inner: stream, partial: false, waiting_since: Instant::now(), timeout: limits.header_timeout };
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

/// What a connection whose request headers did not arrive in time is told
/// before it is closed.
const REQUEST_TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/problem+json\r\nConnection: close\r\nContent-Length: 130\r\n\r\n{\"type\":\"urn:outbox:problem:timeout\",\"title\":\"Request Timeout\",\"status\":408,\"detail\":\"the request headers did not arrive in time\"}";

/// A connection's stream that notes whether bytes of a request arrived
/// since the last answer was written, and since when the connection has
/// been waiting for that request (its creation, or the last write: where
/// the header timeout starts). Dropped with such a request unanswered after
/// the header timeout (the connection gave up on its headers), it answers
/// 408 before the socket closes.
struct Watched {
    inner: TcpStream,
    partial: bool,
    waiting_since: Instant,
    timeout: Duration,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.partial = true;
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.partial = false;
            self.waiting_since = Instant::now();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.partial = false;
            self.waiting_since = Instant::now();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.partial && self.waiting_since.elapsed() >= self.timeout {
            // Best effort, without blocking: the socket's buffer is empty.
            let _ = self.inner.try_write(REQUEST_TIMEOUT_ANSWER);
        }
    }
}

/// Errors that concern one connection only (it was reset before it was
/// accepted), after which accepting goes on at once.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_408_answer_is_well_formed_problem_details() {
        let text = std::str::from_utf8(REQUEST_TIMEOUT_ANSWER).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("a Content-Length");
        assert_eq!(length, body.len());
        let problem: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(problem["status"], 408);
        assert!(head.starts_with("HTTP/1.1 408 "));
    }
}
