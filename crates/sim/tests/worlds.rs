//! The worlds the seeds make reach what the simulator claims to model: a
//! broker that closes the connection on QoS 2 (reported, and given QoS 1
//! once found out), messages a broker closes the connection on (moved
//! aside as poison, the rest delivered), MQTT 3.1.1-only brokers, and producer crashes in the
//! middle of a commit whose bytes land whole or are torn.

use steadfast_sim::{run, run_sized, Fault, Schedule, Size};

/// The first seeds from 0 whose world `pick` takes, up to `want` of them.
fn seeds(want: usize, pick: impl Fn(&Schedule) -> bool) -> Vec<u64> {
    (0..20_000).filter(|s| pick(&Schedule::of(*s))).take(want).collect()
}

#[test]
fn a_broker_that_closes_the_link_on_qos_2_gets_qos_1_and_everything_is_handled() {
    let picked = seeds(20, |s| s.qos2_closes && s.messages.iter().any(|m| m.qos == 2));
    assert_eq!(picked.len(), 20, "seeds make such brokers");
    for seed in picked {
        let s = Schedule::of(seed);
        assert!(
            !s.mqtt5 && !s.qos2_as_puback,
            "seed {seed}: a broker that closes on QoS 2 speaks 3.1.1 and nothing else"
        );
        let v = run(seed);
        assert!(v.passed(), "seed {seed}: {}", v.summary());
        let story = v.trace.story(0);
        assert!(story.contains("QoS 2 is not supported"), "seed {seed}: the broker closed the link");
        assert!(story.contains("reported as a broker that may not support QoS 2"), "seed {seed}: {story}");
        // Found out (a QoS 2 PUBLISH alone in flight at each close, never a
        // PUBREC), QoS 2 goes to it at QoS 1: nothing is moved aside.
        let oversize = s.messages.iter().filter(|m| m.oversize).count();
        assert!(v.poisoned.len() <= oversize, "seed {seed}: only oversize messages are poison");
    }
}

/// Runs each seed, which must pass with nothing stuck and nothing moved
/// aside wrongly; counts the poison whose story `is_it` takes, each of
/// which must tell `cause`.
fn poison_of(picked: Vec<u64>, is_it: impl Fn(&str) -> bool, cause: &str) -> usize {
    let mut n = 0;
    for seed in picked {
        let v = run(seed);
        assert!(v.passed(), "seed {seed}: {}", v.summary());
        assert!(v.stuck.is_empty() && v.poisoned_wrongly.is_empty(), "seed {seed}: {}", v.summary());
        for id in &v.poisoned {
            let story = v.trace.story(*id);
            if is_it(&story) {
                assert!(story.contains(cause), "seed {seed}: {story}");
                n += 1;
            }
        }
    }
    n
}

#[test]
fn messages_a_broker_closes_the_link_on_are_moved_aside_and_the_rest_go_through() {
    let picked = seeds(40, |s| s.messages.iter().any(|m| m.oversize));
    assert_eq!(picked.len(), 40, "seeds make oversize messages");
    let poisoned = poison_of(picked, |s| s.contains("larger than the brokers take"), "moved aside as poison");
    assert!(poisoned >= 40, "oversize messages are moved aside ({poisoned})");
}

#[test]
fn brokers_of_mqtt_311_announce_no_limits_and_lose_nothing() {
    let picked = seeds(20, |s| !s.mqtt5 && !s.qos2_closes);
    assert_eq!(picked.len(), 20);
    for seed in picked {
        let s = Schedule::of(seed);
        assert!(s.receive_maximum.is_none() && !s.max_qos_1, "seed {seed}: 3.1.1 has no CONNACK properties");
        let v = run(seed);
        assert!(v.passed() && v.poisoned_wrongly.is_empty(), "seed {seed}: {}", v.summary());
    }
}

#[test]
fn a_commit_under_way_at_a_producer_crash_lands_whole_or_is_torn() {
    let (mut landed, mut torn) = (0, 0);
    let crashes = |s: &Schedule| s.faults.iter().filter(|(_, f)| matches!(f, Fault::CrashProducer { .. })).count();
    for seed in seeds(150, |s| crashes(s) >= 2) {
        let v = run(seed);
        let story = v.trace.story(0);
        let l = story.matches("the commit under way landed whole").count();
        let t = story.matches("the commit under way was torn").count();
        if l + t > 0 {
            assert!(v.passed(), "seed {seed}: {}", v.summary());
        }
        landed += l;
        torn += t;
    }
    assert!(landed > 10 && torn > 10, "both outcomes happen: {landed} landed, {torn} torn");
}

#[test]
fn a_chosen_size_makes_heavy_worlds_that_keep_the_promise() {
    let size = Size { messages: 1_000, faults: 20 };
    for seed in 0..3 {
        let s = Schedule::sized(seed, Some(size));
        assert_eq!((s.messages.len(), s.faults.len()), (1_000, 20));
        let v = run_sized(seed, Some(size));
        assert!(v.passed(), "seed {seed}: {}", v.summary());
        // Messages published while the producer is down are never accepted.
        assert!(v.accepted > 100, "seed {seed}: {} accepted", v.accepted);
    }
    // Without a size, the seed decides it as before.
    assert_eq!(Schedule::sized(7, None).messages, Schedule::of(7).messages);
}

/// In worlds where every message asks for the consumer's receipt, nothing
/// is excused as lost by the brokers: what a broker without persistence
/// lost after acknowledging it is published again and handled.
#[test]
fn with_receipts_what_the_brokers_lost_is_published_again_and_handled() {
    let killed = |s: &Schedule| s.faults.iter().any(|(_, f)| matches!(f, Fault::KillBroker { .. }));
    let picked = seeds(60, |s| s.receipts_ms.is_some() && !s.persistence && killed(s));
    assert_eq!(picked.len(), 60, "seeds make such worlds");
    let (mut rescued, mut republished) = (0, 0);
    for seed in picked {
        let v = run(seed);
        assert!(v.passed(), "seed {seed}: {}", v.summary());
        assert_eq!(v.broker_lost, 0, "seed {seed}: nothing is excused with receipts");
        rescued += v.rescued;
        republished += (1..=v.accepted as u64).filter(|id| v.trace.story(*id).contains("no receipt in time")).count();
    }
    assert!(rescued > 0, "some messages the brokers lost were published again and handled");
    assert!(republished >= rescued, "{republished} published again, {rescued} rescued");
}

#[test]
fn messages_the_brokers_refuse_for_good_are_moved_aside_with_their_code_and_the_rest_go_through() {
    let picked = seeds(40, |s| s.messages.iter().any(|m| m.denied));
    assert_eq!(picked.len(), 40, "seeds make denied messages");
    assert!(picked.iter().all(|seed| Schedule::of(*seed).mqtt5), "only MQTT 5 gives a reason code");
    // One also too large is closed on first.
    let denied = |s: &str| s.contains("on a topic the brokers deny") && !s.contains("larger than the brokers take");
    let poisoned = poison_of(picked, denied, "refused it for good: 0x87, not authorized");
    assert!(poisoned >= 40, "denied messages are moved aside ({poisoned})");
}
