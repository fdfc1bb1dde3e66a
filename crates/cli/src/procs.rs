//! Child processes for `steadfast demo` and `steadfast chaos`: brokers
//! (embedded rumqttd or Mosquitto) that can be `kill -9`ed, the consumer
//! (`steadfast sub` with an inbox) and what it printed, a private temp dir.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::Failure;

/// Which brokers the demo runs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    /// `steadfast broker`: rumqttd built in, sessions in memory.
    Embedded,
    /// Debian's Mosquitto, with persistence.
    Mosquitto,
}

/// A broker process on a free loopback port.
pub struct Broker {
    kind: Kind,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Mosquitto: persistence on at the next start.
    persistence: bool,
}

impl Broker {
    pub fn start(kind: Kind, name: &'static str, root: &Path) -> Result<Broker, Failure> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Failure::other(anyhow!("no free port: {e}")))?
            .port();
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Failure::other(anyhow!("{}: {e}", dir.display())))?;
        // Started as root, Mosquitto drops to its own user: it must still
        // be able to write its persistence file here.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        let mut b = Broker { kind, port, dir, child: None, persistence: true };
        b.spawn()?;
        Ok(b)
    }

    /// Mosquitto: persistence (saved every second) on or off from the next
    /// start. The embedded broker never keeps anything.
    pub fn set_persistence(&mut self, on: bool) {
        self.persistence = on;
    }

    pub fn spawn(&mut self) -> Result<(), Failure> {
        if !self.persistence {
            // Started without persistence: nothing from an earlier run.
            let _ = std::fs::remove_file(self.dir.join("mosquitto.db"));
        }
        let conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence {}\nautosave_interval 1\npersistence_location {}/\nmax_queued_messages 0\nlog_dest file {}/log\n",
            self.port,
            self.persistence,
            self.dir.display(),
            self.dir.display()
        );
        std::fs::write(self.dir.join("mosquitto.conf"), conf).map_err(|e| Failure::other(anyhow!(e)))?;
        let mut command = match self.kind {
            Kind::Mosquitto => {
                let mut c = Command::new(mosquitto());
                c.arg("-c").arg(self.dir.join("mosquitto.conf"));
                c
            }
            Kind::Embedded => {
                let mut c = Command::new(std::env::current_exe().map_err(|e| Failure::other(anyhow!(e)))?);
                c.args(["broker", "--port", &self.port.to_string(), "--protocol-version", "5"]);
                c
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failure::other(anyhow!("cannot start the {} broker: {e}", self.kind.name())))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(Failure::other(anyhow!(
                    "the {} broker did not listen on {} within 10 s",
                    self.kind.name(),
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Mosquitto => "Mosquitto",
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `--brokers embedded|mosquitto`.
pub fn broker_kind(brokers: &str) -> Result<Kind, Failure> {
    Ok(match brokers {
        "embedded" if cfg!(feature = "embedded-broker") => Kind::Embedded,
        "embedded" => {
            return Err(Failure::usage(anyhow!(
                "--brokers embedded: this steadfast was built without the `embedded-broker` feature; use --brokers mosquitto"
            )))
        }
        "mosquitto" if have_mosquitto() => Kind::Mosquitto,
        "mosquitto" => {
            return Err(Failure::usage(anyhow!(
                "--brokers mosquitto: Mosquitto is not installed (Debian's `mosquitto` package); or use --brokers embedded"
            )))
        }
        other => return Err(Failure::usage(anyhow!("--brokers {other}: use `embedded` or `mosquitto`"))),
    })
}

/// `kill -9` and reap.
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub fn mosquitto() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

pub fn have_mosquitto() -> bool {
    Command::new(mosquitto()).arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// The consumer: `steadfast sub` with an inbox on both brokers, printing
/// each message's identity (flushed before its acknowledgement).
pub struct Consumer {
    pub args: Vec<String>,
    pub out: PathBuf,
    pub child: Option<Child>,
}

impl Consumer {
    pub fn start(&mut self) -> Result<(), Failure> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .map_err(|e| Failure::other(anyhow!("{}: {e}", self.out.display())))?;
        let exe = std::env::current_exe().map_err(|e| Failure::other(anyhow!(e)))?;
        let child = Command::new(exe)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failure::other(anyhow!("cannot start the consumer: {e}")))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the consumer printed: identity -> times.
pub fn handled(out: &Path) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        if line.contains('/') {
            *m.entry(line.to_owned()).or_default() += 1;
        }
    }
    m
}

/// Copies the consumer's inbox removed (its counter, kept on disk).
pub fn duplicates_removed(inbox: &Path) -> u64 {
    let Ok(mut store) = steadfast_store::SqliteStore::open_read_only(inbox) else { return 0 };
    let counters = steadfast_store::Store::counters(&mut store).unwrap_or_default();
    counters.iter().filter(|(k, _)| k.contains("duplicates")).map(|(_, v)| *v).sum()
}

/// A private temporary directory, removed at the end.
pub fn tempfile_dir(what: &str) -> Result<TempDir, Failure> {
    let base = std::env::temp_dir().join(format!("steadfast-{what}-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&base).map_err(|e| Failure::other(anyhow!("{}: {e}", base.display())))?;
    Ok(TempDir(base))
}

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
