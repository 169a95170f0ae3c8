//! The seccomp filter of sandboxed steps: a deny list of system calls that builds never need and
//! that widen the kernel's attack surface or reach out of the sandbox. Denied calls fail with
//! `EPERM`, not a kill, so a build that tries one gets an ordinary error it can report.
//!
//! The filter is compiled once per worker with `seccompiler` for the host's architecture and
//! handed to bubblewrap (`--seccomp FD`) as raw classic BPF, which bwrap installs just before it
//! executes the step, after it has set up the namespaces and mounts itself.
//!
//! Denied with `EPERM`:
//! - key management (`keyctl`, `add_key`, `request_key`): the kernel keyring is not namespaced;
//! - `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*`: frequent kernel exploit vectors;
//! - `ptrace`, `process_vm_readv`/`writev`: no build inspects another process's memory;
//! - `kexec_*`, `init_module`, `finit_module`, `delete_module`;
//! - `mount`, `umount2`, `pivot_root`, `setns`: the sandbox's mounts and namespaces are final;
//! - `unshare` and `clone` with `CLONE_NEWUSER`: nested user namespaces are the usual first step
//!   of kernel exploits. The filter is the only wall here (bwrap's `--disable-userns` would be a
//!   second one, at the price of a nested namespace per step); conformance 13 tests it alone;
//! - `ioctl` `TIOCSTI` and `TIOCLINUX`, which inject input into a terminal;
//! - `chmod`, `fchmod`, `fchmodat` and `fchmodat2` setting `S_ISUID` or `S_ISGID`.
//!
//! Two calls cannot be filtered by argument and get `ENOSYS` instead, from a hand-written prefix:
//! `clone3` (its flags sit behind a pointer; `ENOSYS` makes glibc fall back to `clone`, which the
//! filter can inspect, where `EPERM` would break thread creation), and, on x86_64, every x32
//! system call (numbers with bit 30 set share the x86_64 audit architecture, so a deny list keyed
//! by x86_64 numbers would not see `keyctl` called through them). Everything else is allowed;
//! foreign architectures (i386 `int 0x80`, arm32 compat) kill the process, as seccompiler does.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// `AUDIT_ARCH_*` of the host, as the kernel reports it in `seccomp_data.arch`.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// x32 system calls are the x86_64 numbers with this bit set; none exist on aarch64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/filter.h); seccompiler does not export them.
/// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K.
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
/// BPF_JMP | BPF_JGE | BPF_K.
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
/// BPF_RET | BPF_K.
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// The kernel's limit on one filter's length, in instructions.
const BPF_MAXINSNS: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompError(String);

/// The compiled filter as bwrap reads it: `struct sock_filter` instructions in native byte order.
pub(crate) fn program() -> Result<Vec<u8>, SeccompError> {
    let instructions = instructions()?;
    if instructions.len() > BPF_MAXINSNS {
        return Err(SeccompError(format!(
            "{} instructions, more than the kernel's {BPF_MAXINSNS}",
            instructions.len()
        )));
    }
    let mut bytes = Vec::with_capacity(instructions.len() * 8);
    for i in &instructions {
        bytes.extend_from_slice(&i.code.to_ne_bytes());
        bytes.push(i.jt);
        bytes.push(i.jf);
        bytes.extend_from_slice(&i.k.to_ne_bytes());
    }
    Ok(bytes)
}

fn instructions() -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SeccompError(format!("{e} (supported: x86_64, aarch64)")))?;
    let filter = SeccompFilter::new(
        rules().map_err(err)?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let denials: BpfProgram = filter.try_into().map_err(err)?;
    let mut program = prefix();
    program.extend(denials);
    Ok(program)
}

/// Checks the architecture, then answers `ENOSYS` to x32 calls and `clone3`; falls through to the
/// deny list otherwise. Jump offsets count from the next instruction.
fn prefix() -> BpfProgram {
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    vec![
        /* 0 */ stmt(BPF_LD_W_ABS, DATA_ARCH),
        /* 1 */ jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        /* 2 */ stmt(BPF_RET_K, SeccompAction::KillProcess.into()),
        /* 3 */ stmt(BPF_LD_W_ABS, DATA_NR),
        /* 4 */ jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 1, 0),
        /* 5 */ jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        /* 6 */
        stmt(BPF_RET_K, SeccompAction::Errno(libc::ENOSYS as u32).into()),
        // 7: the deny list, which loads what it needs itself.
    ]
}

/// Syscall number to the rules under which it is denied; an empty list denies it always.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_userfaultfd,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_setns,
    ] {
        rules.insert(nr, Vec::new());
    }

    // The flag and mode arguments are 32-bit in the kernel (`unsigned int cmd`, `umode_t`, the
    // clone flags it keeps), which ignores the upper half: compare the lower 32 bits only, so
    // garbage in the upper half cannot slip a request past the filter.
    let has_bits = |arg: u8, bits: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(bits),
            bits,
        )?])
    };
    let equals = |arg: u8, value: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value,
        )?])
    };
    let newuser = libc::CLONE_NEWUSER as u64;
    // Flags are the first argument of both, on x86_64 and aarch64 alike.
    rules.insert(libc::SYS_unshare, vec![has_bits(0, newuser)?]);
    rules.insert(libc::SYS_clone, vec![has_bits(0, newuser)?]);
    rules.insert(
        libc::SYS_ioctl,
        vec![equals(1, libc::TIOCSTI)?, equals(1, libc::TIOCLINUX)?],
    );
    let (suid, sgid) = (u64::from(libc::S_ISUID), u64::from(libc::S_ISGID));
    // chmod(path, mode) and fchmod(fd, mode) have the mode second; fchmodat(dirfd, path, mode)
    // and fchmodat2(dirfd, path, mode, flags) third.
    #[cfg(target_arch = "x86_64")]
    rules.insert(
        libc::SYS_chmod,
        vec![has_bits(1, suid)?, has_bits(1, sgid)?],
    );
    rules.insert(
        libc::SYS_fchmod,
        vec![has_bits(1, suid)?, has_bits(1, sgid)?],
    );
    rules.insert(
        libc::SYS_fchmodat,
        vec![has_bits(2, suid)?, has_bits(2, sgid)?],
    );
    rules.insert(
        libc::SYS_fchmodat2,
        vec![has_bits(2, suid)?, has_bits(2, sgid)?],
    );
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_compiles_to_whole_instructions_within_the_kernels_limit() {
        let bytes = program().unwrap();
        assert_eq!(bytes.len() % 8, 0);
        assert!(bytes.len() / 8 > prefix().len());
        assert!(bytes.len() / 8 <= BPF_MAXINSNS);
    }

    #[test]
    fn the_prefix_jumps_stay_inside_it() {
        let prefix = prefix();
        for (i, insn) in prefix.iter().enumerate() {
            if insn.code & 0x07 == 0x05 {
                // Targets may be the instruction just past the prefix (the deny list), no further.
                let furthest = i + 1 + usize::from(insn.jt.max(insn.jf));
                assert!(
                    furthest <= prefix.len(),
                    "instruction {i} jumps to {furthest}"
                );
            }
        }
    }
}
