//! The zstd level of a shard's stream, adapted to whichever side is the
//! bottleneck, as `zstd --adapt` does.
//!
//! The agent compresses while the command runs. When the link is slower than
//! the compressor (Lambda paces a stream past its first 6 MB), a stronger
//! level sends the same log in fewer bytes, so sooner; when the command
//! prints faster than the compressor keeps up, a faster level lets it go on
//! printing. Otherwise the stream stays at the default level.
//!
//! The pump measures windows of the stream ([`Window`]) and [`Adapt`] moves
//! one level at a time. A stronger level is kept only while it pays: the
//! sink can be slow because its reader is short of CPU (on the same two
//! cores as the agent, say) rather than of bytes, and then a stronger level
//! only takes CPU from it. So a step up that did not raise the log's
//! throughput is taken back, and no step up is tried for a while after.

use std::time::Duration;

/// The levels the stream moves between, fastest first.
pub const LEVELS: [i32; 5] = [-5, -1, 1, 3, 6];
/// Where a stream starts and returns to when neither side is the bottleneck.
const DEFAULT: usize = 2;
/// A window closes after this much output...
pub const WINDOW_BYTES: u64 = 1024 * 1024;
/// ...or after this long, whichever comes first.
pub const WINDOW_TIME: Duration = Duration::from_millis(250);
/// A window whose stream waited on the sink for more than this share of
/// its time was limited by the link.
const LINK_BOUND: f64 = 0.5;
/// A window in which more than this share of the output came in full reads
/// (the pipe held more than a read takes) was limited by the compressor.
const PRODUCER_AHEAD: f64 = 0.5;
/// A step up is kept only if the log's throughput rose at least this much:
/// one that merely did no harm costs the compressor CPU for nothing, and
/// where the reader shares the CPU, it costs the reader.
const KEPT_IF: f64 = 1.05;
/// Windows without a step up after one that did not pay; doubled each time
/// one more does not, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: u32 = 4;
const MAX_BACKOFF: u32 = 64;

/// What the pump saw during one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// How long the window lasted.
    pub elapsed: Duration,
    /// Output bytes taken in.
    pub bytes: u64,
    /// Of those, bytes that came in full reads.
    pub full_read_bytes: u64,
    /// Time spent waiting for the sink to take chunks.
    pub waited_on_sink: Duration,
}

impl Window {
    /// Whether the window is over and ready for [`Adapt::next_level`].
    pub fn is_due(&self) -> bool {
        self.bytes >= WINDOW_BYTES || self.elapsed >= WINDOW_TIME
    }

    fn link_bound(&self) -> bool {
        share(
            self.waited_on_sink.as_secs_f64(),
            self.elapsed.as_secs_f64(),
        ) > LINK_BOUND
    }

    fn producer_ahead(&self) -> bool {
        share(self.full_read_bytes as f64, self.bytes as f64) > PRODUCER_AHEAD
    }

    /// Log bytes per second.
    fn throughput(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole
    } else {
        0.0
    }
}

/// The level controller of one stream.
#[derive(Debug, Clone)]
pub struct Adapt {
    at: usize,
    /// A step up on trial: the level it came from and the throughput there.
    trial: Option<(usize, f64)>,
    /// Windows to go before the next step up may be tried.
    no_raise_for: u32,
    backoff: u32,
}

impl Default for Adapt {
    fn default() -> Self {
        Adapt {
            at: DEFAULT,
            trial: None,
            no_raise_for: 0,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Adapt {
    /// The level now.
    pub fn level(&self) -> i32 {
        LEVELS[self.at]
    }

    /// Takes a finished window; returns the new level when it changes.
    pub fn next_level(&mut self, window: &Window) -> Option<i32> {
        let before = self.at;
        self.no_raise_for = self.no_raise_for.saturating_sub(1);
        if let Some((from, was)) = self.trial.take() {
            if window.link_bound() && window.throughput() < was * KEPT_IF {
                // The stronger level did not pay: the reader is short of
                // CPU, not of bytes (or the log compresses no better).
                // Back, and leave it be for a while.
                self.at = from;
                self.no_raise_for = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return Some(self.level());
            }
            if window.link_bound() {
                self.backoff = FIRST_BACKOFF;
            }
        }
        if window.link_bound() {
            if self.at + 1 < LEVELS.len() && self.no_raise_for == 0 {
                self.trial = Some((self.at, window.throughput()));
                self.at += 1;
            }
        } else if window.producer_ahead() {
            self.at = self.at.saturating_sub(1);
        } else if self.at < DEFAULT {
            self.at += 1;
        } else if self.at > DEFAULT {
            self.at -= 1;
        }
        (self.at != before).then(|| self.level())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of a stream whose sink kept it waiting most of the time,
    /// at `throughput` log bytes per second.
    fn held_up(throughput: f64) -> Window {
        let elapsed = Duration::from_millis(100);
        Window {
            elapsed,
            bytes: (throughput * elapsed.as_secs_f64()) as u64,
            full_read_bytes: 0,
            waited_on_sink: elapsed.mul_f64(0.8),
        }
    }

    fn run(adapt: &mut Adapt, windows: usize, make: impl Fn(i32) -> Window) -> Vec<i32> {
        (0..windows)
            .map(|_| {
                let w = make(adapt.level());
                adapt.next_level(&w);
                adapt.level()
            })
            .collect()
    }

    #[test]
    fn a_slow_link_raises_the_level_as_long_as_each_step_pays() {
        let mut adapt = Adapt::default();
        // 2 MB/s, as Lambda paces a stream: the stronger the level, the
        // more log goes through it.
        let levels = run(&mut adapt, 10, |at| held_up(2e6 * (4.0 + f64::from(at))));
        assert_eq!(adapt.level(), *LEVELS.last().unwrap(), "{levels:?}");
    }

    #[test]
    fn a_reader_short_of_cpu_is_not_given_stronger_levels_that_take_more_of_it() {
        let mut adapt = Adapt::default();
        // The sink waits, but on a reader sharing the CPU with the
        // compressor: every stronger level leaves it less.
        let levels = run(&mut adapt, 200, |at| {
            held_up(800e6 / (1.0 + f64::from(at.max(0))))
        });
        let above = levels.iter().filter(|l| **l > LEVELS[DEFAULT]).count();
        assert!(above * 10 < levels.len(), "{above} of {levels:?}");
        assert!(
            levels.iter().all(|l| *l <= LEVELS[DEFAULT + 1]),
            "{levels:?}"
        );
    }

    #[test]
    fn a_reader_that_is_the_bottleneck_whatever_the_level_is_not_given_stronger_ones() {
        let mut adapt = Adapt::default();
        // The sink waits, and the log goes through as fast at any level.
        let levels = run(&mut adapt, 200, |_| held_up(400e6));
        let above = levels.iter().filter(|l| **l > LEVELS[DEFAULT]).count();
        assert!(above * 10 < levels.len(), "{above} of {levels:?}");
    }

    #[test]
    fn a_producer_faster_than_the_compressor_lowers_the_level_and_a_quiet_one_restores_it() {
        let mut adapt = Adapt::default();
        let burst = Window {
            elapsed: Duration::from_millis(5),
            bytes: WINDOW_BYTES,
            full_read_bytes: WINDOW_BYTES,
            waited_on_sink: Duration::ZERO,
        };
        for _ in 0..LEVELS.len() {
            adapt.next_level(&burst);
        }
        assert_eq!(adapt.level(), LEVELS[0]);
        let quiet = Window {
            elapsed: WINDOW_TIME,
            bytes: 3_000,
            full_read_bytes: 0,
            waited_on_sink: Duration::ZERO,
        };
        for _ in 0..LEVELS.len() {
            adapt.next_level(&quiet);
        }
        assert_eq!(adapt.level(), LEVELS[DEFAULT]);
    }

    #[test]
    fn windows_close_on_bytes_or_time() {
        assert!(!Window::default().is_due());
        assert!(Window {
            bytes: WINDOW_BYTES,
            ..Window::default()
        }
        .is_due());
        assert!(Window {
            elapsed: WINDOW_TIME,
            ..Window::default()
        }
        .is_due());
    }
}
