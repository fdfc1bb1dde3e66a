//! Consumer groups with a shared inbox on PostgreSQL: `sub --group NAME
//! --inbox postgres://... --sql STATEMENT` members as child processes,
//! against real Mosquitto and a PostgreSQL of the test's own.

use std::io::Write;
use std::process::{Child, Stdio};
use std::time::Duration;

use steadfast_testkit::{free_port, Mosquitto, Postgres};

use crate::{run, scrape, stderr, steadfast};

/// Rows the members wrote, and how many distinct identities among them;
/// `None` while PostgreSQL is down.
async fn written(url: &str) -> Option<(i64, i64)> {
    let (client, conn) = steadfast::tokio_postgres::connect(url, steadfast::tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client.query_one("SELECT count(*), count(DISTINCT (producer, seq)) FROM readings", &[]).await.ok()?;
    Some((row.get(0), row.get(1)))
}

/// Polls [`written`] until `cond` holds of it.
async fn wait_written(url: &str, what: &str, limit: Duration, cond: impl Fn((i64, i64)) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let got = written(url).await;
        if got.is_some_and(&cond) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; written: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One member of the group `line`: its arguments and its process.
struct Member {
    args: Vec<String>,
    state: tempfile::TempDir,
    child: Option<Child>,
}

impl Member {
    fn new(id: &str, brokers: &[String], inbox: &str) -> Member {
        let mut args: Vec<String> = ["sub", "-i", id, "-t", "grp/#", "--group", "line", "--inbox", inbox]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for b in brokers {
            args.extend(["-b".to_owned(), b.clone()]);
        }
        let state = tempfile::tempdir().unwrap();
        Member { args, state, child: None }
    }

    fn command(&self) -> std::process::Command {
        let mut c = steadfast();
        // Each member's own directory (its client id, counters).
        c.env("XDG_STATE_HOME", self.state.path()).args(&self.args);
        c
    }

    /// Creates its session and shared subscription on `broker` alone.
    async fn register_on(&self, broker: &str) {
        let mut c = steadfast();
        let mut args = self.args.clone();
        // Its own brokers dropped: only this one.
        while let Some(i) = args.iter().position(|a| a == "-b") {
            args.drain(i..i + 2);
        }
        c.env("XDG_STATE_HOME", self.state.path()).args(args).args(["-b", broker, "--register"]);
        let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }

    /// Starts it with `--sql STATEMENT`, or printing to a file (`None`).
    fn start(&mut self, sql: Option<&str>) {
        let log = std::fs::File::create(self.state.path().join("stderr")).unwrap();
        let mut c = self.command();
        c.stdin(Stdio::null()).stderr(log);
        match sql {
            Some(sql) => c.args(["--sql", sql]).stdout(Stdio::null()),
            None => c.stdout(std::fs::File::create(self.state.path().join("stdout")).unwrap()),
        };
        self.child = Some(c.spawn().unwrap());
    }

    /// What it printed.
    fn printed(&self) -> Vec<String> {
        let out = std::fs::read_to_string(self.state.path().join("stdout")).unwrap_or_default();
        out.lines().map(str::to_owned).collect()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (by PID), and its exit status.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = std::process::Command::new("kill").args(["-s", "TERM", &c.id().to_string()]).status();
        tokio::task::spawn_blocking(move || c.wait().unwrap()).await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Publishes each line of `lines` on `grp/t` at `broker` as the
/// producer `gw` (`steadfast pub -l`), every one acknowledged.
async fn publish_lines(broker: &str, lines: &str) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").to_str().unwrap().to_owned();
    let args = ["pub", "-b", broker, "-i", "gw", "--outbox", &outbox, "-t", "grp/t", "-l"];
    let mut producer = steadfast().args(args).stdin(Stdio::piped()).spawn().unwrap();
    producer.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || producer.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

const INSERT: &str = "INSERT INTO readings (producer, seq, body, topic) VALUES ($3, $4, $1, $2)";

/// Three members on two brokers in fanout (each broker gives each message
/// to one member, so two members usually get the same message at the same
/// time), 50,000 messages; one member `kill -9`ed twice and restarted,
/// PostgreSQL killed and down for 5 s in the middle. The table the
/// members write with `--sql` ends with exactly one row per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_write_each_message_once_through_member_and_database_crashes() {
    const N: i64 = 50_000;
    let mut pg = Postgres::start().await;
    let url = pg.url();
    pg.connect()
        .await
        .batch_execute("CREATE TABLE readings (producer text, seq bigint, body text, topic text)")
        .await
        .unwrap();
    let (a, b) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let brokers = [a.url(), b.url()];
    let mut members: Vec<Member> = (1..=3).map(|i| Member::new(&format!("m{i}"), &brokers, &url)).collect();
    // Subscribed in opposite orders on the two brokers: each broker
    // gives its copy of a message to another member (round robin), so
    // two members usually hold the same message at the same moment.
    for m in &members {
        m.register_on(&brokers[0]).await;
    }
    for m in members.iter().rev() {
        m.register_on(&brokers[1]).await;
    }
    for m in &mut members {
        m.start(Some(INSERT));
    }

    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").to_str().unwrap().to_owned();
    let args = ["pub", "-b", &a.url(), "-b", &b.url(), "--mode", "fanout", "-i", "gw", "--outbox", &outbox];
    let mut producer = steadfast()
        .args(args)
        .args(["-t", "grp/t", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    tokio::task::spawn_blocking(move || {
        let lines: String = (0..N).map(|i| format!("reading {i}\n")).collect();
        stdin.write_all(lines.as_bytes()).unwrap();
    });

    let limit = Duration::from_secs(120);
    wait_written(&url, "10,000 rows", limit, |(n, _)| n >= 10_000).await;
    members[0].kill9();
    members[0].start(Some(INSERT));
    wait_written(&url, "20,000 rows", limit, |(n, _)| n >= 20_000).await;
    pg.kill9();
    // The database is down for a while: the members hold what they have,
    // unacknowledged; the brokers keep the rest.
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.spawn().await;
    wait_written(&url, "30,000 rows", limit, |(n, _)| n >= 30_000).await;
    members[0].kill9();
    members[0].start(Some(INSERT));
    wait_written(&url, "every message written", Duration::from_secs(180), |(n, _)| n >= N).await;

    let out = tokio::task::spawn_blocking(move || producer.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for m in &mut members {
        let status = m.stop().await;
        assert!(status.success(), "a member ended with {status}: {}", m.log());
    }
    let (rows, distinct) = written(&url).await.unwrap();
    assert_eq!((rows, distinct), (N, N), "rows and distinct identities");
    let db = pg.connect().await;
    let handled: i64 = db
        .query_one(
            // `--sql` counts land in steadfast_counts until a member folds
            // them into steadfast_members.
            "SELECT ((SELECT coalesce(sum(handled), 0) FROM steadfast_members WHERE grp = 'line')
                  + (SELECT coalesce(sum(handled), 0) FROM steadfast_counts WHERE grp = 'line'))::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(handled, N, "the members' handled counts add up to the messages");
    let inbox: i64 = db.query_one("SELECT count(*) FROM steadfast_inbox WHERE grp = 'line'", &[]).await.unwrap().get(0);
    assert_eq!(inbox, N);

    // `status` reads the group from the shared inbox.
    let out = run(&["status", "--inbox", &url, "--group", "line", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["handled"].as_i64(), Some(N), "{j}");
    assert_eq!((j[0]["remembered"].as_i64(), j[0]["claims"].as_i64()), (Some(N), Some(0)), "{j}");
    let names: Vec<&str> = j[0]["members"].as_array().unwrap().iter().map(|m| m["member"].as_str().unwrap()).collect();
    assert_eq!(names, ["m1", "m2", "m3"]);
    assert!(j[0]["duplicates"].as_i64().unwrap() > 0, "fanout copies were removed: {j}");
    let out = run(&["status", "--inbox", &url]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(&format!("group line: {N} handled")), "{text}");
    let out = run(&["status", "--inbox", &url, "--group", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no consumer group `nobody`"), "{}", stderr(&out));
}

/// Members that print (no `--sql`): the copy of a message another member
/// claimed waits until that member handled it, then is dropped as a
/// duplicate. Three members on two brokers in fanout print each of 5,000
/// messages once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printing_members_print_each_message_once_between_them() {
    const N: usize = 5_000;
    let pg = Postgres::start().await;
    let url = pg.url();
    let (a, b) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let brokers = [a.url(), b.url()];
    let mut members: Vec<Member> = (1..=3).map(|i| Member::new(&format!("p{i}"), &brokers, &url)).collect();
    for m in &members {
        m.register_on(&brokers[0]).await;
    }
    for m in members.iter().rev() {
        m.register_on(&brokers[1]).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").to_str().unwrap().to_owned();
    let lines: String = (0..N).map(|i| format!("reading {i}\n")).collect();
    let args = ["pub", "-b", &a.url(), "-b", &b.url(), "--mode", "fanout", "-i", "gw", "--outbox", &outbox];
    let mut producer = steadfast().args(args).args(["-t", "grp/t", "-l"]).stdin(Stdio::piped()).spawn().unwrap();
    producer.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || producer.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    for m in &mut members {
        m.start(None);
    }
    let all = |members: &[Member]| members.iter().flat_map(|m| m.printed()).collect::<Vec<_>>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while all(&members).len() < N {
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = members.iter().map(|m| m.log()).collect();
            panic!("{} of {N} printed; logs: {logs:#?}", all(&members).len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for m in &mut members {
        let status = m.stop().await;
        assert!(status.success(), "a member ended with {status}: {}", m.log());
    }
    let mut printed = all(&members);
    let total = printed.len();
    printed.sort();
    printed.dedup();
    assert_eq!((total, printed.len()), (N, N), "lines printed, distinct");
}

/// A message whose row the database refuses (a CHECK here) stops
/// `--sql` at that message, in order: the messages before it are written
/// (its batch is written again one message at a time), the log names it
/// with PostgreSQL's reason, nothing after it is written, and once the
/// table takes it, it and the rest are written, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_database_refuses_is_named_and_the_ones_before_it_are_written() {
    let pg = Postgres::start().await;
    let db = pg.connect().await;
    db.batch_execute(
        "CREATE TABLE readings (producer text, seq bigint, body text CONSTRAINT no_bad CHECK (body <> 'bad'), topic text)",
    )
    .await
    .unwrap();
    let url = pg.url();
    let broker = Mosquitto::plain().await;
    let mut member = Member::new("m1", &[broker.url()], &url);
    member.register_on(&broker.url()).await;
    let lines: String = (0..11).map(|i| if i == 5 { "bad\n".to_owned() } else { format!("good {i}\n") }).collect();
    publish_lines(&broker.url(), &lines).await;

    member.start(Some(INSERT));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !member.log().contains("the database refuses this message") {
        assert!(tokio::time::Instant::now() < deadline, "no refusal logged: {}", member.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(member.log().contains("no_bad"), "PostgreSQL's reason: {}", member.log());
    // In order: the five before it, none after it.
    wait_written(&url, "the five messages before the refused one", Duration::from_secs(10), |w| w == (5, 5)).await;
    let bodies: Vec<String> =
        db.query("SELECT body FROM readings ORDER BY seq", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, (0..5).map(|i| format!("good {i}")).collect::<Vec<_>>());

    db.batch_execute("ALTER TABLE readings DROP CONSTRAINT no_bad").await.unwrap();
    wait_written(&url, "all 11 once the table takes the refused one", Duration::from_secs(30), |w| w == (11, 11)).await;
    assert!(member.log().contains("--sql: writing again"), "{}", member.log());
    let status = member.stop().await;
    assert!(status.success(), "{status}: {}", member.log());
}

/// The value of the series `name` whose labels include each of `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Scrapes until `cond` holds of the text.
async fn wait_metrics(port: u16, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(port).await.unwrap_or_default();
        if cond(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; metrics: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A member's own metrics: its statements to the shared inbox (claims and
/// records, timed), and whether the shared inbox answers, down while
/// PostgreSQL is and up again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_shows_its_statements_and_whether_the_shared_inbox_answers() {
    let mut pg = Postgres::start().await;
    let url = pg.url();
    let broker = Mosquitto::plain().await;
    let mut member = Member::new("m1", &[broker.url()], &url);
    member.register_on(&broker.url()).await;
    publish_lines(&broker.url(), "a\nb\nc\n").await;

    let port = free_port();
    // Heartbeats every half gap timeout.
    member.args.extend(["--metrics".to_owned(), format!("127.0.0.1:{port}"), "--gap-timeout".into(), "1s".into()]);
    member.start(None);
    let who = ["group=\"line\"", "member=\"m1\""];
    let up = |t: &str| value(t, "steadfast_group_inbox_up", &who);
    let text = wait_metrics(port, "3 claimed and recorded, the inbox up", |t| {
        let n = |s: &str| value(t, "steadfast_group_identities_total", &[who[0], who[1], s]).unwrap_or(0.0);
        n("statement=\"claim\"") >= 3.0 && n("statement=\"record\"") >= 3.0 && up(t) == Some(1.0)
    })
    .await;
    assert!(text.contains("steadfast_group_statement_seconds"), "{text}");
    assert_eq!(member.printed().len(), 3, "{}", member.log());

    pg.kill9();
    wait_metrics(port, "the inbox down", |t| up(t) == Some(0.0)).await;
    pg.spawn().await;
    wait_metrics(port, "the inbox up again", |t| up(t) == Some(1.0)).await;
    let status = member.stop().await;
    assert!(status.success(), "{status}: {}", member.log());
}

/// What `--sql` and `--group` refuse, before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_sql_mistakes_are_named_with_their_fix() {
    let pg = Postgres::start().await;
    pg.connect().await.batch_execute("CREATE TABLE t (body bytea, n integer)").await.unwrap();
    let url = pg.url();
    let state = tempfile::tempdir().unwrap();
    let sub = |extra: &[&str]| {
        let mut a = vec!["sub", "-b", "mqtt://127.0.0.1:9", "-t", "x/#", "-i", "m"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (sub(&["--sql", "INSERT INTO t (body) VALUES ($1)"]), "--inbox postgres://"),
        (sub(&["--inbox", &url, "--sql", "INSERT INTO t (body) VALUES ($1)"]), "--group NAME"),
        (sub(&["--group", "a/b", "--inbox", &url]), "consumer group name `a/b`"),
        (sub(&["--group", "g", "--inbox", &url, "--sql", "INSERT INTO nowhere VALUES ($1)"]), "nowhere"),
        (sub(&["--group", "g", "--inbox", &url, "--sql", "INSERT INTO t (n) VALUES ($1)"]), "$1 (the payload) is int4"),
        (sub(&["--group", "g", "--inbox", &url, "--no-dedup"]), "--no-dedup"),
        (sub(&["--group", "g", "--inbox", &format!("{url}?sslmode=allow")]), "use prefer, require or verify-full"),
        (
            sub(&["--group", "g", "--inbox", &format!("{url}?sslmode=verify-full&sslrootcert=/nowhere/ca.pem")]),
            "/nowhere/ca.pem",
        ),
    ];
    for (args, want) in cases {
        let mut c = steadfast();
        c.env("XDG_STATE_HOME", state.path()).args(&args).stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: wanted `{want}` in: {}", stderr(&out));
    }
}
