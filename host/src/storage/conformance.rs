//! The backend-conformance suite: every test runs against every backend.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::memory::MemoryBackend;
use super::redb::RedbBackend;
use super::store::{NS_DATA, NS_EXPIRY};
use super::{Backend, Entry, NewValue, StorageError, Store};

struct Fixture {
    store: Store,
    /// The store's backend, to look at its raw records.
    backend: Arc<dyn Backend>,
    clock: Arc<AtomicU64>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn advance(&self, ms: u64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    fn put(&self, key: &str, value: &str, expires_at: u64) -> u64 {
        let (k, v) = (key.as_bytes().to_vec(), value.as_bytes().to_vec());
        self.store
            .write_blocking(move |ctx| ctx.put(&k, 0, &v, expires_at))
            .expect("commit")
            .expect("put")
    }

    /// Appends `tail` to the value under `key` (or starts it) with
    /// [`super::WriteCtx::update`], expiring at `expires_at`; returns what
    /// the update saw and the new version.
    fn append(&self, key: &str, tail: &str, expires_at: u64) -> (Option<Vec<u8>>, u64) {
        let (k, tail) = (key.as_bytes().to_vec(), tail.as_bytes().to_vec());
        let (version, seen) = self
            .store
            .write_blocking(move |ctx| {
                ctx.update(&k, |current| -> Result<_, StorageError> {
                    let seen = current.map(|e| e.value);
                    let mut value = seen.clone().unwrap_or_default();
                    value.extend_from_slice(&tail);
                    let new = NewValue {
                        kind: 0,
                        expires_at,
                        value,
                    };
                    Ok((new, seen))
                })
            })
            .expect("commit")
            .expect("engine")
            .expect("change");
        (seen, version)
    }

    /// The raw records of the expiry index.
    fn expiry_index_len(&self) -> usize {
        let mut n = 0;
        self.backend
            .snapshot()
            .expect("snapshot")
            .scan(
                Bound::Included(&[NS_EXPIRY]),
                Bound::Excluded(&[NS_EXPIRY + 1]),
                false,
                &mut |_, _| {
                    n += 1;
                    true
                },
            )
            .expect("scan");
        n
    }

    fn get(&self, key: &str) -> Option<Entry> {
        self.store
            .snapshot()
            .expect("snapshot")
            .get(key.as_bytes())
            .expect("get")
    }

    fn keys(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>, reverse: bool) -> Vec<String> {
        let mut out = Vec::new();
        self.store
            .snapshot()
            .expect("snapshot")
            .scan(lower, upper, reverse, &mut |k, _| {
                out.push(String::from_utf8_lossy(k).into_owned());
                true
            })
            .expect("scan");
        out
    }

    fn delete(&self, key: &str) -> bool {
        let k = key.as_bytes().to_vec();
        self.store
            .write_blocking(move |ctx| ctx.delete(&k))
            .expect("commit")
            .expect("delete")
    }

    fn gc(&self) -> super::GcStats {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(self.store.gc())
            .expect("gc")
    }
}

fn memory() -> Fixture {
    with_backend(Arc::new(MemoryBackend::new()), None)
}

fn redb() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = RedbBackend::open(dir.path()).expect("open redb");
    with_backend(Arc::new(backend), Some(dir))
}

/// One backend of each kind, for a test that opens its own stores on them
/// (the redb one in `dir`).
fn both_backends(dir: &std::path::Path) -> Vec<Arc<dyn Backend>> {
    vec![
        Arc::new(MemoryBackend::new()),
        Arc::new(RedbBackend::open(dir).expect("open redb")),
    ]
}

fn with_backend(backend: Arc<dyn Backend>, dir: Option<tempfile::TempDir>) -> Fixture {
    let clock = Arc::new(AtomicU64::new(1_000_000));
    let store = Store::open_with_manual_clock(backend.clone(), clock.clone()).expect("open store");
    Fixture {
        store,
        backend,
        clock,
        _dir: dir,
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_memory { $( #[test] fn $name() { super::$name(super::memory()); } )* }
        mod on_redb { $( #[test] fn $name() { super::$name(super::redb()); } )* }
    };
}

conformance!(
    put_then_get_returns_kind_value_and_version,
    versions_increase_with_every_write,
    scan_is_ordered_bounded_and_reversible,
    scan_stops_when_the_visitor_says_so,
    expired_entries_vanish_at_once_and_gc_reclaims_them,
    rewriting_a_key_moves_its_expiry,
    rewrites_keep_the_expiry_index_exact,
    delete_reports_whether_the_key_was_live,
    failed_job_in_a_batch_leaves_the_others_committed,
    many_concurrent_writers_never_lose_an_increment,
    purge_prefix_removes_only_that_prefix,
    backup_and_restore_round_trip,
    incremental_backup_carries_deletes_and_new_writes,
    an_increment_deletes_a_prefix_of_more_keys_than_a_chunk,
    an_increment_removes_what_an_expired_overwrite_replaced,
    a_restored_store_refuses_backups_from_before_its_restore,
    an_increment_from_before_a_later_restore_is_refused,
    a_restored_store_written_to_since_refuses_the_next_increment,
    a_clean_up_with_nothing_to_do_commits_nothing,
    restore_refuses_a_gap_in_the_chain,
    an_increment_of_a_restored_copy_does_not_continue_the_original_chain,
    writes_after_close_are_refused,
    update_reads_the_live_entry_and_writes_a_new_version,
    a_failed_update_changes_nothing,
    an_update_over_a_corrupt_record_aborts_its_batch,
    updates_keep_the_expiry_index_exact,
    updates_that_outgrow_their_page_keep_the_tree_whole,
    many_concurrent_updates_never_lose_an_increment,
);

fn put_then_get_returns_kind_value_and_version(f: Fixture) {
    assert_eq!(f.get("a"), None);
    let v = f.put("a", "1", 0);
    let e = f.get("a").expect("present");
    assert_eq!((e.kind, e.value.as_slice(), e.version), (0, &b"1"[..], v));
}

fn versions_increase_with_every_write(f: Fixture) {
    let a = f.put("a", "1", 0);
    let b = f.put("b", "1", 0);
    let c = f.put("a", "2", 0);
    assert!(a < b && b < c);
}

fn scan_is_ordered_bounded_and_reversible(f: Fixture) {
    for k in ["b", "a", "c", "ab", "d"] {
        f.put(k, "x", 0);
    }
    assert_eq!(
        f.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["a", "ab", "b", "c", "d"]
    );
    assert_eq!(
        f.keys(Bound::Excluded(b"a"), Bound::Excluded(b"d"), false),
        ["ab", "b", "c"]
    );
    assert_eq!(
        f.keys(Bound::Included(b"a"), Bound::Included(b"c"), true),
        ["c", "b", "ab", "a"]
    );
    assert!(
        f.keys(Bound::Included(b"z"), Bound::Excluded(b"a"), false)
            .is_empty()
    );
}

fn scan_stops_when_the_visitor_says_so(f: Fixture) {
    for k in ["a", "b", "c"] {
        f.put(k, "x", 0);
    }
    let mut seen = 0;
    f.store
        .snapshot()
        .expect("snapshot")
        .scan(Bound::Unbounded, Bound::Unbounded, false, &mut |_, _| {
            seen += 1;
            seen < 2
        })
        .expect("scan");
    assert_eq!(seen, 2);
}

fn expired_entries_vanish_at_once_and_gc_reclaims_them(f: Fixture) {
    let now = f.store.now_ms();
    f.put("short", "x", now + 1000);
    f.put("long", "x", now + 60_000);
    f.put("forever", "x", 0);
    assert!(f.get("short").is_some());
    f.advance(1000);
    assert_eq!(f.get("short"), None, "expired exactly at expires_at");
    assert_eq!(
        f.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["forever", "long"]
    );
    let stats = f.gc();
    assert_eq!(stats.expired, 1);
    assert_eq!(f.gc().expired, 0, "nothing left to reclaim");
    assert!(f.get("long").is_some());
}

fn rewriting_a_key_moves_its_expiry(f: Fixture) {
    let now = f.store.now_ms();
    f.put("k", "x", now + 1000);
    f.put("k", "y", 0);
    f.advance(2000);
    assert_eq!(f.gc().expired, 0);
    assert_eq!(f.get("k").expect("kept").value, b"y");
}

/// Every write keeps exactly one index record per key with an expiry, none
/// for a key without: a stale record would outlive the key's expiry.
fn rewrites_keep_the_expiry_index_exact(f: Fixture) {
    expiry_index_stays_exact(&f, |f, k, v, exp| {
        f.put(k, v, exp);
    });
}

/// `write` (key, value, expiry) keeps the expiry index exact.
fn expiry_index_stays_exact(f: &Fixture, write: impl Fn(&Fixture, &str, &str, u64)) {
    let now = f.store.now_ms();
    write(f, "k", "a", now + 1000);
    assert_eq!(f.expiry_index_len(), 1);
    write(f, "k", "b", now + 5000);
    assert_eq!(f.expiry_index_len(), 1, "moved");
    write(f, "k", "c", now + 5000);
    assert_eq!(f.expiry_index_len(), 1, "same expiry");
    write(f, "other", "d", now + 5000);
    assert_eq!(f.expiry_index_len(), 2, "one per key");
    write(f, "k", "e", 0);
    assert_eq!(f.expiry_index_len(), 1, "expiry dropped");
    write(f, "k", "f", now + 1000);
    assert_eq!(f.expiry_index_len(), 2, "expiry set again");
    assert!(f.delete("k"));
    assert!(f.delete("other"));
    assert_eq!(f.expiry_index_len(), 0, "deleted");
}

fn delete_reports_whether_the_key_was_live(f: Fixture) {
    f.put("k", "x", 0);
    assert!(f.delete("k"));
    assert!(!f.delete("k"));
    assert_eq!(f.get("k"), None);
}

fn failed_job_in_a_batch_leaves_the_others_committed(f: Fixture) {
    // A job that decides not to write (its own error) must not disturb others.
    let refused = f
        .store
        .write_blocking(|ctx| -> Result<(), &'static str> {
            if ctx.get(b"missing").expect("get").is_none() {
                return Err("refused");
            }
            Ok(())
        })
        .expect("commit");
    assert_eq!(refused, Err("refused"));
    f.put("k", "v", 0);
    assert!(f.get("k").is_some());
}

/// `threads` threads each grow the value under `n` by one byte `each` times,
/// a read-modify-write per job; returns the final length.
fn grow_concurrently(store: &Store, threads: usize, each: usize) -> usize {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..each {
                    store
                        .write_blocking(|ctx| {
                            let n = ctx.get(b"n")?.map_or(0, |e| e.value.len());
                            ctx.put(b"n", 0, &vec![b'x'; n + 1], 0)
                        })
                        .expect("commit")
                        .expect("put");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let n = store.snapshot().expect("snapshot").get(b"n").expect("get");
    n.map_or(0, |e| e.value.len())
}

fn many_concurrent_writers_never_lose_an_increment(f: Fixture) {
    assert_eq!(grow_concurrently(&f.store, 8, 50), 400);
}

fn update_reads_the_live_entry_and_writes_a_new_version(f: Fixture) {
    let (seen, v1) = f.append("k", "ab", 0);
    assert_eq!(seen, None, "absent");
    let (seen, v2) = f.append("k", "cd", 0);
    assert_eq!(seen.as_deref(), Some(&b"ab"[..]));
    assert!(v2 > v1);
    let e = f.get("k").expect("present");
    assert_eq!((e.value.as_slice(), e.version), (&b"abcd"[..], v2));
    // Same length (in place) and shorter values too.
    let k = b"k".to_vec();
    for expected in [&b"wxyz"[..], b"z"] {
        let (k, value) = (k.clone(), expected.to_vec());
        f.store
            .write_blocking(move |ctx| {
                ctx.update(&k, |_| -> Result<_, StorageError> {
                    let new = NewValue {
                        kind: 7,
                        expires_at: 0,
                        value,
                    };
                    Ok((new, ()))
                })
            })
            .expect("commit")
            .expect("engine")
            .expect("change");
        let e = f.get("k").expect("present");
        assert_eq!((e.kind, e.value.as_slice()), (7, expected));
    }
    assert_eq!(f.get("k").expect("present").value, b"z");
    // Within a job, an update sees the job's own earlier write.
    let seen = f
        .store
        .write_blocking(|ctx| {
            ctx.put(b"q", 0, b"first", 0)?;
            ctx.update(b"q", |current| -> Result<_, StorageError> {
                let seen = current.map(|e| e.value);
                let new = NewValue {
                    kind: 0,
                    expires_at: 0,
                    value: b"second".to_vec(),
                };
                Ok((new, seen))
            })?
        })
        .expect("commit")
        .expect("update");
    assert_eq!(seen.1.as_deref(), Some(&b"first"[..]));
    assert_eq!(f.get("q").expect("present").value, b"second");
    let now = f.store.now_ms();
    f.put("gone", "old", now + 10);
    f.advance(20);
    let (seen, _) = f.append("gone", "new", 0);
    assert_eq!(seen, None, "an expired entry is not live");
    assert_eq!(f.get("gone").expect("present").value, b"new");
}

fn a_failed_update_changes_nothing(f: Fixture) {
    let v1 = f.put("k", "x", 0);
    let refused = f
        .store
        .write_blocking(|ctx| {
            ctx.update(b"k", |current| -> Result<(NewValue, ()), String> {
                Err(format!("saw {:?}", current.map(|e| e.value)))
            })
        })
        .expect("commit")
        .expect("engine");
    assert_eq!(refused, Err("saw Some([120])".to_owned()));
    let e = f.get("k").expect("kept");
    assert_eq!((e.value.as_slice(), e.version), (&b"x"[..], v1));
    // Nor on an absent or an expired key: they stay absent.
    let soon = f.store.now_ms() + 10;
    let v2 = f.put("e", "old", soon);
    f.advance(20);
    for key in [&b"absent"[..], b"e"] {
        let refused = f
            .store
            .write_blocking(move |ctx| {
                ctx.update(key, |current| -> Result<(NewValue, ()), bool> {
                    Err(current.is_none())
                })
            })
            .expect("commit")
            .expect("engine");
        assert_eq!(refused, Err(true), "saw no live entry");
    }
    assert_eq!(f.get("absent"), None);
    assert_eq!(f.get("e"), None);
    assert_eq!(f.expiry_index_len(), 1, "only the expired record's");
    // The failed updates took no version.
    assert_eq!(f.put("other", "y", 0), v2 + 1);
}

/// A corrupt record is not handed to the change: the batch is aborted and
/// nothing in it is written.
fn an_update_over_a_corrupt_record_aborts_its_batch(f: Fixture) {
    let mut dkey = vec![NS_DATA];
    dkey.extend_from_slice(b"bad");
    f.backend
        .write(true, &mut |raw| raw.put(&dkey, b"short"))
        .expect("raw write");
    // Were the change called, its error would leave the batch to commit.
    let result = f.store.write_blocking(move |ctx| {
        ctx.put(b"before", 0, b"x", 0)?;
        ctx.update(b"bad", |_| -> Result<(NewValue, ()), ()> { Err(()) })
    });
    assert!(result.is_err(), "the batch failed: {result:?}");
    assert_eq!(f.get("before"), None, "rolled back");
}

fn updates_keep_the_expiry_index_exact(f: Fixture) {
    expiry_index_stays_exact(&f, |f, k, v, exp| {
        f.append(k, v, exp);
    });
    let now = f.store.now_ms();
    // Over an expired entry that gc has not reclaimed: its index record goes.
    f.put("e", "old", now + 10);
    f.advance(20);
    f.append("e", "new", 0);
    assert_eq!(f.expiry_index_len(), 0, "expired record replaced");
    assert_eq!(f.gc().expired, 0);
    assert_eq!(f.get("e").expect("kept").value, b"new");
}

/// Values that grow past the room left in their page (redb rebuilds the
/// leaf) next to many others: every key keeps its own value.
fn updates_that_outgrow_their_page_keep_the_tree_whole(f: Fixture) {
    let keys: Vec<String> = (0..300).map(|i| format!("key-{i:04}")).collect();
    for k in &keys {
        f.put(k, "v", 0);
    }
    for round in 0..6 {
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 7 == round) {
            f.append(k, &"x".repeat(200 + i), 0);
        }
    }
    for (i, k) in keys.iter().enumerate() {
        let expected = if i % 7 < 6 { 1 + 200 + i } else { 1 };
        assert_eq!(f.get(k).expect("present").value.len(), expected, "{k}");
    }
    assert_eq!(
        f.keys(Bound::Unbounded, Bound::Unbounded, false).len(),
        keys.len()
    );
}

fn many_concurrent_updates_never_lose_an_increment(f: Fixture) {
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let store = f.store.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    store
                        .write_blocking(|ctx| {
                            ctx.update(b"n", |current| -> Result<_, StorageError> {
                                let n = current.map_or(0, |e| e.value.len());
                                let new = NewValue {
                                    kind: 0,
                                    expires_at: 0,
                                    value: vec![b'x'; n + 1],
                                };
                                Ok((new, ()))
                            })
                        })
                        .expect("commit")
                        .expect("engine")
                        .expect("change");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(f.get("n").expect("present").value.len(), 400);
}

fn purge_prefix_removes_only_that_prefix(f: Fixture) {
    for i in 0..2500 {
        f.put(&format!("b1/{i:05}"), "x", 0);
    }
    f.put("b2/keep", "x", 0);
    f.store
        .write_blocking(|ctx| ctx.purge_prefix(b"b1/"))
        .expect("commit")
        .expect("purge");
    let stats = f.gc();
    assert_eq!(stats.purged, 2500);
    assert_eq!(
        f.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["b2/keep"]
    );
}

fn backup_bytes(f: &Fixture, since: u64) -> (Vec<u8>, u64) {
    let backup = f.store.backup(since).expect("backup");
    let version = backup.info().version;
    let mut out = Vec::new();
    backup.write_to(&mut out).expect("write");
    (out, version)
}

fn all_entries(f: &Fixture) -> Vec<(Vec<u8>, Entry)> {
    let mut out = Vec::new();
    f.store
        .snapshot()
        .expect("snapshot")
        .scan(Bound::Unbounded, Bound::Unbounded, false, &mut |k, e| {
            out.push((k.to_vec(), e));
            true
        })
        .expect("scan");
    out
}

fn backup_and_restore_round_trip(f: Fixture) {
    let now = f.store.now_ms();
    f.put("a", "1", 0);
    f.put("b", "2", now + 60_000);
    f.put("gone", "3", now + 10);
    f.advance(20);
    let (bytes, version) = backup_bytes(&f, 0);
    let target = memory();
    target
        .clock
        .store(f.clock.load(Ordering::SeqCst), Ordering::SeqCst);
    let info = target
        .store
        .restore(&mut bytes.as_slice())
        .expect("restore");
    assert_eq!(info.version, version);
    assert_eq!(all_entries(&target), all_entries(&f));
    // The restored store goes on numbering after the backup.
    assert!(target.put("c", "4", 0) > version);
}

/// A fresh redb store with the backup chain `links` restored into it.
fn restored_on_redb(links: &[&[u8]]) -> Fixture {
    let target = redb();
    for link in links {
        target.store.restore(&mut &link[..]).expect("restore");
    }
    target
}

fn incremental_backup_carries_deletes_and_new_writes(f: Fixture) {
    f.put("a", "1", 0);
    f.put("b", "2", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.delete("a");
    f.put("c", "3", 0);
    f.store
        .write_blocking(|ctx| ctx.purge_prefix(b"b"))
        .expect("commit")
        .expect("purge");
    let (incr, _) = backup_bytes(&f, v1);
    let target = restored_on_redb(&[&full, &incr]);
    f.gc();
    assert_eq!(all_entries(&target), all_entries(&f));
    assert_eq!(
        target.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["c"]
    );
}

/// A deleted bucket in an increment removes all its keys from the restored
/// store, however many chunks they take.
fn an_increment_deletes_a_prefix_of_more_keys_than_a_chunk(f: Fixture) {
    for i in 0..2500 {
        f.put(&format!("b1/{i:05}"), "x", 0);
    }
    f.put("b2/keep", "x", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.store
        .write_blocking(|ctx| ctx.purge_prefix(b"b1/"))
        .expect("commit")
        .expect("purge");
    let (incr, _) = backup_bytes(&f, v1);
    let target = restored_on_redb(&[&full, &incr]);
    assert_eq!(
        target.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["b2/keep"]
    );
}

/// A restored store keeps no tombstones of the deletes it applied, so a
/// backup of it from before its restored version is refused (it would miss
/// those deletes), while one from that version on, or a full one, works.
fn a_restored_store_refuses_backups_from_before_its_restore(f: Fixture) {
    f.put("k", "old", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.delete("k");
    f.put("other", "x", 0);
    let (incr, v2) = backup_bytes(&f, v1);
    let target = restored_on_redb(&[&full, &incr]);
    assert!(matches!(
        target.store.backup(v1),
        Err(StorageError::BackupTooOld { .. })
    ));
    target.store.backup(v2).expect("from the restored version");
    let (again, _) = backup_bytes(&target, 0);
    let copy = memory();
    copy.store
        .restore(&mut again.as_slice())
        .expect("full of the copy");
    assert_eq!(
        copy.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["other"]
    );
}

/// Found by a review: a restored directory opened by a server (which puts a
/// block of versions past the restored ones on disk), its own full backup,
/// then the source's next increment restored into it, then its own
/// increment from that full backup: the restored entries keep their
/// versions, below the full backup's, and the restore's deletes leave no
/// tombstone, so that increment missed both. It is refused; the restored
/// chain's continuation and a new full backup still work.
fn an_increment_from_before_a_later_restore_is_refused(f: Fixture) {
    f.put("x", "1", 0);
    f.put("d", "1", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.put("x", "2", 0);
    f.delete("d");
    let (incr, v2) = backup_bytes(&f, v1);
    let target = memory();
    target.store.restore(&mut full.as_slice()).expect("full");
    target.store.close().expect("close");
    let reopened = Store::open_with_manual_clock(target.backend.clone(), target.clock.clone())
        .expect("reopen");
    let own_full = reopened.backup(0).expect("own full").info().version;
    assert!(own_full > v2, "the reopened store's versions went on");
    reopened.restore(&mut incr.as_slice()).expect("increment");
    assert!(matches!(
        reopened.backup(own_full),
        Err(StorageError::BackupBeforeRestore { .. })
    ));
    reopened.backup(v2).expect("the restored chain goes on");
    let again = reopened.backup(0).expect("full");
    let version = again.info().version;
    assert!(version > own_full);
    reopened
        .backup(version)
        .expect("from a full backup after the restore");
}

/// An increment is refused by a restored directory that was written to
/// since its restore (it no longer holds what the increment continues), and
/// taken by one that was only read.
fn a_restored_store_written_to_since_refuses_the_next_increment(f: Fixture) {
    f.put("k", "old", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.put("k", "new", 0);
    let (incr, _) = backup_bytes(&f, v1);
    let read_only = restored_on_redb(&[&full]);
    assert!(read_only.get("k").is_some());
    read_only
        .store
        .restore(&mut incr.as_slice())
        .expect("taken");
    assert_eq!(read_only.get("k").expect("k").value, b"new");
    for change in ["put", "delete", "delete, its tombstone forgotten"] {
        let written = restored_on_redb(&[&full]);
        if change == "put" {
            written.put("local", "x", 0);
        } else {
            assert!(written.delete("k"));
        }
        if change.ends_with("forgotten") {
            // Past the tombstones' retention: the deletion leaves no trace
            // but the backup horizon (found by a review).
            written.advance(super::store::TOMBSTONE_RETENTION_MS + 1);
            assert_eq!(written.gc().tombstones, 1);
        }
        let refused = written.store.restore(&mut incr.as_slice());
        assert!(
            matches!(&refused, Err(StorageError::Restore(m)) if m.contains("written to after its restore")),
            "{change}: {refused:?}"
        );
    }
}

/// Found by a review: a server that opened a directory and never wrote to
/// it raised its version counter anyway (a clean-up step that reclaimed
/// nothing reserved versions first), and a full restore then called the
/// directory not empty. A clean-up with nothing to do commits nothing, and
/// a reopened store starts from version 0 again.
fn a_clean_up_with_nothing_to_do_commits_nothing(f: Fixture) {
    assert_eq!(f.gc(), super::GcStats::default());
    f.store.close().expect("close");
    let reopened =
        Store::open_with_manual_clock(f.backend.clone(), f.clock.clone()).expect("reopen");
    let version = reopened.backup(0).expect("backup").info().version;
    assert_eq!(version, 0, "nothing was written");
    let source = memory();
    source.put("k", "v", 0);
    let (full, _) = backup_bytes(&source, 0);
    reopened
        .restore(&mut full.as_slice())
        .expect("an empty directory");
}

fn an_increment_removes_what_an_expired_overwrite_replaced(f: Fixture) {
    f.put("a", "old", 0);
    f.put("b", "old", 0);
    let (full, v1) = backup_bytes(&f, 0);
    let soon = f.clock.load(Ordering::SeqCst) + 10;
    f.put("a", "new", soon);
    f.put("b", "new", soon);
    f.advance(20);
    let restored = |incr: &[u8]| {
        let target = memory();
        target.store.restore(&mut full.as_slice()).expect("full");
        target.store.restore(&mut &incr[..]).expect("increment");
        target
    };
    // Expired, not reclaimed yet: gone for every reader, so gone after a
    // restore of the chain too (not back to "old").
    let (incr, _) = backup_bytes(&f, v1);
    let target = restored(&incr);
    assert_eq!(
        target.keys(Bound::Unbounded, Bound::Unbounded, false),
        Vec::<String>::new()
    );
    // Reclaimed since: the same, from the reclaimer's tombstones.
    assert_eq!(f.gc().expired, 2);
    let (incr, _) = backup_bytes(&f, v1);
    let target = restored(&incr);
    assert_eq!(all_entries(&target), all_entries(&f));
    assert!(all_entries(&target).is_empty());
}

fn restore_refuses_a_gap_in_the_chain(f: Fixture) {
    f.put("a", "1", 0);
    let (_, v1) = backup_bytes(&f, 0);
    f.put("b", "1", 0);
    let (_, v2) = backup_bytes(&f, v1);
    f.put("c", "1", 0);
    let (incr2, _) = backup_bytes(&f, v2);
    let target = memory();
    let err = target.store.restore(&mut incr2.as_slice());
    assert!(matches!(err, Err(StorageError::Restore(_))), "{err:?}");
    let (full, _) = backup_bytes(&f, 0);
    target.store.restore(&mut full.as_slice()).expect("full");
    let again = target.store.restore(&mut full.as_slice());
    assert!(matches!(again, Err(StorageError::Restore(_))), "{again:?}");
}

/// A directory restored from a backup is a server of its own: an increment
/// taken from it does not continue the chain of the server it was restored
/// from (unless it starts at the version the restore ended at), even where
/// the versions line up (found by a review: restored from
/// an older full backup after a disaster, the copy took the old cron job's
/// `--since`, and the chain restored to data neither server held).
fn an_increment_of_a_restored_copy_does_not_continue_the_original_chain(f: Fixture) {
    f.put("a", "1", 0);
    let (full, v1) = backup_bytes(&f, 0);
    f.put("b", "1", 0);
    f.delete("a");
    let (incr, v2) = backup_bytes(&f, v1);
    // The copy, restored from the full backup only, writes on its own.
    let copy = restored_on_redb(&[&full]);
    while copy.put("c", "1", 0) < v2 {}
    let (foreign, _) = backup_bytes(&copy, v2);
    let target = restored_on_redb(&[&full, &incr]);
    let refused = target.store.restore(&mut foreign.as_slice());
    assert!(
        matches!(&refused, Err(StorageError::Restore(m)) if m.contains("another server")),
        "{refused:?}"
    );
    assert_eq!(
        target.keys(Bound::Unbounded, Bound::Unbounded, false),
        ["b"],
        "nothing of it applied"
    );
    // The copy's increment from the version its restore ended at continues
    // the chain it was restored from (the state there is that chain's), and
    // its later increments continue that.
    let (from_restore, at) = backup_bytes(&copy, v1);
    let continued = restored_on_redb(&[&full, &from_restore]);
    assert_eq!(all_entries(&continued), all_entries(&copy));
    copy.put("e", "1", 0);
    let (later, _) = backup_bytes(&copy, at);
    continued
        .store
        .restore(&mut later.as_slice())
        .expect("the copy's next increment");
    assert_eq!(all_entries(&continued), all_entries(&copy));
    // The copy's own chain restores.
    let (own_full, own) = backup_bytes(&copy, 0);
    copy.put("d", "1", 0);
    let (own_incr, _) = backup_bytes(&copy, own);
    let chain = restored_on_redb(&[&own_full, &own_incr]);
    assert_eq!(all_entries(&chain), all_entries(&copy));
}

fn writes_after_close_are_refused(f: Fixture) {
    f.put("a", "1", 0);
    f.store.close().expect("close");
    let r = f.store.write_blocking(|ctx| ctx.put(b"b", 0, b"x", 0));
    assert!(matches!(r, Err(StorageError::Closed)));
    assert!(f.get("a").is_some(), "reads still work after close");
}

#[test]
fn a_restore_cut_short_leaves_a_store_that_refuses_to_open() {
    let source = memory();
    for i in 0..2500 {
        source.put(&format!("k{i:05}"), "v", 0);
    }
    let (bytes, _) = backup_bytes(&source, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let backend = Arc::new(RedbBackend::open(dir.path()).expect("open"));
        let target = Store::open(backend, super::Durability::Strict).expect("store");
        let cut = &bytes[..bytes.len() * 3 / 4];
        assert!(target.restore(&mut &cut[..]).is_err());
        target.close().expect("close");
    }
    let backend = Arc::new(RedbBackend::open(dir.path()).expect("reopen"));
    let reopened = Store::open(backend, super::Durability::Strict);
    assert!(
        matches!(reopened, Err(StorageError::Restore(_))),
        "a half-restored directory must not be served"
    );
}

/// Relaxed durability commits on the caller's thread when writes don't
/// overlap and the writer is idle, and through the writer otherwise: both
/// paths are serialised.
#[test]
fn relaxed_writers_inline_or_queued_never_lose_an_increment() {
    let dir = tempfile::tempdir().expect("tempdir");
    for backend in both_backends(dir.path()) {
        let store = Store::open(backend, super::Durability::Relaxed).expect("store");
        assert_eq!(grow_concurrently(&store, 8, 100), 800);
        store.close().expect("close");
    }
}

/// The sequence is stored as a ceiling, a block ahead: after a reopen,
/// versions go on growing, and a backup still names the exact last version
/// it holds, so that an incremental backup from it misses nothing.
#[test]
fn versions_grow_across_a_reopen_and_backups_name_the_last_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    for backend in both_backends(dir.path()) {
        let f = with_backend(backend.clone(), None);
        let v1 = f.put("a", "v", 0);
        let (full, version) = backup_bytes(&f, 0);
        assert_eq!(version, v1, "a backup names the last version");
        f.store.close().expect("close");
        drop(f);

        let f = with_backend(backend, None);
        let v2 = f.put("b", "v", 0);
        assert!(v2 > v1, "version {v2} after a reopen, {v1} before");
        let (incr, version) = backup_bytes(&f, v1);
        assert_eq!(version, v2);
        assert!(f.put("c", "v", 0) > v2);
        f.store.close().expect("close");

        let target = memory();
        target.store.restore(&mut full.as_slice()).expect("full");
        target
            .store
            .restore(&mut incr.as_slice())
            .expect("increment");
        assert_eq!(
            target.keys(Bound::Unbounded, Bound::Unbounded, false),
            ["a", "b"]
        );
    }
}

/// A backup names its version in its header, which a restore takes its
/// numbering on from: the highest version a restore takes
/// ([`super::backup::MAX_RESTORED_VERSION`]) must not wrap the stored
/// ceiling, and the restored store's own backups must be readable; one
/// version more is refused.
#[test]
fn a_restored_version_at_the_top_does_not_wrap_the_sequence() {
    let top = super::backup::MAX_RESTORED_VERSION;
    let header = |version| {
        let mut bytes = Vec::new();
        let info = super::BackupInfo {
            since: 0,
            version,
            lineage: Some([1; 16]),
            base: Some([1; 16]),
        };
        super::backup::Writer::new(&mut bytes, info)
            .expect("writer")
            .finish()
            .expect("finish");
        bytes
    };
    let refused = memory().store.restore(&mut header(top + 1).as_slice());
    assert!(
        refused.is_err_and(|e| e.to_string().contains("past the highest")),
        "a version past the top was restored"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let backend: Arc<dyn Backend> = Arc::new(RedbBackend::open(dir.path()).expect("open redb"));
    let f = with_backend(backend.clone(), None);
    f.store
        .restore(&mut header(top).as_slice())
        .expect("restore");
    let v = f.put("a", "v", 0);
    // The restore's floor takes one version past the restored one.
    assert_eq!(v, top + 2);
    f.store.close().expect("close");
    drop(f);
    let f = with_backend(backend, None);
    let (bytes, version) = backup_bytes(&f, 0);
    assert!(version >= v, "the sequence went back after a reopen");
    super::backup::verify(&mut bytes.as_slice()).expect("its own backup reads");
    f.store.close().expect("close");
}
