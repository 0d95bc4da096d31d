//! The last bytes a sandboxed process printed: the `LogResult` of a function
//! environment, the failure reason of a microVM that would not start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;

/// Bytes read at a time from a followed pipe.
const FOLLOW_BUFFER: usize = 512;

/// A bounded buffer of a process's latest output, shared with its readers.
#[derive(Clone)]
pub struct OutputTail {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl OutputTail {
    /// A tail keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        OutputTail {
            // Grown as output comes: most environments print little or nothing.
            bytes: Arc::new(Mutex::new(VecDeque::new())),
            capacity,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&self, bytes: &[u8]) {
        let mut tail = self.bytes.lock().expect("lock poisoned");
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(self.capacity);
        tail.drain(..excess);
    }

    /// Forgets everything kept so far.
    pub fn clear(&self) {
        self.bytes.lock().expect("lock poisoned").clear();
    }

    /// What is kept now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .expect("lock poisoned")
            .iter()
            .copied()
            .collect()
    }

    /// Follows `child`'s stdout and stderr, line by line, into the tail and
    /// the debug log under `label`; the tasks end at EOF.
    pub fn follow(&self, child: &mut Child, label: &str) -> Vec<JoinHandle<()>> {
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        ];
        pipes
            .into_iter()
            .flatten()
            .map(|pipe| {
                let tail = self.clone();
                let label = label.to_string();
                tokio::spawn(async move {
                    // A small buffer: a thousand environments in flight each
                    // follow two pipes, and a longer line just takes more reads.
                    let mut lines = BufReader::with_capacity(FOLLOW_BUFFER, pipe).split(b'\n');
                    while let Ok(Some(line)) = lines.next_segment().await {
                        tracing::debug!(source = %label, "{}", String::from_utf8_lossy(&line));
                        tail.push(&line);
                        tail.push(b"\n");
                    }
                })
            })
            .collect()
    }
}
