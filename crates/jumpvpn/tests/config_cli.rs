//! The binary's side of configuration errors (SPEC §9): exit 2 before anything starts, one
//! `jumpvpn: …` line naming the file and the key.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_jumpvpn");

#[test]
fn gateway_and_client_refuse_a_bad_configuration_with_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gateway = dir.path().join("gw.toml");
    std::fs::write(
        &gateway,
        "node_id = \"gw1\"\nlisten_udp = \"0.0.0.0:51820\"\nbogus = 1\n",
    )
    .expect("write");
    let client = dir.path().join("cl.toml");
    std::fs::write(&client, "candidates = [\"carrier-pigeon://x\"]\n").expect("write");
    for (command, path, key) in [
        ("gateway", &gateway, "bogus"),
        ("client", &client, "private_key_file"),
    ] {
        let out = Command::new(EXE)
            .arg(command)
            .arg("--config")
            .arg(path)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.starts_with("jumpvpn: "), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "one line, nothing started: {stderr}"
        );
    }
}
