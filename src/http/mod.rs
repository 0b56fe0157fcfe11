//! The node plugin's small HTTP server: `/healthz` and `/readyz` for the kubelet's
//! probes (see [`probes`]); the place for `/metrics` too.
//!
//! Owns the listening socket and graceful shutdown. Handlers only read snapshots
//! (`tokio::sync::watch`) published by the modules that own the state; this module must
//! not hold or change plugin state. Plain HTTP: the kubelet's HTTP probes do not need TLS
//! and the endpoints reveal no secrets.

pub mod probes;

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, or not an address of this host).
    #[error("cannot listen on {address} (set another with --http-address)")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("HTTP server on {address} failed")]
    Serve {
        /// The bound address.
        address: SocketAddr,
        /// The server error.
        #[source]
        source: std::io::Error,
    },
}

/// A bound HTTP server; call [`HttpServer::serve`] to answer requests.
#[derive(Debug)]
pub struct HttpServer {
    listener: TcpListener,
    address: SocketAddr,
    router: Router,
}

impl HttpServer {
    /// Binds `address` (port 0: any free port) for `router`.
    pub async fn bind(address: SocketAddr, router: Router) -> Result<Self, HttpError> {
        let bind_error = |source| HttpError::Bind { address, source };
        let listener = TcpListener::bind(address).await.map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            address,
            router,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` is cancelled; in-flight requests finish first.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), HttpError> {
        let address = self.address;
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| HttpError::Serve { address, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_over_tcp_and_stops_on_shutdown() {
        let (_senders, inputs) = probes::probe_channels();
        let server = HttpServer::bind("127.0.0.1:0".parse().expect("addr"), probes::routes(inputs))
            .await
            .expect("bind");
        let address = server.local_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.serve(stop.clone()));
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
            .await
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        stop.cancel();
        task.await.expect("join").expect("clean stop");

        // The port is taken while another server holds it.
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = holder.local_addr().expect("addr");
        let (_senders, inputs) = probes::probe_channels();
        let err = HttpServer::bind(taken, probes::routes(inputs))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Bind { address, .. } if address == taken));
    }
}
