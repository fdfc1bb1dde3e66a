use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, mosquitto_program};

/// How to configure a test broker.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// `persistence true`: sessions and queued messages survive a SIGTERM
    /// restart (Mosquitto writes its store on exit).
    pub persistence: bool,
    /// Extra `mosquitto.conf` lines for the listener's section.
    pub extra: Vec<String>,
}

/// A Mosquitto process on a free loopback port, with its own temp config
/// and data directory. Killed on drop.
pub struct Mosquitto {
    port: u16,
    dir: TempDir,
    opts: MosquittoOptions,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker and waits until it accepts connections.
    pub async fn start(opts: MosquittoOptions) -> Mosquitto {
        let dir = tempfile::Builder::new().prefix("steadfast-mosq-").tempdir().expect("temp dir");
        let mut m = Mosquitto { port: free_port(), dir, opts, child: None };
        m.spawn().await;
        m
    }

    /// A broker that admits only `user` with `password` (a password file
    /// made with `mosquitto_passwd`).
    pub async fn with_password(user: &str, password: &str) -> Mosquitto {
        let dir = tempfile::Builder::new().prefix("steadfast-mosq-").tempdir().expect("temp dir");
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "").expect("write passwd");
        let made = Command::new(mosquitto_program("mosquitto_passwd"))
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(made.success(), "mosquitto_passwd failed");
        let extra = vec!["allow_anonymous false".into(), format!("password_file {}", passwd.display())];
        let mut m =
            Mosquitto { port: free_port(), dir, opts: MosquittoOptions { persistence: false, extra }, child: None };
        m.spawn().await;
        m
    }

    /// A plain broker without persistence.
    pub async fn plain() -> Mosquitto {
        Self::start(MosquittoOptions::default()).await
    }

    /// The port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn write_config(&self) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        // Started as root, Mosquitto drops to the `mosquitto` user: it must
        // still be able to write its persistence file and its log here.
        use std::os::unix::fs::PermissionsExt;
        for d in [self.dir.path(), data.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).expect("chmod test broker dir");
        }
        let mut conf = vec![
            "per_listener_settings false".to_owned(),
            format!("listener {} 127.0.0.1", self.port),
            "allow_anonymous true".into(),
            format!("persistence {}", self.opts.persistence),
            format!("persistence_location {}/", data.display()),
            "max_queued_messages 0".into(),
            format!("log_dest file {}", self.dir.path().join("mosquitto.log").display()),
            "log_type error".into(),
            "log_type warning".into(),
            "log_type notice".into(),
            "log_type information".into(),
        ];
        conf.extend(self.opts.extra.iter().cloned());
        std::fs::write(self.config_path(), conf.join("\n") + "\n").expect("write mosquitto.conf");
    }

    async fn spawn(&mut self) {
        self.write_config();
        let child = Command::new(mosquitto_program("mosquitto"))
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mosquitto exited with {status} before listening on {}:\n{}", self.port, self.log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!("mosquitto did not listen on {} within 10 s:\n{}", self.port, self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no chance to save anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: Mosquitto saves its persistence file on the way out.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, with the same data directory.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Changes persistence for the next (re)start.
    pub fn set_persistence(&mut self, on: bool) {
        self.opts.persistence = on;
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill9();
    }
}
