//! `meshfed-demo hook`: what the demo repository's post-commit hook runs.
//! It sends the syncer a push event for the current branch, signed as
//! GitHub signs webhooks: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of
//! the body>` with the shared secret.
//!
//! The same request by hand, with openssl and curl:
//!
//! ```sh
//! body='{"ref":"refs/heads/main"}'
//! sig=$(printf %s "$body" | openssl dgst -sha256 -hmac "$(cat webhook-secret)" -r | cut -d' ' -f1)
//! curl -si -H "X-Hub-Signature-256: sha256=$sig" -H 'X-GitHub-Event: push' \
//!      -H 'Content-Type: application/json' --data "$body" http://127.0.0.1:PORT/hooks/git
//! ```

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The body and its signature header value.
pub fn sign(secret: &[u8], git_ref: &str, after: &str) -> anyhow::Result<(String, String)> {
    let body = serde_json::json!({"ref": git_ref, "after": after}).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .map_err(|e| anyhow::anyhow!("the webhook secret cannot key HMAC-SHA256: {e}"))?;
    mac.update(body.as_bytes());
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    Ok((body, sig))
}

/// Sends the push event for the repository in the current directory.
/// Never fails the commit: problems are printed, and the syncer's polling
/// picks the commit up anyway.
pub fn run(url: &str, secret_file: &Path) -> anyhow::Result<()> {
    let secret = std::fs::read_to_string(secret_file)
        .with_context(|| format!("reading the webhook secret {}", secret_file.display()))?;
    let git = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("git").args(args).output()?;
        if !out.status.success() {
            bail!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let git_ref = git(&["symbolic-ref", "HEAD"])?;
    let after = git(&["rev-parse", "HEAD"])?;
    let (body, sig) = sign(secret.trim().as_bytes(), &git_ref, &after)?;
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the syncer at {addr}; is the demo running?"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer.lines().next().unwrap_or("").trim().to_string();
    if status.split_whitespace().nth(1) == Some("202") {
        println!(
            "meshfed-demo hook: the syncer accepted the push of {} ({status})",
            &after[..after.len().min(12)]
        );
        Ok(())
    } else {
        bail!("the syncer answered `{status}` to the signed webhook")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature GitHub documents for its example payload and secret
    /// ("Hello, World!" with "It's a Secret to Everybody").
    #[test]
    fn signature_matches_githubs_documented_example() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"It's a Secret to Everybody").unwrap();
        mac.update(b"Hello, World!");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        let (body, sig) = sign(b"k", "refs/heads/main", "abc").unwrap();
        assert!(body.contains("\"ref\":\"refs/heads/main\""), "{body}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
    }
}
