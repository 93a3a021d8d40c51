//! The CLI's exit codes and messages for the errors a user meets first: an unsupported argument
//! (exit 2) and, on a machine without a GPU, a GPU command (exit 3), each with a one-line reason.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagedattn")).args(args).output().expect("start the CLI");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_errors_exit_nonzero_with_a_reason() {
    let (code, err) = run(&["run", "--head-size", "7", "--cpu"]);
    assert_eq!(code, Some(2), "unsupported head size: {err}");
    assert!(err.contains("--head-size 7"), "the message names the argument: {err}");
    if pagedattn::Gpu::new(0).is_err() {
        let (code, err) = run(&["verify"]);
        assert_eq!(code, Some(3), "verify without a GPU: {err}");
        assert!(err.contains("without a GPU"), "{err}");
    }
}
