//! One broker launcher for the demo, the chaos harness, the benchmarks and
//! the tests: Debian's Mosquitto or the embedded rumqttd, each in its own
//! process on a free loopback port (so it can be `kill -9`ed), with its own
//! directory for its configuration, log and persistence file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::LabError;

/// Which broker.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BrokerKind {
    /// rumqttd, built into the `steadfast` binary and run as `steadfast
    /// broker --port P`: sessions in memory only, a restart forgets them.
    Embedded,
    /// Debian's Mosquitto.
    Mosquitto,
}

impl BrokerKind {
    /// `embedded`, `mosquitto` or `auto` (embedded when built in, else
    /// Mosquitto), as `--brokers` spells them; checked against what this
    /// build and this machine have.
    pub fn parse(brokers: &str) -> Result<BrokerKind, LabError> {
        match brokers {
            "auto" if cfg!(feature = "embedded-broker") => Ok(BrokerKind::Embedded),
            "auto" if have_mosquitto() => Ok(BrokerKind::Mosquitto),
            "auto" => Err(LabError::NoBrokers),
            "embedded" if cfg!(feature = "embedded-broker") => Ok(BrokerKind::Embedded),
            "embedded" => Err(LabError::NoEmbeddedBroker),
            "mosquitto" if have_mosquitto() => Ok(BrokerKind::Mosquitto),
            "mosquitto" => Err(LabError::NoMosquitto),
            other => Err(LabError::UnknownBrokers(other.to_owned())),
        }
    }

    /// How the kind is named in messages.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::Mosquitto => "Mosquitto",
        }
    }
}

/// How to configure a broker (Mosquitto; the embedded one has no options).
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// `persistence true`: sessions and queued messages survive a SIGTERM
    /// restart (Mosquitto writes its store on exit) and, up to the last
    /// autosave, a `kill -9`.
    pub persistence: bool,
    /// `autosave_interval` in seconds (Mosquitto's default: 1,800).
    pub autosave_secs: Option<u32>,
    /// Extra `mosquitto.conf` lines.
    pub extra: Vec<String>,
}

/// A broker process on a free loopback port. Killed when dropped.
pub struct Broker {
    kind: BrokerKind,
    port: u16,
    dir: TempDir,
    opts: BrokerOptions,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker in a new directory under `root` (the system's temp
    /// directory when `None`) and waits until it accepts connections.
    pub async fn start(kind: BrokerKind, opts: BrokerOptions, root: Option<&Path>) -> Result<Broker, LabError> {
        let port = free_port()?;
        let base = root.map_or_else(std::env::temp_dir, Path::to_owned);
        let dir =
            tempfile::Builder::new().prefix("steadfast-broker-").tempdir_in(&base).map_err(LabError::io(&base))?;
        // Started as root, Mosquitto drops to its own user: it must still
        // be able to write its log and persistence file here.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777));
        let mut b = Broker { kind, port, dir, opts, child: None };
        b.spawn().await?;
        Ok(b)
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id while it runs (for measuring its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Its directory (configuration, log, persistence file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log so far (Mosquitto; empty for the embedded one).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Persistence on or off from the next start (Mosquitto; the embedded
    /// broker never keeps anything).
    pub fn set_persistence(&mut self, on: bool) {
        self.opts.persistence = on;
    }

    /// `kill -9` and reap: no chance to save anything.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// SIGTERM and wait: Mosquitto saves its persistence file on the way out.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-s").arg("TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// SIGHUP: Mosquitto reads its configuration again, its ACL and
    /// password files included (the log says "Reloading config").
    pub fn reload(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-s").arg("HUP").arg(c.id().to_string()).status();
        }
    }

    /// `kill -9`, then starts again on the same port and directory.
    pub async fn restart(&mut self) -> Result<(), LabError> {
        self.kill9();
        self.spawn().await
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Starts the process (after a kill) and waits until it listens.
    pub async fn spawn(&mut self) -> Result<(), LabError> {
        let mut command = match self.kind {
            BrokerKind::Mosquitto => {
                let conf = self.write_config()?;
                let mut c = Command::new(mosquitto_program("mosquitto"));
                c.arg("-c").arg(conf);
                c
            }
            BrokerKind::Embedded => {
                let mut c = Command::new(crate::children::current_exe()?);
                c.args(["broker", "--port", &self.port.to_string(), "--protocol-version", "5"]);
                c
            }
        };
        let what = format!("the {} broker", self.kind.name());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn { what, source })?;
        self.child = Some(child);
        self.wait_listening().await
    }

    async fn wait_listening(&mut self) -> Result<(), LabError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (kind, port) = (self.kind.name(), self.port);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(LabError::Exited { kind, port, status, log: self.log() });
            }
            if tokio::time::Instant::now() > deadline {
                self.kill9();
                return Err(LabError::NotListening { kind, port, log: self.log() });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn write_config(&self) -> Result<PathBuf, LabError> {
        let dir = self.dir.path();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(LabError::io(&data))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777));
        if !self.opts.persistence {
            // Started without persistence: nothing from an earlier start.
            let _ = std::fs::remove_file(data.join("mosquitto.db"));
        }
        let mut conf = vec![
            "per_listener_settings false".to_owned(),
            format!("listener {} 127.0.0.1", self.port),
            "allow_anonymous true".into(),
            format!("persistence {}", self.opts.persistence),
            format!("persistence_location {}/", data.display()),
            "max_queued_messages 0".into(),
            format!("log_dest file {}", dir.join("mosquitto.log").display()),
        ];
        conf.extend(["error", "warning", "notice", "information"].map(|t| format!("log_type {t}")));
        if let Some(secs) = self.opts.autosave_secs {
            conf.push(format!("autosave_interval {secs}"));
        }
        conf.extend(self.opts.extra.iter().cloned());
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf.join("\n") + "\n").map_err(LabError::io(&path))?;
        Ok(path)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `kill -9` and reap a child, if there is one.
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16, LabError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(LabError::NoPort)?;
    Ok(l.local_addr().map_err(LabError::NoPort)?.port())
}

/// Path of a program from Debian's `mosquitto` packages (`mosquitto`,
/// `mosquitto_passwd`, `mosquitto_pub`...), wherever it is installed; the
/// bare name (looked up on the PATH) when none is found.
pub fn mosquitto_program(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// True when Mosquitto can be run here.
pub fn have_mosquitto() -> bool {
    Command::new(mosquitto_program("mosquitto")).arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}
