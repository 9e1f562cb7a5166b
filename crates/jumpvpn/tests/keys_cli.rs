//! `jumpvpn genkey` and `jumpvpn pubkey` (SPEC §9), run as a user would.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

fn jumpvpn(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run jumpvpn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

#[test]
fn pubkey_matches_the_rfc_7748_test_vectors() {
    // RFC 7748 §6.1: Alice's and Bob's X25519 key pairs, in base64.
    let pairs = [
        (
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=",
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
        ),
        (
            "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os=",
            "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=",
        ),
    ];
    for (private, public) in pairs {
        let out = jumpvpn(&["pubkey"], &format!("{private}\n"));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out), format!("{public}\n"));
    }
}

#[test]
fn genkey_prints_a_fresh_clamped_key_that_pubkey_accepts() {
    let first = jumpvpn(&["genkey"], "");
    let second = jumpvpn(&["genkey"], "");
    assert!(first.status.success() && second.status.success());
    let key = stdout(&first);
    assert_eq!(key.len(), 45, "44 base64 characters and a newline: {key:?}");
    assert_ne!(key, stdout(&second), "two keys alike");
    let bytes = BASE64.decode(key.trim()).expect("base64");
    assert_eq!(bytes.len(), 32);
    assert_eq!(bytes[0] & 7, 0, "clamped low bits");
    assert_eq!(bytes[31] & 0xC0, 0x40, "clamped high bits");
    let public = jumpvpn(&["pubkey"], &key);
    assert!(public.status.success());
    assert_eq!(
        BASE64.decode(stdout(&public).trim()).expect("base64").len(),
        32
    );
}

#[test]
fn pubkey_refuses_what_is_not_a_key_without_echoing_it() {
    for bad in [
        "",
        "not a key",
        "c2VjcmV0LXNob3J0Cg==",
        "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCoA",
    ] {
        let out = jumpvpn(&["pubkey"], bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("jumpvpn: invalid private key"), "{err}");
        if !bad.is_empty() {
            assert!(!err.contains(bad), "the input is echoed: {err}");
        }
    }
}
