//! A PostgreSQL server of the lab's own (the tests' and the benchmarks'):
//! `initdb` into a temporary directory, `postgres` on a free loopback port
//! with its socket in that directory, run as the unprivileged `postgres`
//! user when this runs as root (PostgreSQL refuses root). Never the
//! machine's own server. It runs in a process group of its own, killed
//! with `kill -s KILL -- -PGID` (the postmaster and every backend at once:
//! a crash).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::LabError;

/// One PostgreSQL server; killed when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The unprivileged user it runs as (uid, gid), when this runs as root.
    user: Option<(u32, u32)>,
    /// Clients must use TLS ([`Postgres::start_tls`]).
    tls: bool,
}

/// Where Debian's PostgreSQL programs are (`initdb`, `postgres`): the
/// newest `/usr/lib/postgresql/N/bin`, else the PATH.
fn program(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.iter().rev().map(|d| d.join(name)).find(|p| p.exists()).unwrap_or_else(|| PathBuf::from(name))
}

/// True when PostgreSQL can be run here.
pub fn have_postgres() -> bool {
    Command::new(program("postgres")).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// The `postgres` user's uid and gid, when this process runs as root.
fn unprivileged() -> Result<Option<(u32, u32)>, LabError> {
    // The owner of /proc/self is this process's effective user.
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !root {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(LabError::io("/etc/passwd"))?;
    let fields: Option<Vec<&str>> = passwd.lines().find(|l| l.starts_with("postgres:")).map(|l| l.split(':').collect());
    let ids = fields.and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)));
    ids.map(Some).ok_or(LabError::NoPostgresUser)
}

fn failed(what: &'static str, detail: impl Into<String>) -> LabError {
    LabError::Postgres { what, detail: detail.into() }
}

impl Postgres {
    /// A fresh cluster, started and accepting connections.
    pub async fn start() -> Result<Postgres, LabError> {
        let mut pg = Postgres::init().await?;
        pg.spawn().await?;
        Ok(pg)
    }

    /// A fresh cluster that accepts TCP clients over TLS only, presenting
    /// the certificate `cert` with its key `key` (PEM); with `client_ca`,
    /// clients must present a certificate signed by that CA.
    pub async fn start_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Postgres, LabError> {
        let mut pg = Postgres::init().await?;
        let data = pg.dir.path().join("data");
        // PostgreSQL reads its key only if the server's user alone can.
        for (from, to) in
            [(cert, "server.crt"), (key, "server.key")].into_iter().chain(client_ca.map(|c| (c, "ca.crt")))
        {
            let to = data.join(to);
            std::fs::copy(from, &to).map_err(LabError::io(from))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).map_err(LabError::io(&to))?;
            if let Some((uid, gid)) = pg.user {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(LabError::io(&to))?;
            }
        }
        let mut conf = "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".to_owned();
        let mut ssl_line = "hostssl all all 127.0.0.1/32 trust".to_owned();
        if client_ca.is_some() {
            conf.push_str("ssl_ca_file = 'ca.crt'\n");
            ssl_line.push_str(" clientcert=verify-ca");
        }
        let append = |name: &str, text: &str| {
            use std::io::Write;
            let path = data.join(name);
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).map_err(LabError::io(&path))?;
            f.write_all(text.as_bytes()).map_err(LabError::io(&path))
        };
        append("postgresql.conf", &conf)?;
        // The readiness probe (plain) asks for template1; every other
        // database wants TLS.
        let hba = format!("local all all trust\nhostnossl template1 all 127.0.0.1/32 trust\n{ssl_line}\n");
        let hba_path = data.join("pg_hba.conf");
        std::fs::write(&hba_path, hba).map_err(LabError::io(&hba_path))?;
        pg.tls = true;
        pg.spawn().await?;
        Ok(pg)
    }

    /// A fresh cluster (`initdb`), not started.
    async fn init() -> Result<Postgres, LabError> {
        if !have_postgres() {
            return Err(LabError::NoPostgres);
        }
        let dir = tempfile::Builder::new()
            .prefix("steadfast-pg-")
            .tempdir()
            .map_err(LabError::io("a temporary directory"))?;
        let user = unprivileged()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(LabError::io(dir.path()))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(program("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", "steadfast", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        initdb.stdout(Stdio::null());
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().map_err(|source| LabError::Spawn { what: "initdb".into(), source })?;
        if !out.status.success() {
            return Err(failed("initdb", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Postgres { dir, port: crate::free_port()?, child: None, user, tls: false })
    }

    /// The URL clients connect with (user `steadfast`, database
    /// `postgres`, no password: trust on loopback only).
    pub fn url(&self) -> String {
        format!("postgres://steadfast@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server (again, after [`Postgres::kill9`]) and waits until
    /// it accepts connections.
    pub async fn spawn(&mut self) -> Result<(), LabError> {
        let data = self.dir.path().join("data");
        let log_path = self.log_path();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(LabError::io(&log_path))?;
        let log2 = log.try_clone().map_err(LabError::io(&log_path))?;
        let mut c = Command::new(program("postgres"));
        c.arg("-D").arg(&data).arg("-p").arg(self.port.to_string());
        c.arg("-c").arg("listen_addresses=127.0.0.1");
        c.arg("-c").arg(format!("unix_socket_directories={}", self.dir.path().display()));
        c.args(["-c", "max_connections=40", "-c", "shared_buffers=16MB"]);
        c.stdin(Stdio::null()).stdout(log2).stderr(log);
        c.process_group(0);
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        self.child = Some(c.spawn().map_err(|source| LabError::Spawn { what: "postgres".into(), source })?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), LabError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // Accepting TCP is not enough: the server answers "starting
            // up" until its recovery ends. A startup packet tells.
            if self.accepts().await {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(failed("postgres", format!("exited with {status} on port {}: {}", self.port, self.log())));
            }
            if tokio::time::Instant::now() > deadline {
                self.kill9();
                let why = format!("no connection accepted on port {} within 30 s: {}", self.port, self.log());
                return Err(failed("postgres", why));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True when the server completes a startup (psql's `pg_isready`
    /// would need the client package).
    async fn accepts(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        // StartupMessage: protocol 3.0, user steadfast, database postgres
        // (template1 when others want TLS).
        let mut body = Vec::new();
        body.extend_from_slice(&196608u32.to_be_bytes());
        let db = if self.tls { "template1" } else { "postgres" };
        for kv in ["user", "steadfast", "database", db, ""] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        if s.write_all(&msg).await.is_err() {
            return false;
        }
        let mut first = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut first)).await;
        // 'R' (authentication: trust says OK) means it is ready; 'E' is
        // an error such as "the database system is starting up".
        matches!(read, Ok(Ok(_)) if first[0] == b'R')
    }

    /// Kills the server and every backend at once (`kill -9` of its
    /// process group): a crash; committed transactions survive it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = format!("-{}", c.id());
            let _ = Command::new("kill").args(["-s", "KILL", "--", &group]).status();
            let _ = c.wait();
        }
    }

    /// True while the server runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The directory the cluster lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill9();
    }
}
