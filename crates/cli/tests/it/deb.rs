//! The Debian package (issue 21): built from the repository by
//! `scripts/package-deb`, installed into this machine with `dpkg -i` (the
//! suite runs as root), checked (`--version`, the example configuration,
//! `systemd-analyze verify` on the unit), and removed.

use std::path::Path;
use std::process::{Command, Output};

fn ok(what: &str, o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what} failed: {text}{}", String::from_utf8_lossy(&o.stderr));
    text
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

#[test]
fn the_deb_installs_the_command_the_bridge_unit_and_an_example_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let built = Command::new("bash")
        .arg(root.join("scripts/package-deb"))
        .arg(env!("CARGO_BIN_EXE_steadfast"))
        // The test binary is large and unstripped: no compression here.
        .env("DEB_COMPRESSION", "none")
        .output()
        .expect("run scripts/package-deb");
    let deb = root.join(ok("scripts/package-deb", &built).trim());
    let deb = deb.to_str().unwrap();
    let contents = ok("dpkg-deb --contents", &run("dpkg-deb", &["--contents", deb]));
    for path in [
        "./usr/bin/steadfast",
        "./lib/systemd/system/steadfast-bridge.service",
        "./usr/share/doc/steadfast/examples/bridge.toml",
    ] {
        assert!(contents.contains(path), "{path} in the package: {contents}");
    }
    let fields = ok("dpkg-deb --field", &run("dpkg-deb", &["--field", deb, "Package", "Version"]));
    assert!(fields.contains("Package: steadfast") && fields.contains(env!("CARGO_PKG_VERSION")), "{fields}");

    let uid = ok("id -u", &run("id", &["-u"]));
    assert_eq!(uid.trim(), "0", "installing the package needs root (the test command runs as root)");
    ok("dpkg -i", &run("dpkg", &["-i", deb]));
    let checked = std::panic::catch_unwind(|| {
        let version = ok("steadfast --version", &run("/usr/bin/steadfast", &["--version"]));
        assert_eq!(version.trim(), format!("steadfast {}", env!("CARGO_PKG_VERSION")));
        let example = "/usr/share/doc/steadfast/examples/bridge.toml";
        let check = ok("bridge --check", &run("/usr/bin/steadfast", &["bridge", "--check", "--config", example]));
        assert!(check.contains("route(s), ok"), "{check}");
        let unit = std::fs::read_to_string("/lib/systemd/system/steadfast-bridge.service").unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/steadfast bridge"), "{unit}");
        if Path::new("/usr/bin/systemd-analyze").exists() {
            ok(
                "systemd-analyze verify",
                &run("systemd-analyze", &["verify", "/lib/systemd/system/steadfast-bridge.service"]),
            );
        }
    });
    ok("dpkg -r", &run("dpkg", &["-r", "steadfast"]));
    assert!(!Path::new("/usr/bin/steadfast").exists(), "removed");
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}
