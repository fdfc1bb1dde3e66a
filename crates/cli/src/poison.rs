//! `steadfast poison`: the messages an outbox moved aside because a broker
//! ended the link each time one was sent, alone, or refused it with a
//! reason code no retry changes; list them, put them back in the queue, or
//! delete them.

use anyhow::anyhow;
use steadfast_store::{Outbox, OutboxConfig, Poisoned, SqliteStore, StoreError};

use crate::args::PoisonArgs;
use crate::paths::default_outbox;
use crate::values::human_bytes;
use crate::Failure;

pub async fn run(a: PoisonArgs) -> Result<(), Failure> {
    let dir = match (a.outbox, a.id) {
        (Some(d), _) => d,
        (None, Some(id)) => default_outbox(&id),
        (None, None) => return Err(Failure::usage(anyhow!("which outbox? give --outbox DIR or -i CLIENT_ID"))),
    };
    let ids = |v: &[String]| -> Result<Option<Vec<u64>>, Failure> {
        if v.iter().any(|s| s == "all") {
            return Ok(None);
        }
        let parsed: Result<Vec<u64>, _> = v.iter().map(|s| s.parse::<u64>()).collect();
        parsed.map(Some).map_err(|_| {
            Failure::usage(anyhow!("message ids are numbers, as `steadfast poison --outbox DIR` lists them, or `all`"))
        })
    };
    let action = match (&a.requeue, &a.delete) {
        (Some(r), None) => Some((ids(r)?, false)),
        (None, Some(d)) => Some((ids(d)?, true)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(Failure::usage(anyhow!("--requeue and --delete: one at a time"))),
    };
    let d = dir.clone();
    // Names a missing or foreign directory the way `status` does, before
    // anything is created.
    tokio::task::spawn_blocking(move || SqliteStore::open_read_only(&d).map(drop))
        .await
        .map_err(|e| Failure::other(anyhow!("{e}")))?
        .map_err(|e| Failure::other(anyhow!(e)))?;
    let d = dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || SqliteStore::open(&d)).await.map_err(|e| Failure::other(anyhow!("{e}")))?;
    let store = match opened {
        Ok((store, _)) => store,
        Err(StoreError::Locked { .. }) => {
            return Err(Failure::other(anyhow!(
                "the outbox {} is in use by another process (a pub, sub or bridge): stop it first, then run this again",
                dir.display()
            )))
        }
        Err(e) => return Err(Failure::other(anyhow!(e))),
    };
    let outbox = Outbox::start(Box::new(store), OutboxConfig::default()).map_err(|e| Failure::other(anyhow!(e)))?;
    let result = act(&outbox, &dir, action).await;
    tokio::task::spawn_blocking(move || outbox.close()).await.map_err(|e| Failure::other(anyhow!("{e}")))?;
    result
}

async fn act(outbox: &Outbox, dir: &std::path::Path, action: Option<(Option<Vec<u64>>, bool)>) -> Result<(), Failure> {
    let err = |e: StoreError| Failure::other(anyhow!(e));
    let Some((ids, delete)) = action else {
        let list = outbox.poisoned().await.map_err(err)?;
        print_list(&list, dir);
        return Ok(());
    };
    let asked = ids.clone();
    let done = outbox.unpoison(ids, delete).await.map_err(err)?;
    if !delete && !done.is_empty() {
        // A size learned from poison would set them aside again at once.
        let report = outbox.report().await.map_err(err)?;
        for (url, _) in &report.poison_sizes {
            outbox.set_meta(&steadfast_store::BrokerMeta::PoisonSize.key(url), "");
        }
        if !report.poison_sizes.is_empty() {
            println!("the message sizes learned from poison are forgotten: a broker that still closes the link on them teaches them again");
        }
    }
    let what = if delete {
        "deleted (they leave the outbox; counted as poison when moved aside)"
    } else {
        "back in the queue: the next run with their brokers sends them (a broker that still ends the link on them moves them aside again)"
    };
    if !done.is_empty() || asked.is_none() {
        println!("{} message(s) {what}", done.len());
    }
    if let Some(asked) = asked {
        let missing: Vec<String> = asked.iter().filter(|id| !done.contains(id)).map(u64::to_string).collect();
        if !missing.is_empty() {
            return Err(Failure::other(anyhow!(
                "not poison in this outbox: {} (`steadfast poison --outbox {}` lists what is)",
                missing.join(", "),
                dir.display()
            )));
        }
    }
    Ok(())
}

fn print_list(list: &[Poisoned], dir: &std::path::Path) {
    if list.is_empty() {
        println!("no poison in {}", dir.display());
        return;
    }
    println!("{} message(s) moved aside as poison in {}:", list.len(), dir.display());
    for p in list {
        let age = steadfast_store::now_ms().saturating_sub(p.at_ms) / 1000;
        let broker = if p.broker.is_empty() { "a broker" } else { &p.broker };
        println!(
            "  id {}  topic {}  {}  QoS {}  moved aside {age} s ago; {broker}: {}",
            p.id,
            p.topic,
            human_bytes(p.size),
            p.qos,
            p.cause
        );
    }
    println!(
        "`steadfast poison --outbox {0} --requeue ID...|all` sends them again; `--delete ID...|all` removes them",
        dir.display()
    );
}
