//! Requests to stop, counted: [`Shutdown`] listens to a source of signals
//! (SIGINT and SIGTERM from the OS, or a [`Trigger`] in tests) and lets any
//! number of waiters await the first, second, ... request. Every part that
//! stops on a signal (the invoker, the emulator, the MicroVM agent) goes
//! through it, so that signals are handled in one place and tests can raise
//! them without touching the process.

use futures::{Stream, StreamExt};
use tokio::sync::watch;

/// A request to stop, as the OS delivers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C, or the first thing a cancelled CI job sends.
    Interrupt,
    /// SIGTERM: what a supervisor sends (a cancelled workflow's runner sends
    /// it a few seconds after SIGINT).
    Terminate,
}

impl Signal {
    /// The signal's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// How many stop requests arrived, and the last one; cheap to clone, every
/// clone sees the same requests.
#[derive(Debug, Clone)]
pub struct Shutdown {
    received: watch::Receiver<(u32, Option<Signal>)>,
}

/// Raises stop requests by hand: the injectable signal source for tests,
/// and the way an in-process caller stops a server.
#[derive(Debug, Clone)]
pub struct Trigger {
    sender: watch::Sender<(u32, Option<Signal>)>,
}

impl Trigger {
    /// Delivers `signal` to every [`Shutdown`] made with this trigger.
    pub fn raise(&self, signal: Signal) {
        self.sender
            .send_modify(|(count, last)| (*count, *last) = (*count + 1, Some(signal)));
    }
}

impl Shutdown {
    /// A shutdown raised only through the returned [`Trigger`].
    pub fn manual() -> (Shutdown, Trigger) {
        let (sender, received) = watch::channel((0, None));
        (Shutdown { received }, Trigger { sender })
    }

    /// A shutdown fed by `source`, read by a task of its own until it ends.
    /// Must be called inside a tokio runtime.
    pub fn from_source(source: impl Stream<Item = Signal> + Send + 'static) -> Shutdown {
        let (shutdown, trigger) = Shutdown::manual();
        tokio::spawn(async move {
            let mut source = std::pin::pin!(source);
            while let Some(signal) = source.next().await {
                trigger.raise(signal);
            }
        });
        shutdown
    }

    /// A shutdown fed by this process's SIGINT and SIGTERM. From now on
    /// these signals no longer end the process by themselves: whoever holds
    /// the shutdown decides.
    pub fn from_os() -> std::io::Result<Shutdown> {
        Ok(Shutdown::from_source(os_signals()?))
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> u32 {
        self.received.borrow().0
    }

    /// The last request that arrived, if any.
    pub fn last(&self) -> Option<Signal> {
        self.received.borrow().1
    }

    /// Resolves once at least `n` requests arrived (at once if they did);
    /// never resolves if the source ends before.
    pub async fn requests(&self, n: u32) -> Signal {
        let mut received = self.received.clone();
        let last = match received.wait_for(|(count, _)| *count >= n).await {
            Ok(state) => state.1,
            Err(_) => None,
        };
        match last {
            Some(signal) => signal,
            None => std::future::pending().await,
        }
    }

    /// Resolves at the first request.
    pub async fn requested(&self) -> Signal {
        self.requests(1).await
    }
}

/// SIGINT and SIGTERM of this process, in the order they arrive.
fn os_signals() -> std::io::Result<impl Stream<Item = Signal> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    Ok(futures::stream::unfold(
        handlers,
        |(mut int, mut term)| async move {
            let signal = tokio::select! {
                Some(()) = int.recv() => Signal::Interrupt,
                Some(()) = term.recv() => Signal::Terminate,
                else => return None,
            };
            Some((signal, (int, term)))
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_each_request_in_turn() {
        let (shutdown, trigger) = Shutdown::manual();
        let first = tokio::spawn({
            let s = shutdown.clone();
            async move { s.requested().await }
        });
        let second = tokio::spawn({
            let s = shutdown.clone();
            async move { s.requests(2).await }
        });
        trigger.raise(Signal::Interrupt);
        assert_eq!(first.await.unwrap(), Signal::Interrupt);
        assert!(!second.is_finished());
        trigger.raise(Signal::Terminate);
        assert_eq!(second.await.unwrap(), Signal::Terminate);
        assert_eq!(shutdown.count(), 2);
        // A late waiter for a request already made resolves at once.
        assert_eq!(shutdown.requested().await, Signal::Terminate);
    }

    #[tokio::test]
    async fn a_stream_of_signals_feeds_the_shutdown() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown =
            Shutdown::from_source(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        assert_eq!(shutdown.count(), 0);
        tx.send(Signal::Terminate).unwrap();
        assert_eq!(shutdown.requested().await, Signal::Terminate);
        assert_eq!(shutdown.last(), Some(Signal::Terminate));
    }
}
