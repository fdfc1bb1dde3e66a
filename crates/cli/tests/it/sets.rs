//! G9: a message accepted for one broker set never goes to another unless
//! the user says so (issue 17: the default outbox is per client id, not per
//! broker set, and `pub -b A` then `pub -b B` delivered A's message to B).

use std::time::Duration;

use steadfast_testkit::{Mosquitto, Subscriber};

use crate::{run, status_json, stderr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_accepted_for_one_broker_goes_to_another_only_when_retargeted() {
    let mut a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let on_b = Subscriber::start(b.port(), "#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let wait = ["--outbox", ob, "--wait-timeout", "30s"];
    a.kill9();
    // Accepted for A while A is down.
    let out = run(&["pub", "-b", &a.url(), "-t", "secret/for-A", "-m", "x", "--outbox", ob, "--no-wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The same outbox with B: its own message goes, A's stays, and it says so.
    let out = run(&[&["pub", "-b", &b.url(), "-t", "public/b", "-m", "y"][..], &wait].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    let said = format!("1 message(s) in the outbox {ob} were accepted for {}; they stay queued", a.url());
    assert!(err.contains(&said) && err.contains("--retarget"), "{err}");
    // The hint names the client id too: the same session on A.
    assert!(err.contains(&format!("--drain -b {} -i ", a.url())), "{err}");
    on_b.wait_count(1, Duration::from_secs(10)).await;
    // A's message, older, would have gone first: B never saw it.
    assert_eq!(on_b.lines(), ["y"]);
    let st = status_json(ob);
    assert_eq!((st["queued"].as_u64(), st["held"][0]["queued"].as_u64()), (Some(1), Some(1)), "{st}");
    assert_eq!(st["held"][0]["brokers"], a.url(), "{st}");
    // Both brokers are listed; A, of the earlier run, as such (issue 21).
    let configured =
        |url: String| st["brokers"].as_array().unwrap().iter().find(|x| x["url"] == url).unwrap()["configured"].clone();
    assert_eq!((configured(a.url()), configured(b.url())), (false.into(), true.into()), "{st}");
    // Held for A, the message is nobody's lag in this run.
    assert!(st["brokers"].as_array().unwrap().iter().all(|x| x["lag"] == 0), "{st}");
    let text = String::from_utf8_lossy(&run(&["status", "--outbox", ob]).await.stdout).into_owned();
    assert!(text.contains(&format!("broker   {}  not in the last run's configuration", a.url())), "{text}");
    // With A's own brokers it goes to A.
    a.restart().await;
    let on_a = Subscriber::start(a.port(), "#", 1, None).await;
    let out = run(&[&["pub", "--drain", "-b", &a.url()][..], &wait].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    on_a.wait_count(1, Duration::from_secs(10)).await;
    assert_eq!(on_a.lines(), ["x"]);
    assert_eq!(status_json(ob)["queued"], 0);
    // --retarget: the user says so, and A's next message goes to B.
    a.kill9();
    let out = run(&["pub", "-b", &a.url(), "-t", "secret/2", "-m", "z", "--outbox", ob, "--no-wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[&["pub", "-b", &b.url(), "--retarget", "-t", "public/c", "-m", "w"][..], &wait].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("stay queued"), "{}", stderr(&out));
    on_b.wait_count(3, Duration::from_secs(10)).await;
    assert_eq!(on_b.lines(), ["y", "z", "w"]);
    assert_eq!(status_json(ob)["queued"], 0);
}
