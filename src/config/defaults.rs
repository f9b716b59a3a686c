//! The defaults of the top-level knobs, each a named `const fn` with why
//! its value was chosen.

/// Default most live entity actors.
///
/// An actor with its record took about 10 KB in the `max` benchmark (RSS
/// over live actors), and the live actors are a cache of decoded records in
/// front of sled's cache of leaves. In a keyspace of millions nearly every
/// event is the first of its entity for a long while, so an actor is
/// started, used once and passivated: 50,000 of them (the default until
/// 2026-12-05) held about 250 MiB more than 5,000 in a 150 s `soak` (858
/// against 605 MiB of RSS) that no later event used. 10,000 keep a hot set
/// of that size decoded (Zipf 1.2 over 100,000 keys ran as fast with 5,000
/// as with 50,000), and leave the memory to sled's cache, which serves the
/// writes of new keys as well as reads ([`default_store_cache_mb`];
/// BENCHMARKS.md, "Where the soak's CPU goes as it runs").
pub const fn default_max_actors() -> usize {
    10_000
}

/// Default sled page cache, in MiB.
///
/// Past the cache, every write of a key new to the store pages its leaf in
/// from sled's log (a read and a decode of up to 16 records), and so does
/// every read of a record not cached: the cost that grows as the store
/// grows. 384 MiB, with the memory [`default_max_actors`] no longer holds,
/// took 3% less CPU over a whole `soak` and stayed within its 1.5 GiB
/// (1,419 MiB); 512 MiB passed that bound (1,550 MiB) as the store grew.
pub const fn default_store_cache_mb() -> u64 {
    384
}

/// Default memory budget of live entity actors' records, in MiB.
///
/// Records of about 1 KB (the `max` benchmark's) fill it only past 250,000
/// actors, so `max_actors` is the bound that acts for them; records of
/// hundreds of KB (large payloads in the state and the log) are bounded by
/// this one instead.
pub const fn default_actors_mb() -> u64 {
    256
}

/// Default most events a parked entity holds.
///
/// Parking is for an operator to look at within hours; 10,000 events of a
/// few hundred bytes keep the record under a few MB, within a changelog
/// message with `message.max.bytes` raised for it.
pub const fn default_max_held_events() -> usize {
    10_000
}

/// Default in-flight byte high mark, in MiB.
///
/// [`default_in_flight_high`] events of about 400 B, each with a 1 KB
/// record copy, take about 23 MiB: the count mark acts first for them.
/// Messages of hundreds of KB are bounded by this one: about 128 events of
/// 1 MiB.
pub const fn default_in_flight_mb_high() -> u64 {
    128
}

/// Default librdkafka statistics interval.
///
/// Consumer lag is a slow signal next to a 15 s Prometheus scrape; 5 s keeps
/// it fresh without noticeable cost in the client.
pub const fn default_stats_interval_ms() -> u64 {
    5_000
}

/// Default most write intents per store batch.
pub const fn default_batch_max() -> usize {
    // Large enough that one fsync covers thousands of events at full speed,
    // small enough that a batch's intents stay in cache.
    4096
}

/// Default in-flight high mark: four store batches of the default size
/// ([`default_batch_max`]).
///
/// An event in flight costs more than its message: in a keyspace of
/// millions nearly every one starts an actor, which lives until the
/// event's write is durable (a task of a few KB, the decoded record and
/// its copy for the writer). Behind a backlog, 50,000 in flight (the
/// default until 2026-12-05) held about 40,000 actors and 315 MiB more RSS
/// than 16,384 in a `soak` at 20,000 events/s (1,194 against 879 MiB),
/// and orderly drained as fast (18.5k and 18.8k events/s; 8,192: 18.5k),
/// with its own p99 (received → durable) 1.1 s instead of 3.2 s. The
/// engine alone (`max --engine-only`, a million keys) ran as fast with
/// each. A deeper mark also keeps more actors alive, so that an entity's
/// next event may find its record decoded instead of reading it back from
/// sled; [`default_max_actors`] is the knob for that (BENCHMARKS.md, "What
/// an event in flight holds").
pub const fn default_in_flight_high() -> usize {
    4 * default_batch_max()
}

/// Default log retention per entity.
pub const fn default_retention_events() -> usize {
    // Late events usually trail by a handful of events; 32 keeps records
    // small (one record per entity, rewritten per batch) while covering that.
    32
}

/// Default passivation timeout.
pub const fn default_idle_timeout_ms() -> u64 {
    // A minute: hot entities stay in memory, the long tail does not.
    60_000
}
