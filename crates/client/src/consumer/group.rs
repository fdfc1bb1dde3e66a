//! A consumer group's shared inbox on PostgreSQL (docs/design.md,
//! "Consumer groups"). Every member of the group records the identities
//! it handled in one table, keyed by (group, producer, sequence number).
//! Before a member hands a delivery over it claims the identity there (a
//! row with a lease): a copy that any member handled is acknowledged
//! without being handed over again, and a copy another member holds a
//! claim on waits until that member handled it (a duplicate then) or its
//! claim expired (it crashed: handed over here).
//!
//! A delivery can also be recorded inside the application's own
//! transaction ([`super::Received::record_in`]): the record and the
//! application's writes then commit or roll back together, and a copy
//! that another member is recording at the same moment waits on the
//! table's unique key, then counts as a duplicate (exactly-once effects).
//!
//! Without the `postgres` feature the type is uninhabited: a consumer
//! asking for a shared inbox fails its configuration check instead.

use std::time::Duration;

use steadfast_core::engine::Answer;

use crate::error::ConfigError;

/// Why the shared inbox could not answer (PostgreSQL unreachable, a
/// query refused): the dispatcher logs it and tries again.
#[derive(Debug, Clone)]
pub(crate) struct GroupError(String);

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a group member's shared inbox did in this process: the cost of
/// the group, stage by stage (`steadfast bench group` prints it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedInboxStats {
    /// Statements sent (each one round trip; connecting not counted).
    pub round_trips: u64,
    /// Claims: before a delivery is handed over.
    pub claims: StatementStats,
    /// Records: after the application's ack, before the broker's.
    pub records: StatementStats,
}

/// One kind of statement's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatementStats {
    /// Statements that completed (answered, refused or failed).
    pub statements: u64,
    /// Identities they carried.
    pub identities: u64,
    /// Time from sending each to its answer, summed.
    pub time: Duration,
}

impl StatementStats {
    /// The mean time of one statement.
    pub fn mean_time(&self) -> Duration {
        Duration::from_secs_f64(self.time.as_secs_f64() / self.statements.max(1) as f64)
    }
    /// The mean identities per statement.
    pub fn mean_identities(&self) -> f64 {
        self.identities as f64 / self.statements.max(1) as f64
    }
    /// Adds another's figures.
    pub fn add(&mut self, other: &StatementStats) {
        self.statements += other.statements;
        self.identities += other.identities;
        self.time += other.time;
    }
}

impl SharedInboxStats {
    /// Adds another member's figures.
    pub fn add(&mut self, other: &SharedInboxStats) {
        self.round_trips += other.round_trips;
        self.claims.add(&other.claims);
        self.records.add(&other.records);
    }
}

#[cfg(not(feature = "postgres"))]
mod imp {
    use super::*;

    /// Checks a shared inbox URL: without PostgreSQL support, none is
    /// usable.
    pub(crate) fn check_url(_url: &str) -> Result<(), ConfigError> {
        Err(ConfigError::NoPostgres)
    }

    /// Never built without the `postgres` feature.
    #[derive(Debug)]
    pub enum GroupInbox {}

    impl GroupInbox {
        pub(crate) fn new(_url: &str, _group: &str, _member: &str, _claim: Duration) -> Result<Self, ConfigError> {
            Err(ConfigError::NoPostgres)
        }
        pub(crate) async fn claim(&self, _ids: &[(String, u64)]) -> Result<Vec<Answer>, GroupError> {
            match *self {}
        }
        pub(crate) async fn record(&self, _ids: &[(String, u64)]) -> Result<(), GroupError> {
            match *self {}
        }
        pub(crate) async fn renew(&self, _ids: &[(String, u64)]) -> Result<u64, GroupError> {
            match *self {}
        }
        pub(crate) async fn prune(&self, _max_age: Duration, _keep: u64) -> Result<u64, GroupError> {
            match *self {}
        }
        pub(crate) fn note_duplicates(&self, _n: u64) {
            match *self {}
        }
        pub(crate) async fn heartbeat(&self) -> Result<(), GroupError> {
            match *self {}
        }
        /// What the shared inbox did.
        pub fn stats(&self) -> SharedInboxStats {
            match *self {}
        }
        pub(crate) fn set_down(&self, _down: bool) -> bool {
            match *self {}
        }
        pub(crate) async fn lasting_gaps(
            &self,
            _timeout: Duration,
            _lookback: Duration,
        ) -> Result<Vec<(String, u64, u64)>, GroupError> {
            match *self {}
        }
    }
}

#[cfg(feature = "postgres")]
mod imp {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::sync::Arc;

    use steadfast_core::Identity;
    use tokio::sync::{oneshot, Mutex};
    use tokio_postgres::{Client, Config, Statement, Transaction};

    use super::super::pg::{describe, Target};
    use super::*;

    /// The schema, one step per version (docs/design.md, "Consumer
    /// groups"); a new version appends a step, never edits one.
    const MIGRATIONS: &[&str] = &[
        // 1: the shared inbox and the members.
        "CREATE TABLE steadfast_inbox (
            grp text COLLATE \"C\" NOT NULL,
            producer text COLLATE \"C\" NOT NULL,
            seq bigint NOT NULL,
            member text NOT NULL,
            handled_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (grp, producer, seq)
        );
        CREATE TABLE steadfast_members (
            grp text COLLATE \"C\" NOT NULL,
            member text COLLATE \"C\" NOT NULL,
            last_seen timestamptz NOT NULL DEFAULT now(),
            handled bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (grp, member)
        );",
        // 2: claims. A row whose claimed_until is set is a member's claim
        // (until then); NULL: handled.
        "ALTER TABLE steadfast_inbox ADD COLUMN claimed_until timestamptz;
        CREATE INDEX steadfast_inbox_age ON steadfast_inbox (grp, handled_at);
        ALTER TABLE steadfast_inbox SET (fillfactor = 70);
        ALTER TABLE steadfast_members ADD COLUMN duplicates bigint NOT NULL DEFAULT 0;
        CREATE TABLE steadfast_gaps (
            grp text NOT NULL,
            producer text NOT NULL,
            first bigint NOT NULL,
            last bigint NOT NULL,
            reporter text NOT NULL,
            reported_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (grp, producer, first)
        );
        CREATE TABLE steadfast_counts (
            grp text COLLATE \"C\" NOT NULL,
            member text COLLATE \"C\" NOT NULL,
            handled bigint NOT NULL
        );",
    ];

    /// Any number that marks steadfast's migration lock among a
    /// database's advisory locks.
    const MIGRATION_LOCK: i64 = 0x5354_4446_4153_5401;

    /// Checks a shared inbox URL (libpq's URL or key=value form, its TLS
    /// files read).
    pub(crate) fn check_url(url: &str) -> Result<(), ConfigError> {
        Target::parse(url).map(|_| ())
    }

    /// Brings the schema to the newest version, one member at a time.
    /// The schema version the database holds (`None`: no steadfast
    /// tables yet). Two statements: a query naming a table that does not
    /// exist fails as it is parsed.
    async fn schema_version(client: &impl tokio_postgres::GenericClient) -> Result<Option<i32>, tokio_postgres::Error> {
        let exists: bool = client.query_one("SELECT to_regclass('steadfast_schema') IS NOT NULL", &[]).await?.get(0);
        if !exists {
            return Ok(None);
        }
        let v: i32 = client.query_one("SELECT coalesce(max(version), 0) FROM steadfast_schema", &[]).await?.get(0);
        Ok(Some(v))
    }

    /// Brings the schema to the newest version, one member at a time; a
    /// database already there is only read (a role without the right to
    /// create tables can use it), and one newer than this steadfast is
    /// refused.
    async fn migrate(client: &mut Client) -> Result<(), GroupError> {
        let db = |e: tokio_postgres::Error| GroupError(describe(&e));
        let current = MIGRATIONS.len() as i32;
        let have = schema_version(client).await.map_err(db)?.unwrap_or(0);
        if have > current {
            return Err(GroupError(format!(
                "its steadfast tables are version {have}, newer than this steadfast's {current}: upgrade steadfast"
            )));
        }
        if have == current {
            return Ok(());
        }
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS steadfast_schema (version integer NOT NULL)").await.map_err(db)?;
        let have = schema_version(&tx).await.map_err(db)?.unwrap_or(0);
        for (i, step) in MIGRATIONS.iter().enumerate().skip(have.max(0) as usize) {
            tx.batch_execute(step).await.map_err(db)?;
            tx.execute("INSERT INTO steadfast_schema (version) VALUES ($1)", &[&(i as i32 + 1)]).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// One member of a group, as the shared inbox knows it.
    #[derive(Debug, Clone, PartialEq)]
    pub struct MemberStatus {
        /// Its name (its client id).
        pub member: String,
        /// How long ago it last recorded something or said it was there
        /// (every half gap timeout while it runs).
        pub last_seen: Duration,
        /// Messages it handled (recorded first in the group).
        pub handled: u64,
        /// Copies it removed (handled before, by it or another member).
        pub duplicates: u64,
    }

    /// A consumer group, as its shared inbox knows it.
    #[derive(Debug, Clone, PartialEq)]
    pub struct GroupStatus {
        /// The group.
        pub group: String,
        /// Its members, by name.
        pub members: Vec<MemberStatus>,
        /// Identities remembered as handled (within the inbox's bounds).
        pub remembered: u64,
        /// Claims open now (messages a member is handling).
        pub claims: u64,
    }

    impl GroupStatus {
        /// Messages the group handled.
        pub fn handled(&self) -> u64 {
            self.members.iter().map(|m| m.handled).sum()
        }
        /// Copies the group removed.
        pub fn duplicates(&self) -> u64 {
            self.members.iter().map(|m| m.duplicates).sum()
        }
    }

    /// Why a group's status could not be read.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum GroupStatusError {
        /// The URL is not a PostgreSQL one.
        #[error(transparent)]
        Config(#[from] ConfigError),
        /// PostgreSQL could not be reached or refused a query.
        #[error("shared inbox {url}: {message}")]
        Postgres {
            /// The URL (password hidden).
            url: String,
            /// What went wrong.
            message: String,
        },
        /// The database has no steadfast tables, or older ones.
        #[error("shared inbox {url}: {message}")]
        Schema {
            /// The URL (password hidden).
            url: String,
            /// What is there.
            message: String,
        },
    }

    /// Connects to PostgreSQL as a shared inbox at `url` does: libpq's
    /// URL or `key=value` form, with its TLS settings (`sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey`) served by rustls. For an
    /// application's own writes beside [`super::Received::record_in`]
    /// (`steadfast sub --sql` uses it). Never [`GroupStatusError::Schema`].
    pub async fn connect_postgres(url: &str) -> Result<Client, GroupStatusError> {
        let target = Target::parse(url)?;
        let mut config = target.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let shown_url = target.shown.clone();
        target
            .connect(&config, |_| {})
            .await
            .map_err(|e| GroupStatusError::Postgres { url: shown_url, message: describe(&e) })
    }

    /// The groups whose shared inbox is the database at `url` (or only
    /// `group`), read without changing anything.
    pub async fn group_status(url: &str, group: Option<&str>) -> Result<Vec<GroupStatus>, GroupStatusError> {
        let target = Target::parse(url)?;
        let mut config = target.config.clone();
        config.connect_timeout(Duration::from_secs(5));
        let shown_url = target.shown.clone();
        let pg =
            |e: tokio_postgres::Error| GroupStatusError::Postgres { url: shown_url.clone(), message: describe(&e) };
        let client = target.connect(&config, |_| {}).await.map_err(pg)?;
        let version = schema_version(&client).await.map_err(pg)?;
        let current = MIGRATIONS.len() as i32;
        match version {
            Some(v) if v >= current => {}
            Some(v) => {
                return Err(GroupStatusError::Schema {
                    url: shown_url,
                    message: format!("its steadfast tables are version {v}, this steadfast reads {current}: start a member of this version once (it migrates them)"),
                })
            }
            None => {
                return Err(GroupStatusError::Schema {
                    url: shown_url,
                    message: "no consumer group has used this database yet (no steadfast tables)".to_owned(),
                })
            }
        }
        let members = client
            .query(
                "SELECT m.grp, m.member, extract(epoch FROM now() - m.last_seen)::float8,
                    m.handled + coalesce((SELECT sum(c.handled) FROM steadfast_counts c
                                          WHERE c.grp = m.grp AND c.member = m.member), 0)::bigint,
                    m.duplicates
                 FROM steadfast_members m WHERE $1::text IS NULL OR m.grp = $1 ORDER BY m.grp, m.member",
                &[&group],
            )
            .await
            .map_err(pg)?;
        let rows = client
            .query(
                "SELECT grp, count(*) FILTER (WHERE claimed_until IS NULL), count(*) FILTER (WHERE claimed_until > now())
                 FROM steadfast_inbox WHERE $1::text IS NULL OR grp = $1 GROUP BY grp",
                &[&group],
            )
            .await
            .map_err(pg)?;
        let mut groups: Vec<GroupStatus> = Vec::new();
        for r in &members {
            let name: String = r.get(0);
            if groups.last().is_none_or(|g| g.group != name) {
                groups.push(GroupStatus { group: name, members: Vec::new(), remembered: 0, claims: 0 });
            }
            let seen: f64 = r.get(2);
            groups.last_mut().expect("pushed").members.push(MemberStatus {
                member: r.get(1),
                last_seen: Duration::from_secs_f64(seen.max(0.0)),
                handled: r.get::<_, i64>(3).max(0) as u64,
                duplicates: r.get::<_, i64>(4).max(0) as u64,
            });
        }
        for r in &rows {
            let name: String = r.get(0);
            if let Some(g) = groups.iter_mut().find(|g| g.group == name) {
                g.remembered = r.get::<_, i64>(1).max(0) as u64;
                g.claims = r.get::<_, i64>(2).max(0) as u64;
            }
        }
        Ok(groups)
    }

    /// A connection to the shared inbox and its prepared statement.
    #[derive(Clone)]
    struct Conn {
        client: Arc<Client>,
        statement: Statement,
    }

    impl std::fmt::Debug for Conn {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Conn").finish_non_exhaustive()
        }
    }

    /// Requests that share one statement: the identities of each and
    /// where its outcome goes, and the turn to run the statement.
    struct Together<T> {
        queue: std::sync::Mutex<Vec<Waiting<T>>>,
        turn: Mutex<()>,
    }

    type Waiting<T> = (Vec<(String, u64)>, oneshot::Sender<Result<T, GroupError>>);

    impl<T> Together<T> {
        /// Queues `ids`; whoever gets the turn runs `statement` once for
        /// everything queued by then (group commit: while one statement
        /// runs, the next requests gather) and hands each request its
        /// part of the outcome (`share`).
        async fn join<O, Fut>(
            &self,
            ids: &[(String, u64)],
            what: &str,
            statement: impl FnOnce(Vec<(String, u64)>) -> Fut,
            share: impl Fn(&Result<O, GroupError>, &[(String, u64)]) -> Result<T, GroupError>,
        ) -> Result<T, GroupError>
        where
            Fut: std::future::Future<Output = Result<O, GroupError>>,
        {
            let (tx, rx) = oneshot::channel();
            self.queue.lock().unwrap_or_else(|e| e.into_inner()).push((ids.to_vec(), tx));
            {
                let _turn = self.turn.lock().await;
                let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
                if !batch.is_empty() {
                    let all: Vec<(String, u64)> = batch.iter().flat_map(|(ids, _)| ids.iter().cloned()).collect();
                    let done = statement(all).await;
                    for (ids, tx) in batch {
                        let _ = tx.send(share(&done, &ids));
                    }
                }
            }
            rx.await.unwrap_or_else(|_| Err(GroupError(format!("the {what} was abandoned"))))
        }
    }

    impl<T> Default for Together<T> {
        fn default() -> Self {
            Together { queue: std::sync::Mutex::new(Vec::new()), turn: Mutex::new(()) }
        }
    }

    impl<T> std::fmt::Debug for Together<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Together").finish_non_exhaustive()
        }
    }

    /// One kind of statement's figures, as they come.
    #[derive(Debug, Default)]
    struct Tally {
        statements: AtomicU64,
        identities: AtomicU64,
        micros: AtomicU64,
    }

    impl Tally {
        /// Counts a statement of `n` identities sent at `t0`, in the
        /// figures and in the metrics (`steadfast_group_*`).
        fn add(&self, labels: &[metrics::Label], statement: &'static str, n: usize, t0: std::time::Instant) {
            let took = t0.elapsed();
            self.statements.fetch_add(1, Ordering::Relaxed);
            self.identities.fetch_add(n as u64, Ordering::Relaxed);
            self.micros.fetch_add(took.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
            let mut labels = labels.to_vec();
            labels.push(metrics::Label::new("statement", statement));
            metrics::histogram!("steadfast_group_statement_seconds", labels.iter()).record(took.as_secs_f64());
            metrics::counter!("steadfast_group_identities_total", labels).increment(n as u64);
        }

        fn get(&self) -> StatementStats {
            StatementStats {
                statements: self.statements.load(Ordering::Relaxed),
                identities: self.identities.load(Ordering::Relaxed),
                time: Duration::from_micros(self.micros.load(Ordering::Relaxed)),
            }
        }
    }

    /// A consumer group's shared inbox: one connection, opened on first
    /// use and again after it broke.
    #[derive(Debug)]
    pub struct GroupInbox {
        target: Target,
        url: String,
        group: String,
        member: String,
        /// How long a claim lasts (ms).
        claim_ms: i64,
        /// Copies removed since the last record, counted with the next.
        duplicates: AtomicI64,
        /// Statements sent to PostgreSQL (each one round trip).
        round_trips: AtomicU64,
        /// Claims failed since the last that worked (PostgreSQL down).
        down: AtomicBool,
        /// The schema is known to be current (a connection was set up).
        migrated: AtomicBool,
        /// The metrics' labels: group and member.
        labels: Vec<metrics::Label>,
        claimed: Tally,
        recorded: Tally,
        /// Claims waiting for their statement.
        claiming: Together<Vec<Answer>>,
        /// Records waiting for their statement.
        recording: Together<()>,
        /// The connection for records, pruning and gaps (commits synced).
        client: Mutex<Option<Conn>>,
        /// The connection for claims: `synchronous_commit = off`. A claim
        /// lost in a crash of PostgreSQL only lets a copy at another member
        /// be handed over too (at least once, as without claims); a record
        /// gates the broker's ack, so it is synced.
        claims: Mutex<Option<Conn>>,
    }

    fn err(what: &str, url: &str, e: tokio_postgres::Error) -> GroupError {
        GroupError(format!("shared inbox {url}: {what}: {}", describe(&e)))
    }

    /// Sorted identities as the two arrays the queries take, each once
    /// (sorted: two members recording overlapping batches take the rows'
    /// locks in the same order and never deadlock; once: an upsert may
    /// touch a row once per statement, and a batch can hold two copies).
    fn columns(ids: &[(String, u64)]) -> (Vec<String>, Vec<i64>) {
        let mut ids: Vec<&(String, u64)> = ids.iter().collect();
        ids.sort();
        ids.dedup();
        ids.into_iter().map(|(p, s)| (p.clone(), *s as i64)).unzip()
    }

    /// Records `ids` as handled by `member` (whoever claimed them),
    /// counting them for it; returns those no member had handled.
    const RECORD: &str = "WITH ins AS (
            INSERT INTO steadfast_inbox AS i (grp, producer, seq, member)
            SELECT $1, t.producer, t.seq, $2 FROM unnest($3::text[], $4::bigint[]) AS t(producer, seq)
            ON CONFLICT (grp, producer, seq) DO UPDATE
                SET member = EXCLUDED.member, claimed_until = NULL
                WHERE i.claimed_until IS NOT NULL
            RETURNING i.producer, i.seq
        ), counted AS (
            INSERT INTO steadfast_members AS m (grp, member, handled, duplicates)
            SELECT $1, $2, count(*), $5 FROM ins
            ON CONFLICT (grp, member) DO UPDATE SET last_seen = now(), handled = m.handled + EXCLUDED.handled,
                duplicates = m.duplicates + EXCLUDED.duplicates
        )
        SELECT producer, seq FROM ins";

    /// [`RECORD`] inside the application's transaction. Its count goes
    /// into a row of its own in `steadfast_counts` (appended, so that the
    /// application's transaction locks nothing the member needs; the
    /// members fold them into `steadfast_members` when they prune).
    const RECORD_IN: &str = "WITH ins AS (
            INSERT INTO steadfast_inbox AS i (grp, producer, seq, member)
            SELECT $1, t.producer, t.seq, $2 FROM unnest($3::text[], $4::bigint[]) AS t(producer, seq)
            ON CONFLICT (grp, producer, seq) DO UPDATE
                SET member = EXCLUDED.member, claimed_until = NULL
                WHERE i.claimed_until IS NOT NULL AND (i.member = EXCLUDED.member OR i.claimed_until < now())
            RETURNING i.producer, i.seq
        ), counted AS (
            INSERT INTO steadfast_counts (grp, member, handled)
            SELECT $1, $2, count(*) FROM ins HAVING count(*) > 0
        )
        SELECT producer, seq FROM ins";

    /// Of `ids`, those another member holds a live claim on (it hands
    /// them over, or handles them, now).
    const CLAIMED_ELSEWHERE: &str = "SELECT i.producer, i.seq FROM steadfast_inbox i
        JOIN unnest($3::text[], $4::bigint[]) AS t(producer, seq) ON i.producer = t.producer AND i.seq = t.seq
        WHERE i.grp = $1 AND i.member <> $2 AND i.claimed_until >= now()";

    /// Claims `ids` for `member` for `$5` milliseconds: new ones, its own
    /// claims and claims that expired become its own; the others stay as
    /// they are. Every row comes back as it is now (the upsert always
    /// updates, so that it returns and locks each: a row another member is
    /// recording in an open transaction is seen once that one ends): its
    /// own claim, handled, or another's claim.
    const CLAIM: &str = "INSERT INTO steadfast_inbox AS i (grp, producer, seq, member, claimed_until)
        SELECT $1, t.producer, t.seq, $2, now() + $5::bigint * interval '1 millisecond'
        FROM unnest($3::text[], $4::bigint[]) AS t(producer, seq)
        ON CONFLICT (grp, producer, seq) DO UPDATE SET
            member = CASE WHEN i.claimed_until IS NOT NULL AND (i.member = EXCLUDED.member OR i.claimed_until < now())
                THEN EXCLUDED.member ELSE i.member END,
            claimed_until = CASE WHEN i.claimed_until IS NOT NULL AND (i.member = EXCLUDED.member OR i.claimed_until < now())
                THEN EXCLUDED.claimed_until ELSE i.claimed_until END
        RETURNING i.producer, i.seq, i.member = $2 AND i.claimed_until IS NOT NULL, i.claimed_until IS NULL";

    impl GroupInbox {
        pub(crate) fn new(url: &str, group: &str, member: &str, claim: Duration) -> Result<Self, ConfigError> {
            let mut target = Target::parse(url)?;
            let config = &mut target.config;
            config.connect_timeout(Duration::from_secs(5));
            config.keepalives_idle(Duration::from_secs(10));
            if config.get_application_name().is_none() {
                config.application_name(format!("steadfast {group}/{member}"));
            }
            Ok(GroupInbox {
                url: target.shown.clone(),
                target,
                group: group.to_owned(),
                member: member.to_owned(),
                claim_ms: claim.as_millis().min(i64::MAX as u128) as i64,
                duplicates: AtomicI64::new(0),
                round_trips: AtomicU64::new(0),
                down: AtomicBool::new(false),
                migrated: AtomicBool::new(false),
                labels: vec![
                    metrics::Label::new("group", group.to_owned()),
                    metrics::Label::new("member", member.to_owned()),
                ],
                claimed: Tally::default(),
                recorded: Tally::default(),
                claiming: Together::default(),
                recording: Together::default(),
                client: Mutex::new(None),
                claims: Mutex::new(None),
            })
        }

        /// Notes whether the shared inbox answers; returns what was noted
        /// before (for the dispatcher's log lines).
        pub(crate) fn set_down(&self, down: bool) -> bool {
            self.show_up(!down);
            self.down.swap(down, Ordering::Relaxed)
        }

        /// The `steadfast_group_inbox_up` gauge: whether the last claim,
        /// record or heartbeat got an answer.
        fn show_up(&self, up: bool) {
            metrics::gauge!("steadfast_group_inbox_up", self.labels.iter()).set(if up { 1.0 } else { 0.0 });
        }

        /// What this member's shared inbox did so far.
        pub fn stats(&self) -> SharedInboxStats {
            SharedInboxStats {
                round_trips: self.round_trips.load(Ordering::Relaxed),
                claims: self.claimed.get(),
                records: self.recorded.get(),
            }
        }

        /// The connection, opened (and the schema migrated) if there is
        /// none or it broke; counts the statement about to be sent.
        async fn client(&self) -> Result<Conn, GroupError> {
            // Records gate the brokers' acks: synced, whatever the
            // server's default.
            let mut config = self.target.config.clone();
            let options = config.get_options().map_or(String::new(), |o| format!("{o} "));
            config.options(format!("{options}-c synchronous_commit=on"));
            self.connection(&self.client, &config, RECORD).await
        }

        /// The claims' connection, as [`Self::client`].
        async fn claims_client(&self) -> Result<Conn, GroupError> {
            let mut config = self.target.config.clone();
            let options = config.get_options().map_or(String::new(), |o| format!("{o} "));
            // A claim waits at most 2 s for a row another member holds in
            // an open transaction (its `--sql` batch): then the batch's
            // copies count as held elsewhere and are asked about again.
            config.options(format!("{options}-c synchronous_commit=off -c lock_timeout=2000"));
            self.connection(&self.claims, &config, CLAIM).await
        }

        /// The connection in `slot` with `sql` prepared on it (parsed and
        /// planned once, not at every use), opened if there is none.
        async fn connection(&self, slot: &Mutex<Option<Conn>>, config: &Config, sql: &str) -> Result<Conn, GroupError> {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let mut slot = slot.lock().await;
            if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
                return Ok(c.clone());
            }
            let url = self.url.clone();
            let ended = move |e: tokio_postgres::Error| {
                tracing::warn!(inbox = %url, error = %describe(&e), "the connection to the shared inbox ended");
            };
            let mut client = self.target.connect(config, ended).await.map_err(|e| err("connect", &self.url, e))?;
            migrate(&mut client)
                .await
                .map_err(|e| GroupError(format!("shared inbox {}: the schema: {e}", self.url)))?;
            self.migrated.store(true, Ordering::Relaxed);
            let statement = client.prepare(sql).await.map_err(|e| err("prepare", &self.url, e))?;
            tracing::info!(inbox = %self.url, group = %self.group, member = %self.member, "shared inbox connected");
            let conn = Conn { client: Arc::new(client), statement };
            *slot = Some(conn.clone());
            Ok(conn)
        }

        /// Claims each identity for this member (one round trip): its own
        /// now ([`Answer::New`]), handled by a member ([`Answer::Handled`]),
        /// or claimed by another ([`Answer::Elsewhere`]).
        pub(crate) async fn claim(&self, ids: &[(String, u64)]) -> Result<Vec<Answer>, GroupError> {
            let share = |done: &Result<HashMap<(String, u64), Answer>, GroupError>, ids: &[(String, u64)]| {
                let answers = done.as_ref().map_err(Clone::clone)?;
                Ok(ids.iter().map(|k| answers.get(k).copied().unwrap_or(Answer::Elsewhere)).collect())
            };
            self.claiming.join(ids, "claim", |all| async move { self.claim_now(&all).await }, share).await
        }

        /// One claim statement for `ids`: each one's answer.
        async fn claim_now(&self, ids: &[(String, u64)]) -> Result<HashMap<(String, u64), Answer>, GroupError> {
            let conn = self.claims_client().await?;
            let (producers, seqs) = columns(ids);
            let t0 = std::time::Instant::now();
            let done = conn
                .client
                .query(&conn.statement, &[&self.group, &self.member, &producers, &seqs, &self.claim_ms])
                .await;
            self.claimed.add(&self.labels, "claim", producers.len(), t0);
            let rows = match done {
                Ok(rows) => rows,
                // lock_not_available: another member's open transaction
                // holds one of the rows; nothing was claimed.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                    return Ok(ids.iter().map(|k| (k.clone(), Answer::Elsewhere)).collect());
                }
                Err(e) => return Err(err("claim", &self.url, e)),
            };
            let mut answers = HashMap::with_capacity(rows.len());
            let mut elsewhere = 0u64;
            for r in &rows {
                let answer = match (r.get::<_, bool>(2), r.get::<_, bool>(3)) {
                    (true, _) => Answer::New,
                    (false, true) => Answer::Handled,
                    // Claimed by another member: asked again later.
                    (false, false) => {
                        elsewhere += 1;
                        Answer::Elsewhere
                    }
                };
                answers.insert((r.get::<_, String>(0), r.get::<_, i64>(1) as u64), answer);
            }
            if elsewhere > 0 {
                metrics::counter!("steadfast_group_held_elsewhere_total", self.labels.iter()).increment(elsewhere);
            }
            Ok(answers)
        }

        /// Records identities this member handled (one round trip), with
        /// the copies it removed since the last record.
        pub(crate) async fn record(&self, ids: &[(String, u64)]) -> Result<(), GroupError> {
            let share = |done: &Result<(), GroupError>, _: &[(String, u64)]| done.clone();
            self.recording.join(ids, "record", |all| async move { self.record_now(&all).await }, share).await
        }

        /// One record statement for `ids`.
        async fn record_now(&self, ids: &[(String, u64)]) -> Result<(), GroupError> {
            let conn = self.client().await.inspect_err(|_| self.show_up(false))?;
            let (producers, seqs) = columns(ids);
            let dups = self.duplicates.swap(0, Ordering::Relaxed);
            let t0 = std::time::Instant::now();
            let done =
                conn.client.execute(&conn.statement, &[&self.group, &self.member, &producers, &seqs, &dups]).await;
            self.recorded.add(&self.labels, "record", producers.len(), t0);
            self.show_up(done.is_ok());
            if let Err(e) = done {
                self.duplicates.fetch_add(dups, Ordering::Relaxed);
                return Err(err("record", &self.url, e));
            }
            Ok(())
        }

        /// Extends this member's claims on `ids` (messages it handles
        /// still) by a whole claim's length from now.
        pub(crate) async fn renew(&self, ids: &[(String, u64)]) -> Result<u64, GroupError> {
            let conn = self.claims_client().await?;
            let (producers, seqs) = columns(ids);
            conn.client
                .execute(
                    "UPDATE steadfast_inbox AS i SET claimed_until = now() + $5::bigint * interval '1 millisecond'
                     FROM unnest($3::text[], $4::bigint[]) AS t(producer, seq)
                     WHERE i.grp = $1 AND i.member = $2 AND i.claimed_until IS NOT NULL
                       AND i.producer = t.producer AND i.seq = t.seq",
                    &[&self.group, &self.member, &producers, &seqs, &self.claim_ms],
                )
                .await
                .map_err(|e| err("renew claims", &self.url, e))
        }

        /// Copies of handled messages this member removed (counted in the
        /// group with its next record, or its next heartbeat).
        pub(crate) fn note_duplicates(&self, n: u64) {
            self.duplicates.fetch_add(n.min(i64::MAX as u64) as i64, Ordering::Relaxed);
        }

        /// Says this member is there (its `last_seen`), with the copies
        /// it removed since its last record: a member that only removes
        /// copies, or has handled nothing yet, shows in the group's status.
        pub(crate) async fn heartbeat(&self) -> Result<(), GroupError> {
            let client = self.client().await.inspect_err(|_| self.show_up(false))?.client;
            let dups = self.duplicates.swap(0, Ordering::Relaxed);
            let done = client
                .execute(
                    "INSERT INTO steadfast_members AS m (grp, member, duplicates) VALUES ($1, $2, $3)
                     ON CONFLICT (grp, member) DO UPDATE SET last_seen = now(), duplicates = m.duplicates + EXCLUDED.duplicates",
                    &[&self.group, &self.member, &dups],
                )
                .await;
            self.show_up(done.is_ok());
            if let Err(e) = done {
                self.duplicates.fetch_add(dups, Ordering::Relaxed);
                return Err(err("heartbeat", &self.url, e));
            }
            Ok(())
        }

        /// Forgets what was handled (or claimed) longer ago than `max_age`,
        /// and the oldest handled beyond the `keep` newest; returns how many
        /// went. Any member may do it: the statements are idempotent.
        pub(crate) async fn prune(&self, max_age: Duration, keep: u64) -> Result<u64, GroupError> {
            let client = self.client().await?.client;
            let age_ms = max_age.as_millis().min(i64::MAX as u128) as i64;
            let old = client
                .execute(
                    "DELETE FROM steadfast_inbox WHERE grp = $1 AND handled_at < now() - $2::bigint * interval '1 millisecond'",
                    &[&self.group, &age_ms],
                )
                .await
                .map_err(|e| err("prune", &self.url, e))?;
            let keep = keep.min(i64::MAX as u64) as i64;
            let over = client
                .execute(
                    "DELETE FROM steadfast_inbox WHERE grp = $1 AND claimed_until IS NULL AND handled_at < (
                        SELECT handled_at FROM steadfast_inbox WHERE grp = $1 AND claimed_until IS NULL
                        ORDER BY handled_at DESC OFFSET $2 LIMIT 1)",
                    &[&self.group, &keep],
                )
                .await
                .map_err(|e| err("prune", &self.url, e))?;
            // Counts appended by `record_in` go into the members' rows.
            client
                .execute(
                    "WITH folded AS (DELETE FROM steadfast_counts WHERE grp = $1 RETURNING member, handled)
                     INSERT INTO steadfast_members AS m (grp, member, handled)
                     SELECT $1, member, sum(handled)::bigint FROM folded GROUP BY member
                     ON CONFLICT (grp, member) DO UPDATE SET handled = m.handled + EXCLUDED.handled",
                    &[&self.group],
                )
                .await
                .map_err(|e| err("prune", &self.url, e))?;
            // What was reported as lost is kept as long as identities are.
            client
                .execute(
                    "DELETE FROM steadfast_gaps WHERE grp = $1 AND reported_at < now() - $2::bigint * interval '1 millisecond'",
                    &[&self.group, &age_ms],
                )
                .await
                .map_err(|e| err("prune", &self.url, e))?;
            Ok(old + over)
        }

        /// Gaps the group as a whole lacks: a producer's sequence number
        /// that no member received (claimed or handled) although a later
        /// one arrived more than `timeout` ago (and less than `timeout +
        /// lookback`: each check covers what became old enough since the
        /// one before, with overlap). Each gap is reported by one member,
        /// the first to find it: these are the ones this member reports.
        pub(crate) async fn lasting_gaps(
            &self,
            timeout: Duration,
            lookback: Duration,
        ) -> Result<Vec<(String, u64, u64)>, GroupError> {
            let client = self.client().await?.client;
            let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
            let rows = client
                .query(
                    "INSERT INTO steadfast_gaps (grp, producer, first, last, reporter)
                     SELECT $1, u.producer, below.seq + 1, u.seq - 1, $2
                     FROM steadfast_inbox u
                     CROSS JOIN LATERAL (
                         SELECT max(b.seq) AS seq FROM steadfast_inbox b
                         WHERE b.grp = $1 AND b.producer = u.producer AND b.seq < u.seq
                     ) below
                     WHERE u.grp = $1
                       AND u.handled_at < now() - $3::bigint * interval '1 millisecond'
                       AND u.handled_at >= now() - ($3::bigint + $4::bigint) * interval '1 millisecond'
                       AND below.seq IS NOT NULL AND below.seq < u.seq - 1
                     ON CONFLICT DO NOTHING
                     RETURNING producer, first, last",
                    &[&self.group, &self.member, &ms(timeout), &ms(lookback)],
                )
                .await
                .map_err(|e| err("look for gaps", &self.url, e))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64)).collect())
        }

        /// Makes sure the schema is there and current before the first
        /// record in an application's transaction (a member that claims
        /// nothing may not have connected yet).
        pub(crate) async fn ready(&self) -> Result<(), GroupError> {
            if !self.migrated.load(Ordering::Relaxed) {
                self.client().await?;
            }
            Ok(())
        }

        /// Records `ids` inside the caller's transaction; true for each
        /// that no member recorded before (in the order given). A copy
        /// another member is recording in a transaction still open waits
        /// for it: recorded there, it is false here; rolled back, true. A
        /// copy another member holds a live claim on (a member handling it
        /// outside a transaction) is neither: `Err(n)`, the transaction to
        /// be rolled back and the deliveries tried again later.
        pub(crate) async fn record_in(
            &self,
            tx: &Transaction<'_>,
            ids: &[&Identity],
        ) -> Result<Result<Vec<bool>, usize>, tokio_postgres::Error> {
            let pairs: Vec<(String, u64)> = ids.iter().map(|i| (i.producer.clone(), i.seq)).collect();
            let (producers, seqs) = columns(&pairs);
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let rows = tx.query(RECORD_IN, &[&self.group, &self.member, &producers, &seqs]).await?;
            let new: HashSet<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let outcome: Vec<bool> = pairs.iter().map(|(p, s)| new.contains(&(p.clone(), *s as i64))).collect();
            if new.len() < producers.len() {
                // The rest were recorded, or are claimed elsewhere: a new
                // statement sees what the upsert waited for.
                let (old_p, old_s): (Vec<String>, Vec<i64>) =
                    producers.into_iter().zip(seqs).filter(|(p, s)| !new.contains(&(p.clone(), *s))).unzip();
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                let held = tx.query(CLAIMED_ELSEWHERE, &[&self.group, &self.member, &old_p, &old_s]).await?;
                if !held.is_empty() {
                    return Ok(Err(held.len()));
                }
            }
            Ok(Ok(outcome))
        }
    }
}

pub(crate) use imp::check_url;
pub use imp::GroupInbox;

#[cfg(feature = "postgres")]
pub use imp::{connect_postgres, group_status, GroupStatus, GroupStatusError, MemberStatus};
