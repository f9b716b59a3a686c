//! The fatal-error signal: how any component stops the whole pipeline.
//!
//! A component that cannot go on (the store failed, the writer lost its
//! batch) raises [`Fatal`] with a reason; the pipeline's supervisor waits on
//! it, stops taking messages, and exits with that reason. Only the first
//! reason is kept. [`spawn`] starts orderly's threads so that a panic in
//! one raises it too. This module owns nothing else, so every layer can
//! import it without importing the pipeline.

use std::sync::{Arc, Mutex};

/// Locks `m`, even if a thread panicked while holding it: a panic on an
/// orderly thread raises [`Fatal`] already, and the data behind these locks
/// (maps and counters) stays usable for the shutdown that follows.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A condition that stops the pipeline (the store failed, for example).
#[derive(Debug, Default)]
pub struct Fatal {
    reason: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    /// Raises the condition; the first reason is kept.
    pub fn raise(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::error!(%reason, "pipeline cannot continue");
            *r = Some(reason);
        }
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// The reason, if raised.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves once raised.
    pub async fn raised(&self) -> String {
        loop {
            if let Some(r) = self.reason() {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// Starts one of orderly's threads. A panic in it raises `fatal` with the
/// thread's name and message, so the pipeline stops and says why instead of
/// living on without that thread (a process that answers its probes but
/// consumes nothing).
pub fn spawn(
    name: &str,
    fatal: &Arc<Fatal>,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (fatal, thread) = (fatal.clone(), name.to_owned());
    std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            fatal.raise(format!(
                "the {thread} thread panicked ({what}); stopping rather than running without it"
            ));
        }
    })
}
