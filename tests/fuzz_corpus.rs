//! Every fuzz target (fuzz/targets.rs) on stable Rust, as the README's test command runs it:
//! each corpus file of fuzz/corpus/<target>/ as it is, then thousands of deterministic
//! mutations of it (bytes flipped, inserted, removed, runs duplicated, files spliced). A panic
//! anywhere fails the test with the input that caused it. The longer coverage-guided runs use
//! libFuzzer on nightly: `cargo +nightly fuzz run <target>` (README, "Fuzzing").

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

const MUTATIONS_PER_FILE: usize = 20_000;

/// xorshift64*: the same mutations on every run, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 => data.insert(at, rng.next() as u8),
            2 if at < data.len() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            3 if at < data.len() => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                let run = data[at..end].to_vec();
                data.splice(at..at, run);
            }
            4 => {
                // Interesting values where parsers read lengths and counts.
                let v = [0x00, 0xff, 0x7f, 0x80, b'\n', b'"', b'{', b'%'][rng.below(8)];
                if at < data.len() {
                    data[at] = v;
                }
            }
            _ => {
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for target in targets::TARGETS {
        let mut files: Vec<_> = std::fs::read_dir(root.join(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        let mut rng = Rng(0x5eed_0000 + target.len() as u64);
        for (i, seed) in seeds.iter().enumerate() {
            // A seed that stops at the first check would leave the target's depths untried
            // (the unknown-user STUN request and the DTLS record route nowhere, by design).
            let reached = targets::run(target, seed);
            let routes_nowhere = ["binding-unknown", "dtls", "rtp"];
            let name = files[i].file_name().unwrap().to_str().unwrap();
            assert!(
                reached > 0 || routes_nowhere.contains(&name),
                "{target}: {name} reaches nothing"
            );
            for _ in 0..MUTATIONS_PER_FILE {
                let other = &seeds[rng.below(seeds.len())];
                let input = mutate(&mut rng, seed, other);
                let ran = std::panic::catch_unwind(|| targets::run(target, &input));
                assert!(
                    ran.is_ok(),
                    "{target} panicked on a mutation of {}: {:?}",
                    files[i].display(),
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
}
