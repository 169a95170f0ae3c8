//! Landlock inside the sandbox: the last layer, applied by `quorum-sandbox-init` after bubblewrap
//! has made its mounts (a Landlocked process may not mount) and installed the seccomp filter,
//! just before it executes the step's shell.
//!
//! The rules, on top of what the mount layout already allows:
//! - files anywhere may be read and executed, but written, created, removed, renamed, linked or
//!   truncated only beneath the `--write` directories (`/build`, `/tmp`, `/dev/shm`); device
//!   nodes beneath a `--dev` directory (`/dev`) may also be written and `ioctl`ed;
//! - no TCP `bind` or `connect` at all (ABI 4);
//! - abstract Unix sockets and signals are scoped: nothing created outside the step's Landlock
//!   domain can be connected to or signalled (ABI 6).
//!
//! Best effort: an older kernel enforces what it knows, and the start-up probe reports the tier
//! ([`LandlockTier`]) so the owner and each result say what held.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use landlock::{
    ABI, Access, AccessFs, AccessNet, LandlockStatus, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, path_beneath_rules,
};

/// The helper's file name; the worker looks for it next to its own executable, then on PATH,
/// and else uses its own executable when that registered as the init ([`multicall_main`]).
pub const INIT_NAME: &str = "quorum-sandbox-init";
/// The init's path inside the sandbox (its file name is how a multi-call binary knows it).
pub(crate) const INIT_PATH: &str = "/.quorum-init";

/// Set by [`multicall_main`]: this process's own executable can act as the init.
static MULTICALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For a binary that embeds the worker (the `quorum` binary): call first thing in `main`. When
/// the process was started as the init (its `argv[0]` names [`INIT_NAME`] or [`INIT_PATH`]),
/// runs the init and returns its exit status; otherwise records that this executable can serve
/// as the init, so that the worker needs no second file, and returns `None`.
pub fn multicall_main() -> Option<ExitCode> {
    let arg0 = std::env::args_os().next()?;
    let name = Path::new(&arg0).file_name()?.to_owned();
    let init_file = Path::new(INIT_PATH)
        .file_name()
        .expect("INIT_PATH names a file");
    if name == INIT_NAME || name == init_file {
        return Some(init_main());
    }
    MULTICALL.store(true, std::sync::atomic::Ordering::Relaxed);
    None
}

/// Whether [`multicall_main`] registered this process's executable as the init.
pub(crate) fn is_multicall() -> bool {
    MULTICALL.load(std::sync::atomic::Ordering::Relaxed)
}
/// The highest Landlock ABI the rules are written for.
const ABI_WANTED: ABI = ABI::V7;
/// Exit status of the init when it cannot restrict itself: the step never runs unconfined.
const INIT_FAILED: u8 = 126;

/// How much of the Landlock layer the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockTier {
    /// Every rule holds (filesystem, TCP, scoping), at this kernel ABI.
    Full { abi: i32 },
    /// The kernel knows Landlock, but not every rule (for example no TCP rules before ABI 4).
    Partial { abi: i32 },
    /// The kernel has no Landlock, or the helper is missing.
    None,
}

impl std::fmt::Display for LandlockTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LandlockTier::Full { abi } => write!(f, "landlock ABI {abi}"),
            LandlockTier::Partial { abi } => write!(f, "landlock ABI {abi} (partial)"),
            LandlockTier::None => f.write_str("no landlock"),
        }
    }
}

/// The helper's options for a sandboxed step, before `-- <command>` or `--wait`.
pub(crate) fn init_arguments(init_in_sandbox: &Path) -> Vec<OsString> {
    [
        init_in_sandbox.as_os_str(),
        "--write".as_ref(),
        super::sandbox::BUILD_PATH.as_ref(),
        "--write".as_ref(),
        "/tmp".as_ref(),
        "--write".as_ref(),
        "/dev/shm".as_ref(),
        "--dev".as_ref(),
        "/dev".as_ref(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// Runs `init --report -- /bin/true` on the host (Landlock needs no privilege) and reads which
/// tier it reached. Blocking, a few milliseconds.
#[allow(clippy::disallowed_methods)] // the executor is where build-side processes are created
pub(crate) fn probe_init(init: &Path) -> Result<LandlockTier, String> {
    use std::os::unix::process::CommandExt as _;
    // argv[0] names the init, so that a multi-call binary runs as the init here too.
    let out = Command::new(init)
        .arg0(INIT_NAME)
        .args(["--report", "--write", "/nonexistent", "--", "/bin/true"])
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", init.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} --report ended with {}: {}",
            init.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_report(&stdout)
        .ok_or_else(|| format!("unexpected report from {}: {stdout:?}", init.display()))
}

/// Reads the `landlock <full|partial|none> <abi>` line the init writes with `--report`.
fn parse_report(text: &str) -> Option<LandlockTier> {
    let line = text.lines().find(|l| l.starts_with("landlock "))?;
    let mut words = line.split_whitespace().skip(1);
    let (kind, abi) = (words.next()?, words.next()?.parse().ok()?);
    match kind {
        "full" => Some(LandlockTier::Full { abi }),
        "partial" => Some(LandlockTier::Partial { abi }),
        "none" => Some(LandlockTier::None),
        _ => None,
    }
}

/// What the init was asked to do.
#[derive(Debug, Default)]
struct InitArgs {
    report: bool,
    /// Read the environment and command from stdin once restricted (`--wait`): the init of a
    /// spare sandbox, waiting for its step.
    wait: bool,
    write: Vec<PathBuf>,
    dev: Vec<PathBuf>,
    command: Vec<OsString>,
}

/// The most a step's environment and command may take in the hand-over message; the kernel's
/// own limit for the arguments and environment of an exec is lower.
const HANDOVER_MAX: u64 = 4 << 20;

/// What the worker hands a waiting init ([`InitArgs::wait`]) on its stdin: the header
/// `<variables> <arguments>\n`, then each `KEY=value` and each argument, each ended by a NUL.
/// The counts make a message cut short (the worker died while writing) an error, never a
/// different command.
pub(crate) fn handover_message(
    env: &[(&str, String)],
    command: &[&str],
) -> Result<Vec<u8>, String> {
    let mut message = format!("{} {}\n", env.len(), command.len()).into_bytes();
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(format!(
                "the environment variable `{key}` cannot be passed on"
            ));
        }
        message.extend_from_slice(format!("{key}={value}\0").as_bytes());
    }
    for arg in command {
        if arg.contains('\0') {
            return Err("the step's command contains a NUL byte".into());
        }
        message.extend_from_slice(arg.as_bytes());
        message.push(0);
    }
    if message.len() as u64 > HANDOVER_MAX {
        return Err(format!(
            "the step's command and environment take {} bytes, more than {HANDOVER_MAX}",
            message.len()
        ));
    }
    Ok(message)
}

/// The environment and command in a [`handover_message`].
type Handover = (Vec<(OsString, OsString)>, Vec<OsString>);

fn parse_handover(message: &[u8]) -> Result<Handover, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let newline = message
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header in the hand-over message")?;
    let header = std::str::from_utf8(&message[..newline]).map_err(|_| "a garbled header")?;
    let counts = header
        .split_once(' ')
        .and_then(|(e, a)| Some((e.parse::<usize>().ok()?, a.parse::<usize>().ok()?)));
    let Some((variables, arguments)) = counts else {
        return Err(format!("a garbled header {header:?}"));
    };
    let body = &message[newline + 1..];
    let Some(body) = body.strip_suffix(b"\0") else {
        return Err("the hand-over message was cut short".into());
    };
    let fields: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    if fields.len() != variables + arguments || arguments == 0 {
        return Err(format!(
            "{} fields for {variables} variables and {arguments} arguments",
            fields.len()
        ));
    }
    let mut env = Vec::with_capacity(variables);
    for field in &fields[..variables] {
        let eq = field
            .iter()
            .position(|&b| b == b'=')
            .filter(|&i| i > 0)
            .ok_or("a variable without a name")?;
        env.push((
            std::ffi::OsStr::from_bytes(&field[..eq]).to_owned(),
            std::ffi::OsStr::from_bytes(&field[eq + 1..]).to_owned(),
        ));
    }
    let command = fields[variables..]
        .iter()
        .map(|f| std::ffi::OsStr::from_bytes(f).to_owned())
        .collect();
    Ok((env, command))
}

fn parse_args(args: impl Iterator<Item = OsString>) -> Result<InitArgs, String> {
    let mut parsed = InitArgs::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--report") => parsed.report = true,
            Some("--wait") => parsed.wait = true,
            Some(flag @ ("--write" | "--dev")) => {
                let dir = args
                    .next()
                    .ok_or_else(|| format!("{flag} needs a directory"))?;
                if flag == "--write" {
                    parsed.write.push(dir.into());
                } else {
                    parsed.dev.push(dir.into());
                }
            }
            Some("--") => {
                parsed.command = args.collect();
                break;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    match (parsed.wait, parsed.command.is_empty()) {
        (false, true) => return Err("no command after `--`".into()),
        (true, false) => return Err("--wait takes the command from stdin, not after `--`".into()),
        _ => {}
    }
    Ok(parsed)
}

fn restrict(write: &[PathBuf], dev: &[PathBuf]) -> Result<RestrictionStatus, RulesetError> {
    let abi = ABI_WANTED;
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(
            dev,
            AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev,
        ))?
        .add_rules(path_beneath_rules(write, AccessFs::from_all(abi)))?
        .restrict_self()
}

/// The helper's `main`: restrict itself, optionally report the tier on stdout, and execute the
/// command. It returns only when something failed.
#[allow(clippy::disallowed_methods)] // exec, not spawn: the step replaces the helper
pub fn init_main() -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let fail = |message: String| {
        eprintln!("{INIT_NAME}: {message}");
        ExitCode::from(INIT_FAILED)
    };
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let status = match restrict(&args.write, &args.dev) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot apply the Landlock rules: {e}")),
    };
    if args.report {
        let abi = match status.landlock {
            LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
            _ => 0,
        };
        let kind = match status.ruleset {
            RulesetStatus::FullyEnforced => "full",
            RulesetStatus::PartiallyEnforced => "partial",
            _ => "none",
        };
        println!("landlock {kind} {abi}");
    }
    let mut command = if args.wait {
        // A spare: everything above is done before its step is known; now wait for the step.
        let mut message = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin().lock(), HANDOVER_MAX + 1),
            &mut message,
        ) {
            return fail(format!("cannot read the step from the worker: {e}"));
        }
        if message.is_empty() {
            // The worker let the spare go without a step: nothing ran, which is no success.
            return ExitCode::from(INIT_FAILED);
        }
        let (env, argv) = match parse_handover(&message) {
            Ok(handover) => handover,
            Err(e) => return fail(format!("unusable step from the worker: {e}")),
        };
        let (program, rest) = argv.split_first().expect("checked by parse_handover");
        let mut command = Command::new(program);
        // Exactly the step's environment; the pipe the step came through is not its stdin.
        command
            .args(rest)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null());
        command
    } else {
        let (program, rest) = args.command.split_first().expect("checked by parse_args");
        let mut command = Command::new(program);
        command.args(rest);
        command
    };
    let err = command.exec();
    fail(format!("cannot execute {:?}: {err}", command.get_program()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_reports_and_arguments() {
        assert_eq!(
            parse_report("landlock full 7\n"),
            Some(LandlockTier::Full { abi: 7 })
        );
        assert_eq!(parse_report("landlock none 0\n"), Some(LandlockTier::None));
        assert_eq!(parse_report("nonsense"), None);
        let a = parse_args(
            ["--write", "/b", "--dev", "/dev", "--", "sh", "-c", "x"]
                .into_iter()
                .map(OsString::from),
        )
        .unwrap();
        assert_eq!(a.write, [PathBuf::from("/b")]);
        assert_eq!(a.dev, [PathBuf::from("/dev")]);
        assert_eq!(a.command.len(), 3);
        assert!(parse_args(["--write"].into_iter().map(OsString::from)).is_err());
        assert!(parse_args(["--report"].into_iter().map(OsString::from)).is_err());
        assert!(parse_args(["--wait"].into_iter().map(OsString::from)).is_ok_and(|a| a.wait));
        assert!(parse_args(["--wait", "--", "sh"].into_iter().map(OsString::from)).is_err());
    }

    #[test]
    fn a_handover_message_reads_back_and_a_cut_one_is_refused() {
        let env = [("A", "1=2".to_string()), ("EMPTY", String::new())];
        let message = handover_message(&env, &["/bin/sh", "-c", ""]).unwrap();
        let (got_env, got_cmd) = parse_handover(&message).unwrap();
        assert_eq!(
            got_env,
            [("A".into(), "1=2".into()), ("EMPTY".into(), "".into())]
        );
        assert_eq!(got_cmd, [OsString::from("/bin/sh"), "-c".into(), "".into()]);
        for cut in 0..message.len() {
            assert!(
                parse_handover(&message[..cut]).is_err(),
                "cut at {cut} was accepted"
            );
        }
        assert!(handover_message(&[("A=B", String::new())], &["x"]).is_err());
        assert!(handover_message(&[], &["a\0b"]).is_err());
    }
}
