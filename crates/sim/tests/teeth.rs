//! The simulator has teeth: the engine as it is passes a range of seeds,
//! and every planted bug is caught within 1,000 seeds. One test, because a
//! planted bug is switched on for the whole process.

use steadfast_core::mutate::{plant, Bug};

#[test]
fn the_engine_passes_and_every_planted_bug_is_caught_within_1000_seeds() {
    plant(None);
    let failed = steadfast_sim::run_range(0, 300, 2, &mut |v| eprintln!("FAILED {}", v.summary()));
    assert!(failed.is_empty(), "the engine without planted bugs failed seeds {failed:?}");
    for bug in Bug::ALL {
        plant(Some(bug));
        let caught = (0..1_000).find(|&seed| !steadfast_sim::run(seed).passed());
        plant(None);
        assert!(caught.is_some(), "planted bug `{}` was not caught within 1,000 seeds", bug.name());
        let seed = caught.expect("checked");
        // A failure replays identically from its seed.
        plant(Some(bug));
        let (a, b) = (steadfast_sim::run(seed), steadfast_sim::run(seed));
        plant(None);
        assert_eq!(
            (a.lost.clone(), a.twice.clone(), a.stuck.clone()),
            (b.lost, b.twice, b.stuck),
            "seed {seed} did not replay identically"
        );
        let id = a.culprit().expect("a failure names a message");
        assert!(a.trace.story(id).contains("accepted"), "the story of message {id} starts with its acceptance");
    }
}
