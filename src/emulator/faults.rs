//! Faults the emulator injects on its Lambda side, on purpose and at random
//! ([`LambdaFaults`] says how often, from a seed), so that the invoker's
//! accounting can be tested against what Lambda does rarely: throttles,
//! server errors, an agent killed mid-stream, a dropped connection, a
//! function error, a stream that stalls. [`FaultInjector`] draws one fault
//! (or none) per invocation and counts the faults that actually fired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::{RngExt, SeedableRng};

/// How often each fault is injected: each rate is the share (0 to 1) of
/// invocations that get it; at most one fault per invocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambdaFaults {
    /// Seed of the generator, so that a failing soak can be replayed.
    pub seed: u64,
    /// Answered 429 `TooManyRequestsException` before anything runs.
    pub throttle: f64,
    /// Answered 500 `ServiceException` before anything runs.
    pub server_error: f64,
    /// The environment (the agent and its command) is killed at a random
    /// byte of the response stream.
    pub kill_agent: f64,
    /// The invoker's connection is dropped at a random byte; the function
    /// goes on, as on Lambda.
    pub drop_connection: f64,
    /// The stream ends at a random byte with a function error.
    pub function_error: f64,
    /// The stream stalls at a random byte for [`LambdaFaults::stall_for`]
    /// (longer than the SDK's stalled-stream grace), then goes on.
    pub stall: f64,
    /// How long a stall lasts.
    pub stall_for: Duration,
    /// The random byte is drawn from `0..byte_range` of the function's
    /// response; a response shorter than the byte drawn escapes the fault.
    pub byte_range: u64,
}

impl Default for LambdaFaults {
    /// No faults.
    fn default() -> Self {
        LambdaFaults {
            seed: 0,
            throttle: 0.0,
            server_error: 0.0,
            kill_agent: 0.0,
            drop_connection: 0.0,
            function_error: 0.0,
            stall: 0.0,
            stall_for: Duration::from_secs(25),
            byte_range: 4096,
        }
    }
}

impl LambdaFaults {
    /// True when no fault is ever injected.
    pub fn is_off(&self) -> bool {
        self.rates().iter().all(|(_, rate)| *rate <= 0.0)
    }

    fn rates(&self) -> [(FaultKind, f64); 6] {
        [
            (FaultKind::Throttle, self.throttle),
            (FaultKind::ServerError, self.server_error),
            (FaultKind::KillAgent, self.kill_agent),
            (FaultKind::DropConnection, self.drop_connection),
            (FaultKind::FunctionError, self.function_error),
            (FaultKind::Stall, self.stall),
        ]
    }
}

/// The kinds of fault, in the order [`FaultCounts`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// 429 before anything runs.
    Throttle,
    /// 500 before anything runs.
    ServerError,
    /// The environment killed mid-stream.
    KillAgent,
    /// The connection dropped mid-stream.
    DropConnection,
    /// A function error mid-stream.
    FunctionError,
    /// A stall mid-stream.
    Stall,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Throttle,
        FaultKind::ServerError,
        FaultKind::KillAgent,
        FaultKind::DropConnection,
        FaultKind::FunctionError,
        FaultKind::Stall,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Throttle => "throttle (429)",
            FaultKind::ServerError => "server error (500)",
            FaultKind::KillAgent => "agent killed mid-stream",
            FaultKind::DropConnection => "connection dropped mid-stream",
            FaultKind::FunctionError => "function error mid-stream",
            FaultKind::Stall => "stream stalled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The fault one invocation gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answered with an error before anything runs.
    Refuse(FaultKind),
    /// Something happens at byte `at` of the response.
    AtByte {
        /// What happens.
        kind: FaultKind,
        /// Where in the function's response it happens.
        at: u64,
    },
}

/// Faults fired so far, by kind (indexed as [`FaultKind::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts(pub [u64; 6]);

impl FaultCounts {
    /// How many of `kind` fired.
    pub fn of(&self, kind: FaultKind) -> u64 {
        self.0[kind.index()]
    }

    /// How many fired in all.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Draws and counts faults for one emulator.
#[derive(Debug)]
pub struct FaultInjector {
    /// The rates it draws with.
    pub config: LambdaFaults,
    rng: Mutex<rand::rngs::StdRng>,
    fired: [AtomicU64; 6],
}

impl FaultInjector {
    /// An injector drawing with `config`'s rates from its seed.
    pub fn new(config: LambdaFaults) -> Self {
        FaultInjector {
            config,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(config.seed)),
            fired: Default::default(),
        }
    }

    /// The fault of the next invocation, if any.
    pub fn draw(&self) -> Option<Fault> {
        if self.config.is_off() {
            return None;
        }
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut roll: f64 = rng.random();
        for (kind, rate) in self.config.rates() {
            if roll < rate {
                return Some(match kind {
                    FaultKind::Throttle | FaultKind::ServerError => Fault::Refuse(kind),
                    kind => Fault::AtByte {
                        kind,
                        at: rng.random_range(0..self.config.byte_range.max(1)),
                    },
                });
            }
            roll -= rate;
        }
        None
    }

    /// Counts a fault that took effect.
    pub fn fired(&self, kind: FaultKind) {
        self.fired[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The faults that took effect so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts(std::array::from_fn(|i| {
            self.fired[i].load(Ordering::Relaxed)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_faults_at_about_the_rates_asked() {
        let config = LambdaFaults {
            seed: 7,
            throttle: 0.1,
            kill_agent: 0.2,
            ..LambdaFaults::default()
        };
        let draws = |injector: FaultInjector| -> Vec<Option<Fault>> {
            (0..10_000).map(|_| injector.draw()).collect()
        };
        let a = draws(FaultInjector::new(config));
        assert_eq!(a, draws(FaultInjector::new(config)));
        let throttles = a
            .iter()
            .filter(|f| **f == Some(Fault::Refuse(FaultKind::Throttle)))
            .count();
        let kills = a
            .iter()
            .filter(|f| matches!(f, Some(Fault::AtByte { kind: FaultKind::KillAgent, at }) if *at < 4096))
            .count();
        assert!((800..1200).contains(&throttles), "{throttles}");
        assert!((1700..2300).contains(&kills), "{kills}");
        assert_eq!(a.iter().flatten().count(), throttles + kills);
    }

    #[test]
    fn no_rates_no_faults() {
        let injector = FaultInjector::new(LambdaFaults::default());
        assert!((0..1000).all(|_| injector.draw().is_none()));
    }
}
