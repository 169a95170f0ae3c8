//! The first program of every sandboxed step: applies the Landlock rules from inside the sandbox
//! (after bubblewrap's mounts, which a Landlocked process could not make) and executes the step.
//! See `quorum_worker::executor::landlock`.

fn main() -> std::process::ExitCode {
    quorum_worker::executor::landlock::init_main()
}
