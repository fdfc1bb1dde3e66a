//! Mosquitto for tests: the lab's launcher, with a test's manners (a broker
//! that will not start fails the test with its log).

use std::ops::{Deref, DerefMut};

use steadfast_lab::{Broker, BrokerKind, BrokerOptions};
use tempfile::TempDir;

use crate::mosquitto_program;

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
/// and data directory. Killed on drop. The lab's [`Broker`] does the work
/// (port, url, log, kill9, terminate, set_persistence, is_running).
pub struct Mosquitto {
    broker: Broker,
    /// Its password file or ACL, when it has one.
    _files: Option<TempDir>,
}

impl Mosquitto {
    /// Starts a broker and waits until it accepts connections.
    pub async fn start(opts: MosquittoOptions) -> Mosquitto {
        Self::launch(opts, None).await
    }

    async fn launch(opts: MosquittoOptions, files: Option<TempDir>) -> Mosquitto {
        let opts = BrokerOptions { persistence: opts.persistence, autosave_secs: None, extra: opts.extra };
        let broker = Broker::start(BrokerKind::Mosquitto, opts, None).await.unwrap_or_else(|e| panic!("{e}"));
        Mosquitto { broker, _files: files }
    }

    /// A broker that admits only `user` with `password` (a password file
    /// made with `mosquitto_passwd`).
    pub async fn with_password(user: &str, password: &str) -> Mosquitto {
        let files = tempfile::Builder::new().prefix("steadfast-mosq-pw-").tempdir().expect("temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let passwd = files.path().join("passwd");
        std::fs::write(&passwd, "").expect("write passwd");
        let made = std::process::Command::new(mosquitto_program("mosquitto_passwd"))
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(made.success(), "mosquitto_passwd failed");
        let extra = vec!["allow_anonymous false".into(), format!("password_file {}", passwd.display())];
        Self::launch(MosquittoOptions { persistence: false, extra }, Some(files)).await
    }

    /// A broker without persistence whose ACL holds `rules` (`topic read
    /// a/#`, `topic readwrite b/#`: what every client may do), with the
    /// `extra` configuration lines. [`Self::set_acl`] changes the rules.
    pub async fn with_acl(rules: &str, mut extra: Vec<String>) -> Mosquitto {
        let files = tempfile::Builder::new().prefix("steadfast-mosq-acl-").tempdir().expect("temp dir");
        use std::os::unix::fs::PermissionsExt;
        // Mosquitto may run as another user: it must read the file.
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let acl = files.path().join("acl");
        std::fs::write(&acl, rules).expect("write the ACL");
        std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        extra.push(format!("acl_file {}", acl.display()));
        Self::launch(MosquittoOptions { persistence: false, extra }, Some(files)).await
    }

    /// Replaces the rules of a broker started [`Self::with_acl`] and has it
    /// read them again (SIGHUP).
    pub fn set_acl(&mut self, rules: &str) {
        let files = self._files.as_ref().expect("a broker started with an ACL");
        std::fs::write(files.path().join("acl"), rules).expect("write the ACL");
        self.broker.reload();
    }

    /// A plain broker without persistence.
    pub async fn plain() -> Mosquitto {
        Self::start(MosquittoOptions::default()).await
    }

    /// `kill -9`, then starts again on the same port, with the same data
    /// directory.
    pub async fn restart(&mut self) {
        self.broker.restart().await.unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Deref for Mosquitto {
    type Target = Broker;

    fn deref(&self) -> &Broker {
        &self.broker
    }
}

impl DerefMut for Mosquitto {
    fn deref_mut(&mut self) -> &mut Broker {
        &mut self.broker
    }
}
