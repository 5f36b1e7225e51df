//! A minimal HTTP/1.1 GET for tests of the daemons' admin ports (no client library needed).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `path` from `addr`; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw)
    };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

fn parse(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of HTTP headers")?;
    let status: u16 = head.split_whitespace().nth(1).context("no status code")?.parse()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk header")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok((status, out));
        }
        if after.len() < size {
            bail!("truncated chunk");
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// Reads one sample (`name{labels} value`) from a Prometheus text exposition; `labels` must match
/// exactly as rendered (e.g. `outcome="moved"`), empty for none. Missing = 0.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let wanted = if labels.is_empty() { name.to_owned() } else { format!("{name}{{{labels}}}") };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == wanted).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
