//! Agents reach a TLS controller and authenticate with their FE certificate (mutual TLS): the
//! right certificate registers and serves; a certificate of another FE is refused.

mod common;

use std::time::Duration;

use common::*;
use victor_testkit::pki::Pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_authenticate_with_their_fe_certificate() -> anyhow::Result<()> {
    let pki = Pki::new("victor-agent-tls");
    let server = pki.server("controller");
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, server_cert, server_key) = (path(&pki.ca.path), path(&server.cert.path), path(&server.key.path));
    let mut lab = Lab::build(2)?;
    let ctl = Controller::start_with(
        &lab.dir.path().join("ctl"),
        None,
        &["--tls-cert-file", &server_cert, "--tls-key-file", &server_key, "--tls-client-ca-file", &ca],
    )
    .await?;
    let url = format!("https://{}", ctl.grpc);

    let fe1 = pki.fe("fe1");
    let fe1_flags = ["--ca-file", &ca, "--cert-file", &path(&fe1.cert.path), "--key-file", &path(&fe1.key.path)];
    lab.start_agent(1, std::slice::from_ref(&url), &fe1_flags)?;
    lab.wait_ready(1, Duration::from_secs(20))?;

    // fe2's agent presents fe1's certificate: every call for fe2 is refused and it never serves.
    lab.start_agent(2, std::slice::from_ref(&url), &fe1_flags)?;
    let refused = || {
        let log = lab.agent_log(2);
        log.contains("fe1") && log.to_lowercase().contains("permission")
    };
    if wait("fe2's refusal in its log", Duration::from_secs(20), refused).is_err() {
        anyhow::bail!("fe2's refusal is not logged:\n{}", lab.agent_log(2));
    }
    wait("fe2's /readyz to answer", Duration::from_secs(20), || lab.agent_get(2, "/readyz").is_ok())?;
    assert!(lab.agent_get(2, "/readyz").is_ok_and(|(code, _)| code != 200), "fe2 became ready with fe1's certificate");

    let metrics = ctl.metrics().await?;
    assert_eq!(metric(&metrics, "victor_fes{state=\"up\"}"), Some(1.0), "only fe1 may be registered:\n{metrics}");
    // The refused impostor did not disturb fe1.
    assert!(lab.agent_get(1, "/readyz").is_ok_and(|(code, _)| code == 200));
    Ok(())
}
