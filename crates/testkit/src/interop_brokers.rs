//! Brokers no one here wrote, started per test on free loopback ports:
//! RabbitMQ with its MQTT and Web MQTT plugins, and NATS with JetStream and
//! its MQTT listener (Debian's `rabbitmq-server` and `nats-server`),
//! amqtt (PyPI, in the virtual environment `scripts/test` makes), and
//! aedes (npm, in the directory `scripts/test` installs it into). Each
//! runs in its own process group and is killed, group and all, on drop.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::free_port;

/// A broker process group with its own directory.
struct Group {
    child: Child,
    _dir: TempDir,
    log: PathBuf,
}

impl Group {
    fn spawn(mut command: Command, dir: TempDir, what: &str) -> Group {
        let log = dir.path().join("out.log");
        let out = std::fs::File::create(&log).expect("broker log");
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e} (the README's test command installs it)"));
        Group { child, _dir: dir, log }
    }

    /// Waits until `port` accepts connections, or panics with the log.
    async fn wait_for(&mut self, port: u16, limit: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return;
            }
            let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited with {status} before listening on {port}:\n{}", log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{what} did not listen on {port} within {limit:?}:\n{}", log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // `--` first: procps-ng 4.0's kill reads `-9 -PGID` as "every
        // process" without it.
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
    }
}

fn program(name: &str, dirs: &[&str]) -> PathBuf {
    dirs.iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("`{name}` not found: the README's test command installs it"))
}

/// RabbitMQ (its MQTT 3.1.1 plugin, and Web MQTT on `/ws`).
pub struct RabbitMq {
    mqtt: u16,
    ws: u16,
    _group: Group,
}

impl RabbitMq {
    /// Starts a node of its own (own name, ports and data) and waits for
    /// its MQTT listener; a node takes several seconds to boot.
    pub async fn start() -> RabbitMq {
        let dir = tempfile::Builder::new().prefix("steadfast-rabbit-").tempdir().expect("temp dir");
        let (amqp, dist, mqtt, ws) = (free_port(), free_port(), free_port(), free_port());
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\nmqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\nweb_mqtt.tcp.ip = 127.0.0.1\nweb_mqtt.tcp.port = {ws}\nmqtt.allow_anonymous = true\nloopback_users = none\n"
        );
        let p = dir.path();
        std::fs::write(p.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
        std::fs::write(p.join("enabled_plugins"), "[rabbitmq_mqtt,rabbitmq_web_mqtt].\n").expect("plugins");
        for d in ["mnesia", "log"] {
            std::fs::create_dir_all(p.join(d)).expect("rabbit dirs");
        }
        let mut c = Command::new(program("rabbitmq-server", &["/usr/lib/rabbitmq/bin", "/usr/sbin"]));
        c.env("HOME", p)
            .env("RABBITMQ_NODENAME", format!("steadfast-{mqtt}@localhost"))
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", p.join("pid"));
        let mut group = Group::spawn(c, dir, "rabbitmq-server");
        group.wait_for(mqtt, Duration::from_secs(90), "RabbitMQ").await;
        group.wait_for(ws, Duration::from_secs(30), "RabbitMQ Web MQTT").await;
        RabbitMq { mqtt, ws, _group: group }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }

    /// `ws://127.0.0.1:PORT/ws` (Web MQTT).
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.ws)
    }
}

/// NATS with JetStream and its MQTT listener.
pub struct Nats {
    mqtt: u16,
    _group: Group,
}

impl Nats {
    /// Starts a server of its own and waits for its MQTT listener.
    pub async fn start() -> Nats {
        let dir = tempfile::Builder::new().prefix("steadfast-nats-").tempdir().expect("temp dir");
        let (client, mqtt) = (free_port(), free_port());
        let conf = format!(
            "listen: 127.0.0.1:{client}\nserver_name: steadfast-{mqtt}\njetstream {{ store_dir: \"{}\" }}\nmqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
            dir.path().join("js").display()
        );
        std::fs::write(dir.path().join("nats.conf"), conf).expect("nats.conf");
        let mut c = Command::new(program("nats-server", &["/usr/sbin", "/usr/bin", "/usr/local/bin"]));
        c.arg("-c").arg(dir.path().join("nats.conf"));
        let mut group = Group::spawn(c, dir, "nats-server");
        group.wait_for(mqtt, Duration::from_secs(30), "NATS").await;
        Nats { mqtt, _group: group }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }
}

/// Where `scripts/test` installs amqtt: a virtual environment of its own
/// (`AMQTT_VENV`, default `~/.cache/steadfast-test/amqtt-venv`).
pub fn amqtt_venv() -> PathBuf {
    match std::env::var_os("AMQTT_VENV") {
        Some(v) => PathBuf::from(v),
        None => test_cache().join("amqtt-venv"),
    }
}

/// Where `scripts/test` installs the npm packages of the interop matrix
/// (aedes, MQTT.js): `NPM_DIR/node_modules`, `NPM_DIR` by default
/// `~/.cache/steadfast-test/npm`.
pub fn node_modules() -> PathBuf {
    match std::env::var_os("NPM_DIR") {
        Some(v) => PathBuf::from(v),
        None => test_cache().join("npm"),
    }
    .join("node_modules")
}

/// `node` running `script` (CommonJS) with [`node_modules`] on its path.
pub fn node(script: &std::path::Path) -> Command {
    let mut c = Command::new(program("node", &["/usr/bin", "/usr/local/bin"]));
    c.arg(script).env("NODE_PATH", node_modules());
    c
}

fn test_cache() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("steadfast-test")
}

/// The broker script: aedes on 127.0.0.1:PORT, which denies, as an ACL
/// would, publishing to `denied/...` (it closes the connection: MQTT 3.1.1
/// has no code to say so) and subscribing to it (SUBACK 0x80). aedes 0.51
/// is the last CommonJS release, and runs on Debian 12's Node.js 18 (1.x
/// is an ES module that needs Node.js 20).
const AEDES_JS: &str = r#"
const { createServer } = require('node:net')
const aedes = require('aedes')()
const denied = (topic) => topic.startsWith('denied/')
aedes.authorizePublish = (client, packet, done) => done(denied(packet.topic) ? new Error('denied') : null)
aedes.authorizeSubscribe = (client, sub, done) => done(null, denied(sub.topic) ? null : sub)
createServer(aedes.handle).listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'))
"#;

/// aedes 0.51 (npm), the Node.js broker: MQTT 3.1.1 only (it refuses an
/// MQTT 5 CONNECT with a 3.1.1 CONNACK, code 1), in memory, with the
/// denied topics of [`AEDES_JS`].
pub struct Aedes {
    port: u16,
    _group: Group,
}

impl Aedes {
    /// Starts a broker of its own and waits for its listener.
    pub async fn start() -> Aedes {
        let dir = tempfile::Builder::new().prefix("steadfast-aedes-").tempdir().expect("temp dir");
        let script = dir.path().join("aedes.js");
        std::fs::write(&script, AEDES_JS).expect("aedes.js");
        let port = free_port();
        let mut c = node(&script);
        c.arg(port.to_string());
        let mut group = Group::spawn(c, dir, "aedes (node)");
        group.wait_for(port, Duration::from_secs(30), "aedes").await;
        Aedes { port, _group: group }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// amqtt 0.12 (PyPI), an MQTT 3.1.1 broker written in Python: it leaves an
/// MQTT 5 CONNECT unanswered rather than refusing it.
pub struct Amqtt {
    port: u16,
    _group: Group,
}

impl Amqtt {
    /// Starts a broker of its own (anonymous clients allowed) and waits
    /// for its listener.
    pub async fn start() -> Amqtt {
        let dir = tempfile::Builder::new().prefix("steadfast-amqtt-").tempdir().expect("temp dir");
        let port = free_port();
        let conf = format!(
            "listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        );
        std::fs::write(dir.path().join("amqtt.yaml"), conf).expect("amqtt.yaml");
        let bin = amqtt_venv().join("bin");
        let mut c = Command::new(program("amqtt", &[bin.to_str().expect("a UTF-8 path")]));
        c.arg("-c").arg(dir.path().join("amqtt.yaml"));
        let mut group = Group::spawn(c, dir, "amqtt");
        group.wait_for(port, Duration::from_secs(60), "amqtt").await;
        Amqtt { port, _group: group }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}
