//! Serving one role: load and check its config, bind, write the ready file, run until SIGTERM.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{IdpClientAdmin, IdpKeyAdmin, ServeArgs, SignerKeyAdmin};

async fn listen(args: &ServeArgs, configured: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = quorum_service::bind(args.listen.as_deref().unwrap_or(configured)).await?;
    if let Some(ready) = &args.ready_file {
        quorum_service::write_ready_file(ready, listener.local_addr()?)?;
    }
    Ok(listener)
}

fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    quorum_service::cancel_on_signals(token.clone());
    token
}

fn checked() -> anyhow::Result<ExitCode> {
    println!("config ok");
    Ok(ExitCode::SUCCESS)
}

pub async fn idp(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config: quorum_idp::Config = quorum_service::load_config(&args.config)?;
    config
        .check()
        .with_context(|| format!("config file {}", args.config.display()))?;
    if args.check_config {
        return checked();
    }
    let listener = listen(&args, &config.listen).await?;
    quorum_idp::run(listener, config, shutdown_token()).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn store(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config: quorum_store::Config = quorum_service::load_config(&args.config)?;
    config
        .check()
        .with_context(|| format!("config file {}", args.config.display()))?;
    if args.check_config {
        return checked();
    }
    let listener = listen(&args, &config.listen).await?;
    quorum_store::run(listener, config, shutdown_token()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `quorum store gc`: one collection pass, on the store's database and blobs directly.
pub async fn store_gc(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config: quorum_store::Config = quorum_service::load_config(config)?;
    let c = quorum_store::collect_garbage(&config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "collected {} manifests past retention, {} expired links, {} blobs, {} orphaned blobs, \
             {} packs; rewrote {} mostly dead packs",
            c.manifests, c.links, c.blobs, c.orphans, c.packs, c.repacked
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `quorum store usage`: bytes stored and transferred per tenant, from the store's database.
pub async fn store_usage(
    config: &Path,
    format: &str,
    tenant: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let config: quorum_store::Config = quorum_service::load_config(config)?;
    let usage = quorum_store::usage_of(&config, tenant).await?;
    if format == "json" {
        let lines: Vec<_> = usage
            .iter()
            .map(|u| {
                serde_json::json!({
                    "tenant": u.tenant,
                    "stored_bytes": u.stored_bytes,
                    "bytes_in": u.bytes_in,
                    "bytes_out": u.bytes_out,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        println!(
            "{:<24} {:>16} {:>16} {:>16}",
            "TENANT", "STORED_BYTES", "BYTES_IN", "BYTES_OUT"
        );
        for u in &usage {
            println!(
                "{:<24} {:>16} {:>16} {:>16}",
                u.tenant, u.stored_bytes, u.bytes_in, u.bytes_out
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn controller(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config: quorum_controller::Config = quorum_service::load_config(&args.config)?;
    if args.check_config {
        return checked();
    }
    let listener = listen(&args, &config.listen).await?;
    quorum_controller::run(listener, config, shutdown_token()).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config: quorum_worker::Config = quorum_service::load_config(&args.config)?;
    if args.check_config {
        return checked();
    }
    if let Some(ready) = &args.ready_file {
        std::fs::write(ready, "worker")
            .with_context(|| format!("cannot write {}", ready.display()))?;
    }
    quorum_worker::run(config, shutdown_token()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `quorum worker usage`: reads and verifies the ledger in the worker's data_dir and prints it.
pub fn worker_usage(config: &Path, format: &str, tenant: Option<&str>) -> anyhow::Result<ExitCode> {
    let config: quorum_worker::Config = quorum_service::load_config(config)?;
    let format: quorum_worker::ledger::Format =
        format.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let mut records = quorum_worker::ledger::read(&config.data_dir)?;
    if let Some(tenant) = tenant {
        records.retain(|r| r.entry.tenant == tenant);
    }
    print!("{}", quorum_worker::ledger::render(&records, format));
    Ok(ExitCode::SUCCESS)
}

pub async fn enroll(
    config: &Path,
    owner: &str,
    trusted: bool,
    labels: &[String],
) -> anyhow::Result<ExitCode> {
    let config: quorum_controller::Config = quorum_service::load_config(config)?;
    let mut map = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label `{l}` is not k=v"))?;
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    let token = quorum_controller::create_enrollment(
        &config.data_dir,
        config.database_url().as_deref(),
        owner,
        trusted,
        &map,
    )
    .await?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

pub fn hash_secret() -> anyhow::Result<ExitCode> {
    let mut secret = String::new();
    std::io::stdin()
        .read_to_string(&mut secret)
        .context("cannot read the secret from standard input")?;
    let secret = secret.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!secret.is_empty(), "the secret on standard input is empty");
    println!("{}", quorum_idp::hash_secret(secret));
    Ok(ExitCode::SUCCESS)
}

/// `quorum idp client ...`: works on the IdP's database directly. New secrets go to standard
/// output alone (one line, for scripts); what happened goes to standard error.
pub async fn idp_client(action: IdpClientAdmin) -> anyhow::Result<ExitCode> {
    let config = match &action {
        IdpClientAdmin::Add { config, .. }
        | IdpClientAdmin::List { config, .. }
        | IdpClientAdmin::Disable { config, .. }
        | IdpClientAdmin::Enable { config, .. }
        | IdpClientAdmin::Rotate { config, .. } => config,
    };
    let loaded: quorum_idp::Config = quorum_service::load_config(config)?;
    let admin = quorum_idp::ClientAdmin::open(&loaded)
        .await
        .with_context(|| format!("config file {}", config.display()))?;
    let outcome = idp_client_action(&admin, &action).await;
    admin.close().await;
    outcome?;
    Ok(ExitCode::SUCCESS)
}

async fn idp_client_action(
    admin: &quorum_idp::ClientAdmin,
    action: &IdpClientAdmin,
) -> anyhow::Result<()> {
    match action {
        IdpClientAdmin::Add { id, tenant, .. } => {
            let secret = admin.add(id, tenant).await?;
            eprintln!(
                "added client `{id}` for tenant `{tenant}`; its secret is printed below and shown only this once"
            );
            println!("{secret}");
        }
        IdpClientAdmin::List { json, .. } => {
            let clients = admin.list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&clients)?);
            } else {
                let width = |f: fn(&quorum_idp::ClientInfo) -> usize, min: usize| {
                    clients.iter().map(f).max().unwrap_or(0).max(min)
                };
                let (w_id, w_tenant) = (width(|c| c.id.len(), 2), width(|c| c.tenant.len(), 6));
                println!(
                    "{:w_id$}  {:w_tenant$}  {:6}  STATE",
                    "ID", "TENANT", "SOURCE"
                );
                for c in &clients {
                    let state = if c.disabled { "disabled" } else { "enabled" };
                    println!(
                        "{:w_id$}  {:w_tenant$}  {:6}  {state}",
                        c.id,
                        c.tenant,
                        c.source.to_string()
                    );
                }
            }
        }
        IdpClientAdmin::Disable { id, .. } => {
            admin.disable(id).await?;
            eprintln!("disabled client `{id}`");
        }
        IdpClientAdmin::Enable { id, .. } => {
            admin.enable(id).await?;
            eprintln!("enabled client `{id}`");
        }
        IdpClientAdmin::Rotate { id, .. } => {
            let secret = admin.rotate(id).await?;
            eprintln!(
                "rotated the secret of client `{id}`; the old one no longer works, the new one is printed below and shown only this once"
            );
            println!("{secret}");
        }
    }
    Ok(())
}

/// `quorum idp key ...`: works on the IdP's database directly; a running IdP sees a rotation at
/// its next request.
pub async fn idp_key(action: IdpKeyAdmin) -> anyhow::Result<ExitCode> {
    let (IdpKeyAdmin::Rotate { config } | IdpKeyAdmin::List { config, .. }) = &action;
    let loaded: quorum_idp::Config = quorum_service::load_config(config)?;
    let admin = quorum_idp::KeyAdmin::open(&loaded)
        .await
        .with_context(|| format!("config file {}", config.display()))?;
    let outcome = idp_key_action(&admin, &action).await;
    admin.close().await;
    outcome?;
    Ok(ExitCode::SUCCESS)
}

async fn idp_key_action(admin: &quorum_idp::KeyAdmin, action: &IdpKeyAdmin) -> anyhow::Result<()> {
    match action {
        IdpKeyAdmin::Rotate { .. } => {
            let key = admin.rotate().await?;
            eprintln!(
                "rotated the signing key; new tokens carry the kid below, the old key stays in JWKS until its tokens have expired"
            );
            println!("{}", key.kid);
        }
        IdpKeyAdmin::List { json, .. } => {
            let keys = admin.list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                let w_kid = keys.iter().map(|k| k.kid.len()).max().unwrap_or(0).max(3);
                println!("{:w_kid$}  {:20}  STATE", "KID", "CREATED");
                for k in &keys {
                    println!(
                        "{:w_kid$}  {:20}  {}",
                        k.kid,
                        quorum_idp::rfc3339(k.created_at),
                        k.state
                    );
                }
            }
        }
    }
    Ok(())
}

/// `quorum controller signer ...`: works on the signer's key files directly; a running
/// controller reads them at its next signature.
pub fn signer_key(action: SignerKeyAdmin) -> anyhow::Result<ExitCode> {
    let (SignerKeyAdmin::Rotate { config }
    | SignerKeyAdmin::List { config, .. }
    | SignerKeyAdmin::Revoke { config, .. }) = &action;
    let loaded: quorum_controller::Config = quorum_service::load_config(config)?;
    let ring = quorum_controller::signer_key_ring(&loaded.data_dir);
    match &action {
        SignerKeyAdmin::Rotate { .. } => {
            let key = ring.rotate()?;
            eprintln!(
                "rotated the signer's key; new statements are signed with the key below, older ones keep verifying with the retired key"
            );
            println!("{}", key.keyid);
        }
        SignerKeyAdmin::List { json, .. } => {
            let keys = ring.list()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                let w_id = keys.iter().map(|k| k.keyid.len()).max().unwrap_or(0).max(6);
                println!("{:w_id$}  {:20}  STATE", "KEY ID", "CREATED");
                for k in &keys {
                    println!(
                        "{:w_id$}  {:20}  {}",
                        k.keyid,
                        quorum_idp::rfc3339(k.created_at),
                        k.state()
                    );
                }
            }
        }
        SignerKeyAdmin::Revoke { key_id, .. } => {
            ring.revoke(key_id)?;
            eprintln!(
                "revoked key {key_id}: it is no longer published, and statements it signed no longer verify for consumers"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
