//! `mtls-client --connect 127.0.0.1:8443 --expect spiffe://example.org/demo/server`
//!
//! Connects with its own X509-SVID, refuses any server whose SPIFFE ID is not
//! the expected one, sends one line and prints the answer.

use std::sync::Arc;

use anyhow::Context;
use tessera_examples::{arg, peer_spiffe_id, source};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let connect = arg("--connect")?;
    let expect = arg("--expect")?;
    let source = source().await?;
    let me = source.svid()?.spiffe_id().to_string();
    let config = spiffe_rustls::mtls_client(source)
        .authorize(spiffe_rustls::authorizer::exact([expect.as_str()])?)
        .build()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&connect).await?;
    // SVIDs carry no DNS name; the verifier checks the SPIFFE ID instead.
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("spiffe-peer")?;
    let tls = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake failed")?;
    let server = peer_spiffe_id(tls.get_ref().1.peer_certificates())?;
    println!("mtls-client {me} connected to {server}");
    let (read, mut write) = tokio::io::split(tls);
    write.write_all(b"ping\n").await?;
    let reply = BufReader::new(read)
        .lines()
        .next_line()
        .await?
        .context("server closed the connection")?;
    println!("{reply}");
    Ok(())
}
