//! Fail points: named places in the commit path that tests can make fail.
//!
//! Set `ORDERLY_FAILPOINTS="name=action[@n[..m]],..."` before start.
//! `action` is `exit` (the process exits at once with code 86, as a crash
//! would, without flushing or committing anything), `error` (the step
//! returns an error) or `sleep(MS)` (the step waits MS milliseconds, as a
//! slow broker or disk would). `@n` fires on the n-th hit instead of the first;
//! `@n..m` on every hit from the n-th to the m-th. With the variable unset
//! every check is a lookup in an empty map.
//!
//! The points exist only in builds with the `failpoints` feature (the tests
//! turn it on); elsewhere [`hit`] is an empty inline function, and a set
//! `ORDERLY_FAILPOINTS` is reported once and ignored.

use crate::store::StoreError;
#[cfg(feature = "failpoints")]
use std::collections::HashMap;
#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// The exit code of a process stopped by an `exit` fail point.
pub const EXIT_CODE: i32 = 86;

#[cfg(feature = "failpoints")]
#[derive(Debug)]
struct Point {
    action: Action,
    from: u64,
    to: u64,
    hits: AtomicU64,
}

#[cfg(feature = "failpoints")]
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Exit,
    Error,
    Sleep(u64),
}

#[cfg(feature = "failpoints")]
static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

#[cfg(feature = "failpoints")]
fn points() -> &'static HashMap<String, Point> {
    POINTS.get_or_init(|| {
        let mut out = HashMap::new();
        let Ok(spec) = std::env::var("ORDERLY_FAILPOINTS") else {
            return out;
        };
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let Some((name, rest)) = item.split_once('=') else {
                continue;
            };
            let (action, from, to) = match rest.split_once('@') {
                Some((a, range)) => match range.split_once("..") {
                    Some((f, t)) => (a, f.parse().unwrap_or(1), t.parse().unwrap_or(u64::MAX)),
                    None => {
                        let n = range.parse().unwrap_or(1);
                        (a, n, n)
                    }
                },
                None => (rest, 1, 1),
            };
            let action = match action {
                "exit" => Action::Exit,
                "error" => Action::Error,
                a => match a
                    .strip_prefix("sleep(")
                    .and_then(|a| a.strip_suffix(')'))
                    .and_then(|ms| ms.parse().ok())
                {
                    Some(ms) => Action::Sleep(ms),
                    None => continue,
                },
            };
            out.insert(
                name.to_owned(),
                Point {
                    action,
                    from,
                    to,
                    hits: AtomicU64::new(0),
                },
            );
        }
        out
    })
}

/// Passes a fail point.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) -> Result<(), StoreError> {
    let points = points();
    if points.is_empty() {
        return Ok(());
    }
    let Some(p) = points.get(name) else {
        return Ok(());
    };
    let hit = p.hits.fetch_add(1, Relaxed) + 1;
    if hit < p.from || hit > p.to {
        return Ok(());
    }
    match p.action {
        Action::Exit => {
            eprintln!("fail point {name} fired: exiting");
            std::process::exit(EXIT_CODE)
        }
        Action::Error => Err(StoreError::FailPoint(name)),
        Action::Sleep(ms) => {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(())
        }
    }
}

/// Passes a fail point: in a build without the `failpoints` feature there
/// are none, so this does nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) -> Result<(), StoreError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        if std::env::var_os("ORDERLY_FAILPOINTS").is_some() {
            tracing::warn!("ORDERLY_FAILPOINTS is set, but this build has no fail points (build with --features failpoints); ignored");
        }
    });
    Ok(())
}
