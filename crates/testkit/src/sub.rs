//! A recording subscriber: a real `mosquitto_sub` process whose every
//! printed payload a test can wait for and read.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{mosquitto_program, wait_until};

/// A real `mosquitto_sub` process; records every payload it prints.
pub struct Subscriber {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    subscribed: Arc<Mutex<u32>>,
}

impl Subscriber {
    /// Subscribes to `topic` at `qos` on 127.0.0.1:`port`. With
    /// `session = Some(id)`, uses a persistent session (`-c -i id`) so the
    /// broker queues for it while it is away. Returns once SUBACK arrived.
    /// A `mosquitto_sub` that ends before its SUBACK (the listener was
    /// not accepting yet: it does not retry) is started again, for up to
    /// 30 s.
    pub async fn start(port: u16, topic: &str, qos: u8, session: Option<&str>) -> Subscriber {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut sub = Self::spawn(port, topic, qos, session);
            loop {
                if *sub.subscribed.lock().unwrap() > 0 {
                    return sub;
                }
                if sub.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("timed out after 30s waiting for: mosquitto_sub SUBACK on port {port}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn spawn(port: u16, topic: &str, qos: u8, session: Option<&str>) -> Subscriber {
        // Line-buffered stdout: mosquitto_sub writes through stdio, which
        // would hold lines back in a pipe.
        let mut cmd = Command::new("stdbuf");
        cmd.arg("-oL").arg(mosquitto_program("mosquitto_sub"));
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", &qos.to_string(), "-d"]);
        if let Some(id) = session {
            cmd.args(["-c", "-i", id]);
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().expect("spawn mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(0));
        let (l, s) = (lines.clone(), subscribed.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("Client ") {
                    if line.contains("received SUBACK") {
                        *s.lock().unwrap() += 1;
                    }
                    continue;
                }
                if line.starts_with("Subscribed (mid") {
                    continue;
                }
                l.lock().unwrap().push(line);
            }
        });
        Subscriber { child, lines, subscribed }
    }

    /// Payloads received so far, one per line, in arrival order.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// How many payloads arrived.
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits until `n` payloads arrived.
    pub async fn wait_count(&self, n: usize, limit: Duration) {
        let l = self.lines.clone();
        wait_until(&format!("{n} messages at the subscriber"), limit, || l.lock().unwrap().len() >= n).await;
    }

    /// Waits until every payload in `want` arrived at least once; on
    /// time-out, says how many and which are missing.
    pub async fn wait_all(&self, want: &[String], limit: Duration) {
        let r = tokio::time::timeout(limit, self.wait_all_inner(want)).await;
        if r.is_err() {
            let got = self.lines();
            let have: std::collections::HashSet<&String> = got.iter().collect();
            let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
            panic!(
                "after {limit:?}, {} of {} messages missing at the subscriber (received {} lines); first missing: {:?}; last missing: {:?}",
                missing.len(),
                want.len(),
                got.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                missing.iter().rev().take(3).collect::<Vec<_>>()
            );
        }
    }

    async fn wait_all_inner(&self, want: &[String]) {
        let limit = Duration::from_secs(24 * 3600);
        let l = self.lines.clone();
        let want: std::collections::HashSet<String> = want.iter().cloned().collect();
        let what = format!("{} distinct messages at the subscriber", want.len());
        wait_until(&what, limit, || {
            let got = l.lock().unwrap();
            let have: std::collections::HashSet<&String> = got.iter().collect();
            want.iter().all(|w| have.contains(w))
        })
        .await;
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
