//! Benchmark: `quorum publish` against rsync to an rsync daemon, side by side on loopback.
//!
//! ```text
//! cargo build --release -p quorum --bin quorum --example publish_vs_rsync
//! target/release/examples/publish_vs_rsync [--files 10000] [--bytes 1073741824] [--dir DIR]
//!     [--parallel 8] [--quorum PATH] [--drop-caches]
//! ```
//!
//! Generates a tree of `--files` files totalling `--bytes` (mixed sizes, deterministic), starts
//! a real IdP and store (the release `quorum` binary beside this example) and an rsync daemon,
//! and runs three scenarios with each tool: the first upload, the same tree again unchanged, and
//! the tree with one file rewritten. rsync runs twice per scenario, into two destinations:
//! `rsync -a` (the issue's target) and `rsync -a --fsync`, which makes every file durable as
//! the store does before it answers (the durable baseline). Both tools reach their server
//! through a relay in this process that counts the bytes each way, so "bytes sent" is what
//! crossed the wire (TCP payload, client to server) for both, protocol included. Every timed
//! run starts after a `sync`, so none pays for writing out what the one before it (or the
//! generated tree) left dirty in the page cache, and the table shows the load average at each
//! scenario. Beside each time it prints the CPU seconds (user + system) of the client and of the
//! server: the client's from this process's reaped children, the store's from its process, the
//! rsync daemon's from the connection processes it reaped. Also prints SHA-256 throughput on one
//! core.
//!
//! `--drop-caches` (root only) syncs and drops the kernel's clean caches before the tree is
//! generated. After many files were deleted (an earlier run's directory, say), creating files
//! on the project machine's ext4 (no journal) stays several times slower while the caches hold
//! what was deleted: ext4's inode allocator (`find_inode_bit`, `recently_deleted`) took a third
//! of all samples in such a run. rsync, which creates a file per file, then takes about three
//! times as long; the store, which keeps a batch in one pack, does not. Dropping the caches
//! first gives rsync its fast case (docs/benchmarks.md).

#![allow(clippy::disallowed_methods)] // a harness: it runs rsync and the quorum binary

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use quorum::federation::Launcher;
use quorum_api::v1::idp::{TOKEN_TYPE_UPLOAD, TokenConstraints};
use quorum_client::idp::{IdpClient, TokenFor};

const AUDIENCE: &str = "store:bench";
const SECRET: &str = "bench-secret";
const TENANT: &str = "bench";

struct Options {
    files: usize,
    bytes: u64,
    dir: Option<PathBuf>,
    quorum: PathBuf,
    parallel: usize,
    drop_caches: bool,
}

fn options() -> anyhow::Result<Options> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/<this> -> target/<profile>/quorum
    let quorum = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("quorum"))
        .context("cannot locate the quorum binary")?;
    let mut o = Options {
        files: 10_000,
        bytes: 1 << 30,
        dir: None,
        quorum,
        parallel: quorum_client::publish::DEFAULT_PARALLEL,
        drop_caches: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--files" => o.files = value()?.parse()?,
            "--bytes" => o.bytes = value()?.parse()?,
            "--dir" => o.dir = Some(value()?.into()),
            "--quorum" => o.quorum = value()?.into(),
            "--parallel" => o.parallel = value()?.parse()?,
            "--drop-caches" => o.drop_caches = true,
            other => bail!("unknown argument {other}; see the module documentation"),
        }
    }
    ensure!(o.files >= 100, "--files must be at least 100");
    ensure!(
        o.quorum.exists(),
        "{} does not exist; build it with `cargo build --release -p quorum --bin quorum`",
        o.quorum.display()
    );
    Ok(o)
}

/// A small, fast, deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// File sizes: 90% small (1-64 KiB), 9% medium (64 KiB-1 MiB), 1% large sharing the rest.
fn sizes(files: usize, total: u64) -> Vec<u64> {
    let mut rng = Rng::new(7);
    let mut sizes: Vec<u64> = (0..files)
        .map(|i| match i % 100 {
            0..90 => 1024 + rng.next() % (63 * 1024),
            90..99 => (64 << 10) + rng.next() % (960 << 10),
            _ => 0,
        })
        .collect();
    let fixed: u64 = sizes.iter().sum();
    let large = files.div_ceil(100) as u64;
    let each = total.saturating_sub(fixed) / large;
    let mut rest = total.saturating_sub(fixed) - each * large;
    for (i, s) in sizes.iter_mut().enumerate() {
        if i % 100 == 99 || (i == files - 1 && *s == 0) {
            *s = each + std::mem::take(&mut rest);
        }
    }
    sizes
}

fn file_name(i: usize) -> String {
    format!("d{:03}/f{i:05}.bin", i / 100)
}

fn write_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut left = size;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

fn generate(root: &Path, sizes: &[u64]) -> anyhow::Result<()> {
    for (i, size) in sizes.iter().enumerate() {
        let path = root.join(file_name(i));
        if i % 100 == 0 {
            std::fs::create_dir_all(path.parent().expect("files are in directories"))?;
        }
        write_file(&path, *size, i as u64)?;
    }
    Ok(())
}

/// A TCP relay to `target` that counts bytes client-to-server and server-to-client.
struct Relay {
    port: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: String) -> anyhow::Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (u, d, target) = (u.clone(), d.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    if let Ok((a, b)) = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut server,
                        256 << 10,
                        256 << 10,
                    )
                    .await
                    {
                        u.fetch_add(a, Ordering::SeqCst);
                        d.fetch_add(b, Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Relay { port, up, down })
    }

    /// Bytes counted so far, and the counters reset. Connections are counted when they close.
    async fn take(&self) -> (u64, u64) {
        // The client has exited; give the relay a moment to see both ends close.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (
            self.up.swap(0, Ordering::SeqCst),
            self.down.swap(0, Ordering::SeqCst),
        )
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `rsync --daemon` on a loopback port, writing module `bench` into `dest` and module
/// `bench-fsync` into `dest_fsync`. Stopped when dropped.
struct RsyncDaemon {
    child: Child,
    port: u16,
}

impl RsyncDaemon {
    fn start(dir: &Path, dest: &Path, dest_fsync: &Path) -> anyhow::Result<RsyncDaemon> {
        let port = free_port()?;
        let conf = dir.join("rsyncd.conf");
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = {uid}\ngid = {gid}\n[bench]\npath = {}\nread only = no\n\
                 [bench-fsync]\npath = {}\nread only = no\n",
                dest.display(),
                dest_fsync.display()
            ),
        )?;
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .arg(format!("--log-file={}", dir.join("rsyncd.log").display()))
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start rsync --daemon (is rsync installed?)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "the rsync daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(RsyncDaemon { child, port })
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tool's result for one scenario: wall time, bytes sent, and CPU seconds (user + system)
/// of the client and of the server.
#[derive(Debug, Clone, Copy)]
struct Run {
    secs: f64,
    sent: u64,
    client_cpu: f64,
    server_cpu: f64,
}

/// Clock ticks in `/proc/<pid>/stat`: `USER_HZ`, 100 on every Linux architecture's ABI.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds from `/proc/<pid>/stat`: the process's own (user + system, every thread) and
/// its reaped children's.
fn cpu_of(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is the
    // first, utime the 12th, stime, cutime, cstime the next three.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("/proc/{pid}/stat has no command name"))?;
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    ensure!(fields.len() == 4, "/proc/{pid}/stat is too short");
    Ok((
        (fields[0] + fields[1]) / TICKS_PER_SEC,
        (fields[2] + fields[3]) / TICKS_PER_SEC,
    ))
}

/// CPU seconds of this process's reaped children (the client runs as one, waited for).
fn children_cpu() -> anyhow::Result<f64> {
    Ok(cpu_of(std::process::id())?.1)
}

/// The process id of the child of this process whose command line names `config`.
fn child_with_config(config: &Path) -> anyhow::Result<u32> {
    let me = std::process::id().to_string();
    let wanted = config.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read(format!("/proc/{pid}/cmdline")),
        ) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent == Some(me.as_str()) && cmdline.split(|b| *b == 0).any(|a| a == wanted) {
            return Ok(pid);
        }
    }
    bail!("no child process runs with {}", config.display())
}

/// A server process whose CPU time a run reads before and after: the store (its own time) or
/// the rsync daemon (the connection processes it forked and reaped).
#[derive(Debug, Clone, Copy)]
struct Server {
    pid: u32,
}

impl Server {
    fn cpu(&self) -> anyhow::Result<f64> {
        let (own, children) = cpu_of(self.pid)?;
        Ok(own + children)
    }
}

/// Runs `command` (the client) after `settle`, timed, and reads both sides' CPU time around it.
async fn timed(
    mut command: Command,
    what: &str,
    relay: &Relay,
    server: Server,
) -> anyhow::Result<(Run, std::process::Output)> {
    settle()?;
    let (client_before, server_before) = (children_cpu()?, server.cpu()?);
    let started = Instant::now();
    let out = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Waits for the relay to see the connections close, and so for the rsync daemon to reap
    // its connection process.
    let (sent, _) = relay.take().await;
    let run = Run {
        secs,
        sent,
        client_cpu: children_cpu()? - client_before,
        server_cpu: server.cpu()? - server_before,
    };
    Ok((run, out))
}

/// Writes every dirty page out before a timed run, so that no run pays for writing out what the
/// one before it left in the page cache (rsync fsyncs nothing; the generated tree is 1 GiB):
/// the kernel's flusher would otherwise write it out during whichever run comes next.
fn settle() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("cannot run sync")?;
    ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// `rsync -a` into module `bench`, or with `fsync` `rsync -a --fsync` into `bench-fsync`.
async fn rsync(src: &Path, relay: &Relay, daemon: Server, fsync: bool) -> anyhow::Result<Run> {
    let mut command = Command::new("rsync");
    command.arg("-a");
    if fsync {
        command.arg("--fsync");
    }
    let module = if fsync { "bench-fsync" } else { "bench" };
    command
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://127.0.0.1:{}/{module}/", relay.port));
    let (run, _) = timed(command, "rsync", relay, daemon).await?;
    Ok(run)
}

async fn publish(
    quorum: &Path,
    src: &Path,
    (relay, store): (&Relay, Server),
    token: &str,
    cache: &Path,
    parallel: usize,
) -> anyhow::Result<(Run, serde_json::Value)> {
    let mut command = Command::new(quorum);
    command
        .arg("publish")
        .arg(format!("--store=http://127.0.0.1:{}", relay.port))
        .arg(format!("--token={token}"))
        .arg("--type=bench")
        .arg(format!("--parallel={parallel}"))
        .arg(format!("--cache={}", cache.display()))
        .arg("--json")
        .arg("bench")
        .arg("*/*.bin")
        .current_dir(src)
        .env(
            "RUST_LOG",
            std::env::var("QUORUM_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let (run, out) = timed(command, "quorum publish", relay, store).await?;
    let summary = serde_json::from_slice(&out.stdout)?;
    if !out.stderr.is_empty() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((run, summary))
}

/// SHA-256 of a 512 MiB buffer on one core, in GB/s.
fn sha256_throughput() -> f64 {
    let buf: Vec<u8> = {
        let mut rng = Rng::new(99);
        (0..(512usize << 20) / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect()
    };
    let started = Instant::now();
    let digest = quorum_core::Digest::of(&buf);
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(digest);
    buf.len() as f64 / secs / 1e9
}

/// The one-minute load average, to judge how much other work shared the machine.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn mib(n: u64) -> String {
    format!("{:.2} MiB", n as f64 / (1 << 20) as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let tmp;
    let dir = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let src = dir.join("tree");
    let _ = std::fs::remove_dir_all(&src);
    if o.drop_caches {
        settle()?;
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .context("cannot drop the kernel's caches (--drop-caches needs root)")?;
    }
    let sizes = sizes(o.files, o.bytes);
    let started = Instant::now();
    generate(&src, &sizes)?;
    let total: u64 = sizes.iter().sum();
    eprintln!(
        "generated {} files, {} in {:.1} s",
        sizes.len(),
        mib(total),
        started.elapsed().as_secs_f64()
    );

    // The servers.
    let dest = dir.join("rsync-dest");
    let dest_fsync = dir.join("rsync-dest-fsync");
    for d in [&dest, &dest_fsync] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    let daemon = RsyncDaemon::start(&dir, &dest, &dest_fsync)?;
    let daemon_cpu = Server {
        pid: daemon.child.id(),
    };
    let roles = dir.join("roles");
    let _ = std::fs::remove_dir_all(&roles);
    std::fs::create_dir_all(&roles)?;
    // The roles' logs (roles/<name>.log) at the level QUORUM_BENCH_LOG says, warn by default.
    let log_filter = std::env::var("QUORUM_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let mut launcher = Launcher::new(&o.quorum, &roles, &log_filter);
    let idp_url = launcher
        .server(
            "idp",
            "idp",
            &quorum_idp::Config {
                listen: "127.0.0.1:0".into(),
                data_dir: roles.join("idp"),
                issuer: None,
                max_token_lifetime_secs: 3600,
                clients: vec![quorum_idp::ClientConfig {
                    id: "bench".into(),
                    tenant: TENANT.into(),
                    secret_hash: quorum_idp::hash_secret(SECRET),
                }],
            },
        )
        .await?;
    let store_url = launcher
        .server_text(
            "store",
            "store",
            &format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\naudience = \"{AUDIENCE}\"\n\
                 trusted_issuers = [{{ issuer = \"{idp_url}\" }}]\n",
                roles.join("store").display().to_string()
            ),
        )
        .await?;
    let store_cpu = Server {
        pid: child_with_config(&roles.join("store.toml"))?,
    };
    let rsync_relay = Relay::start(format!("127.0.0.1:{}", daemon.port)).await?;
    let store_relay = Relay::start(store_url.trim_start_matches("http://").to_string()).await?;
    let idp = IdpClient::new(&idp_url, "bench", SECRET);
    // The limits a controller gives an assignment (see quorum-controller's upload token).
    let max_files = 100_000u64;
    let token = async |assignment: &str| -> anyhow::Result<String> {
        let access = idp.access_token().await?.access_token;
        let what = TokenFor {
            token_type: TOKEN_TYPE_UPLOAD,
            audience: AUDIENCE.into(),
            build: "bench".into(),
            job: Some("publish".into()),
            assignment: Some(assignment.into()),
            lifetime_secs: 3600,
            constraints: TokenConstraints {
                max_files: Some(max_files),
                max_bytes: Some(16 << 30),
                max_calls: Some(max_files + max_files / 10_000 + 16),
                source_cidrs: None,
            },
        };
        Ok(idp.exchange(&access, &what).await?.access_token)
    };
    let cache = dir.join("publish-digests.bin");
    let _ = std::fs::remove_file(&cache);

    let mut rows = Vec::new();
    for (i, scenario) in ["first upload", "unchanged", "one file changed"]
        .iter()
        .enumerate()
    {
        if i == 2 {
            // Rewrite one medium file completely, same size, new mtime.
            let changed = (0..sizes.len()).find(|i| i % 100 == 95).unwrap_or(0);
            write_file(&src.join(file_name(changed)), sizes[changed], 1_000_000)?;
            eprintln!("rewrote {} ({})", file_name(changed), mib(sizes[changed]));
        }
        let load = load();
        let r = rsync(&src, &rsync_relay, daemon_cpu, false).await?;
        let f = rsync(&src, &rsync_relay, daemon_cpu, true).await?;
        let token = token(&format!("a{i}")).await?;
        let (q, summary) = publish(
            &o.quorum,
            &src,
            (&store_relay, store_cpu),
            &token,
            &cache,
            o.parallel,
        )
        .await?;
        eprintln!(
            "{scenario} (load {load}): rsync {r:?}, rsync --fsync {f:?}, quorum {q:?} {summary}"
        );
        rows.push((scenario, load, r, f, q, summary));
    }

    let gbps = sha256_throughput();
    println!(
        "{} files, {} (mixed sizes); rsync -a (and rsync -a --fsync) to an rsync daemon vs quorum \
         publish, both through a counting relay on loopback; CPU is user + system seconds, \
         client + server\n",
        sizes.len(),
        mib(total)
    );
    println!(
        "| scenario | load | rsync time | rsync --fsync time | publish time | rsync sent | publish sent | blobs sent | time ratio | ratio to --fsync | bytes ratio | rsync CPU | rsync --fsync CPU | publish CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let cpu = |run: &Run| format!("{:.2} + {:.2} s", run.client_cpu, run.server_cpu);
    for (scenario, load, r, f, q, summary) in &rows {
        println!(
            "| {scenario} | {load} | {:.2} s | {:.2} s | {:.2} s | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            r.secs,
            f.secs,
            q.secs,
            mib(r.sent),
            mib(q.sent),
            summary["blobs_sent"],
            q.secs / r.secs,
            q.secs / f.secs,
            q.sent as f64 / r.sent.max(1) as f64,
            cpu(r),
            cpu(f),
            cpu(q),
        );
    }
    println!("\nSHA-256 on one core: {gbps:.2} GB/s");
    drop(launcher);
    drop(daemon);
    Ok(())
}
