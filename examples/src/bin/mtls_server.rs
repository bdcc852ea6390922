//! `mtls-server --listen 127.0.0.1:8443 --allow spiffe://example.org/demo/client`
//!
//! Accepts TLS connections that present an X509-SVID with exactly the allowed
//! SPIFFE ID, and answers each line with a greeting naming the caller.

use std::sync::Arc;

use tessera_examples::{arg, peer_spiffe_id, source};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = arg("--listen")?;
    let allow = arg("--allow")?;
    let source = source().await?;
    let me = source.svid()?.spiffe_id().to_string();
    let config = spiffe_rustls::mtls_server(source)
        .authorize(spiffe_rustls::authorizer::exact([allow.as_str()])?)
        .build()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "mtls-server {me} listening on {} (accepting {allow})",
        listener.local_addr()?
    );
    loop {
        let (tcp, addr) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("mtls-server: rejected {addr}: {e}");
                    return;
                }
            };
            let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates())
                .unwrap_or_else(|e| e.to_string());
            let (read, mut write) = tokio::io::split(tls);
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = format!("hello {peer}, you said {line:?}\n");
                if write.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
