"""The hierarchy: byte-bounded tiers, restart, the lru / fifo / scheduler orders, prefetch and eviction windows."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnstore_hf import AttentionStore, StoreConfig
from attnstore_hf.record import session_key
from attnstore_hf.sim import synthetic_record

BPT = 16  # bytes of K/V per token in these tests


def rec(sid, tokens=20, salt=0, ns="default"):
    return synthetic_record(ns, sid, list(range(tokens)), BPT, salt=salt)


def same(a, b) -> bool:
    return (a.token_ids == b.token_ids and len(a.layers) == len(b.layers)
            and all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
                    for x, y in zip(a.layers, b.layers)))


def dram_keys(store, *sids):
    return {session_key(store.namespace, s) for s in sids}


SIZE = rec("x").nbytes  # every record here has the same size


def make(tmp_path, policy, dram_records=3, disk=None, **kw):
    return AttentionStore(StoreConfig(dram_bytes=dram_records * SIZE, disk_dir=tmp_path / "kv", disk_bytes=disk,
                                      policy=policy, fsync=False, **kw))


# ---- eviction order ----------------------------------------------------------------------------------------------
def test_lru_evicts_least_recently_used(tmp_path):
    store = make(tmp_path, "lru")
    for s in "abc":
        store.put_record(rec(s))
    store.get_record("a")
    store.put_record(rec("d"))
    assert set(store.dram.keys()) == dram_keys(store, "a", "c", "d")  # b was least recently used
    store.close()


def test_fifo_evicts_first_in_and_ignores_reads_and_updates(tmp_path):
    store = make(tmp_path, "fifo")
    for s in "abc":
        store.put_record(rec(s))
    store.get_record("a")             # a read does not renew
    store.put_record(rec("b", salt=1))  # neither does an update in place
    store.put_record(rec("d"))
    assert set(store.dram.keys()) == dram_keys(store, "b", "c", "d")
    store.put_record(rec("e"))
    assert set(store.dram.keys()) == dram_keys(store, "c", "d", "e")
    store.close()


def test_scheduler_evicts_idle_lru_first_then_furthest_in_queue(tmp_path):
    store = make(tmp_path, "scheduler", dram_records=4)
    for s in "abcd":
        store.put_record(rec(s))
    store.plan(["c", "a"])  # c is next, then a; b and d are idle
    order = []
    for s in "efgh":
        before = set(store.dram.keys())
        store.put_record(rec(s))
        (gone,) = before - set(store.dram.keys())
        order.append(gone)
    names = {session_key(store.namespace, s): s for s in "abcdefgh"}
    # idle first in LRU order (b, d, then e and f, saved after them), queued sessions last
    assert [names[k] for k in order] == ["b", "d", "e", "f"]
    store.plan(["c", "a", "g"])
    store.put_record(rec("i"))  # h is the only idle one: it goes
    store.put_record(rec("j"))  # i, just saved, is idle (not queued): it goes before any queued session
    assert set(store.dram.keys()) == dram_keys(store, "c", "a", "g", "j")
    store.plan(["c", "a", "g", "j"])
    store.put_record(rec("k"))  # everything in DRAM queued: k, not queued at all, is the furthest: to disk
    store.flush()
    assert set(store.dram.keys()) == dram_keys(store, "c", "a", "g", "j")
    assert store.disk.contains(*dram_keys(store, "k"))
    store.plan(["c", "a", "k", "g", "j"], wait=True)  # k third: of the queued, j is the furthest from the head
    assert set(store.dram.keys()) == dram_keys(store, "c", "a", "g", "k")
    store.close()


def test_prefetch_window_loads_head_of_queue_and_keeps_it(tmp_path):
    store = make(tmp_path, "scheduler", dram_records=3)
    for i in range(6):
        store.put_record(rec(f"s{i}", salt=i))
    store.flush()
    assert set(store.dram.keys()) == dram_keys(store, "s3", "s4", "s5")
    assert store.windows()[0] == 3
    started = store.plan(["s0", "s1", "s2", "s5", "s4"], wait=True)
    assert started == ["s0", "s1", "s2"]  # the window: DRAM / mean record size = 3 sessions
    assert set(store.dram.keys()) == dram_keys(store, "s0", "s1", "s2")
    r, tier = store.get_record("s1")
    assert tier == "dram" and same(r, rec("s1", salt=1))
    st_ = store.stats()
    assert st_["prefetches"] == 3 and st_["prefetch_hits"] == 1
    store.close()


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_a_session_outside_the_queue_does_not_push_a_queued_one_out(tmp_path, write_policy):
    """Serving a session that is not queued (its disk lookup, then its save) evicted the furthest of the sessions
    the queue had just prefetched, which its next turn then read from disk. It now goes to disk itself."""
    store = make(tmp_path, "scheduler", dram_records=3, write_policy=write_policy)
    for i, sid in enumerate(("a", "b", "c", "z")):
        store.put_record(rec(sid, salt=i))
    store.flush()
    assert store.plan(["a", "b", "c"], wait=True) == ["a"]
    assert set(store.dram.keys()) == dram_keys(store, "a", "b", "c")
    r, tier = store.get_record("z")
    assert tier == "disk" and same(r, rec("z", salt=3))
    store.put_record(rec("z", salt=9))
    store.flush()
    assert set(store.dram.keys()) == dram_keys(store, "a", "b", "c")
    r, tier = store.get_record("z")
    assert tier == "disk" and same(r, rec("z", salt=9))  # the new turn, not lost
    for i, sid in enumerate(("a", "b", "c")):
        r, tier = store.get_record(sid)
        assert tier == "dram" and same(r, rec(sid, salt=i))
    store.close()


def test_the_windows_count_sessions_the_store_holds_once(tmp_path):
    """A session queued for several turns, and new conversations with nothing stored, took places in the
    prefetch window: [a, a, a, b] prefetched only a, [new1, new2, new3, a] nothing."""
    store = make(tmp_path, "scheduler", dram_records=3)
    for i, sid in enumerate(("a", "b", "x", "y", "z")):
        store.put_record(rec(sid, salt=i))
    store.flush()
    assert set(store.dram.keys()) == dram_keys(store, "x", "y", "z")
    assert store.plan(["a", "a", "a", "b"], wait=True) == ["a", "b"]
    assert dram_keys(store, "a", "b") <= set(store.dram.keys())
    store.put_record(rec("x", salt=7))  # a's and b's places are kept
    store.flush()
    assert dram_keys(store, "a", "b") <= set(store.dram.keys())
    store.plan(["new1", "new2", "new3", "x"], wait=True)
    assert dram_keys(store, "x") <= set(store.dram.keys())
    store.close()


def test_the_windows_take_the_size_of_each_sessions_latest_record(tmp_path):
    """A conversation's records grow turn by turn: the mean over every save ever made counted its early, short
    turns, so the prefetch window held more sessions than DRAM does (here 4 for room of 3 latest records; ~27%
    more on the simulator's trace). The mean is now over each session's latest record; a dropped session leaves it."""
    store = make(tmp_path, "scheduler", dram_records=3)  # room for 3 records of 20 tokens
    for sid in ("a", "b", "c"):
        for tokens in (5, 10, 20):  # three turns of each conversation
            store.put_record(rec(sid, tokens=tokens))
    store.flush()
    assert store.mean_record_bytes() == SIZE
    assert store.windows()[0] == 3
    store.put_record(rec("d", tokens=5))
    store.drop("a")
    assert store.mean_record_bytes() == (2 * SIZE + rec("d", tokens=5).nbytes) / 3
    store.close()


def test_eviction_window_protects_queued_sessions_on_disk(tmp_path):
    disk_cap = None
    store = make(tmp_path, "scheduler", dram_records=1)
    probe = store.put_record(rec("probe")) or store.flush()
    size_on_disk = store.disk.used
    store.close()
    disk_cap = 4 * size_on_disk + 10
    store = AttentionStore(StoreConfig(dram_bytes=SIZE, disk_dir=tmp_path / "kv2", disk_bytes=disk_cap,
                                       policy="scheduler", fsync=False))
    for s in ("q1", "q2", "x1", "x2"):
        store.put_record(rec(s))
    store.flush()
    store.plan(["q1", "q2"])  # eviction window = (DRAM + disk) / mean > 2: both protected
    for i in range(6):
        store.put_record(rec(f"new{i}"))
        store.flush()
        on_disk = set(store.disk.keys())
        assert dram_keys(store, "q1", "q2") <= on_disk
    assert store.stats()["evictions_disk"] >= 4
    store.close()
    del probe


@pytest.mark.parametrize("policy", ["lru", "scheduler"])
def test_write_back_drops_disk_copies_superseded_by_dram_first(tmp_path, policy):
    """With write-back, a session promoted back to DRAM has a stale copy on disk; when the disk needs room that
    copy goes first (DRAM holds the newer record and writes it again when demoted), not another session."""
    probe = make(tmp_path / "probe", policy, dram_records=0)
    probe.put_record(rec("p"))
    probe.flush()
    file_size = probe.disk.used  # a record's file: its tensors and header
    probe.close()
    store = make(tmp_path, policy, dram_records=2, disk=2 * file_size + file_size // 2, write_policy="write_back")
    for s in "abcd":
        store.put_record(rec(s))
        store.flush()
    assert set(store.dram.keys()) == dram_keys(store, "c", "d")
    assert set(store.disk.keys()) == dram_keys(store, "a", "b")
    got, tier = store.get_record("a")  # promoted: c is demoted to disk, which has room for two records
    store.flush()
    assert tier == "disk" and same(got, rec("a"))
    # the room for c came from a's stale copy (recently used, so plain LRU would have dropped b instead)
    assert set(store.disk.keys()) == dram_keys(store, "b", "c")
    for s in "abc":
        got, _ = store.get_record(s)
        store.flush()
        assert got is not None and same(got, rec(s)), s
    store.close()


# ---- restart ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_restart_keeps_every_committed_record(tmp_path, write_policy):
    store = make(tmp_path, "lru", dram_records=2, write_policy=write_policy)
    for i in range(7):
        store.put_record(rec(f"s{i}", tokens=10 + i, salt=i))
    store.close()
    again = make(tmp_path, "lru", dram_records=2, write_policy=write_policy)
    assert len(again.disk) == 7
    for i in range(7):
        r, tier = again.get_record(f"s{i}")
        assert tier in ("disk", "dram") and same(r, rec(f"s{i}", tokens=10 + i, salt=i))
    again.close()


def test_ttl_expires_records(tmp_path):
    store = make(tmp_path, "lru", ttl_seconds=1.0)  # (long enough for the checks below on a busy machine)
    store.put_record(rec("a"))
    assert store.get_record("a")[0] is not None
    assert [s["session_id"] for s in store.sessions()] == ["a"]
    time.sleep(1.1)
    assert store.sessions() == []  # listed no longer: a lookup would drop it
    assert store.get_record("a") == (None, None)
    assert store.stats()["expired"] == 1 and not store.disk.contains(session_key("default", "a"))
    store.close()


def test_record_larger_than_dram_goes_to_disk(tmp_path):
    store = make(tmp_path, "lru", dram_records=1)
    big = rec("big", tokens=200)
    store.put_record(big)
    store.flush()
    assert len(store.dram) == 0
    r, tier = store.get_record("big")
    assert tier == "disk" and same(r, big)
    store.close()


# ---- properties --------------------------------------------------------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 5), st.integers(1, 60)),
        st.tuples(st.just("get"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("plan"), st.lists(st.integers(0, 5), max_size=6), st.just(0)),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("policy", ["lru", "fifo", "scheduler"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_invariants_hold_for_any_sequence(tmp_path_factory, policy, ops):
    d = tmp_path_factory.mktemp("prop")
    cfg = dict(dram_bytes=3 * rec("x", tokens=30).nbytes, disk_dir=d, disk_bytes=6000, policy=policy, fsync=False)
    store = AttentionStore(StoreConfig(**cfg))
    latest = {}
    version = 0
    try:
        for op, a, b in ops:
            if op == "put":
                version += 1
                r = rec(f"s{a}", tokens=b, salt=version)
                store.put_record(r)
                latest[f"s{a}"] = r
            elif op == "get":
                key = store._key(f"s{a}")
                held = store.dram.contains(key) or key in store.disk._index
                got, tier = store.get_record(f"s{a}")
                assert (got is not None) == held, (a, tier, held)  # what a tier holds is found, nothing else
                if got is not None:  # a hit is always the last version saved, byte for byte
                    assert same(got, latest[f"s{a}"]), (a, tier)
            elif op == "plan":
                store.plan([f"s{x}" for x in a], wait=True)
            else:
                store.close()
                store = AttentionStore(StoreConfig(**cfg))
            store.flush()
            assert store.dram.used <= store.dram.capacity
            assert store.dram.used == sum(store.dram.peek(k).nbytes for k in store.dram.keys())
            files = {p.name[:64]: p.stat().st_size for p in d.glob("*.safetensors")}
            assert files == dict(store.disk._index)  # the index is exactly what is on disk
            assert store.disk.used == sum(files.values()) <= store.disk.capacity
    finally:
        store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dram_records_are_pinned_on_cuda(tmp_path):
    store = make(tmp_path, "lru")
    store.put_record(rec("a"))
    r, _ = store.get_record("a")
    assert all(lay.keys.is_pinned() and lay.values.is_pinned() for lay in r.layers)
    store.close()


def test_records_written_with_another_disk_codec_leave_the_write_queue(tmp_path):
    """With disk_codec != codec the disk gets a transcoded copy: the record queued for writing must still leave the
    queue once written (it stayed there: DRAM's bound was ignored, an evicted session was served as a DRAM hit
    and a dropped one came back)."""
    store = make(tmp_path, "lru", dram_records=1, disk_codec="int8")
    store.put_record(rec("a"))
    store.put_record(rec("b"))  # a leaves DRAM
    store.flush()
    assert store._writing == {}
    assert store.get_record("a")[1] == "disk"
    store.drop("a")
    assert store.get_record("a") == (None, None) and store.history("a") is None
    store.close()


@pytest.mark.parametrize("then", ["save", "drop"])
def test_a_prefetch_read_under_way_does_not_bring_an_older_record_back(then, tmp_path, monkeypatch):
    """plan() starts reading a session from disk; the session is saved anew (or dropped) before the read ends. The
    prefetched record is the older one: it must not replace the newer record in DRAM (a write-back store would
    then lose the newer turn) nor bring a dropped session back."""
    import threading

    store = make(tmp_path, "scheduler", dram_records=1)
    store.put_record(rec("a"))
    store.put_record(rec("b"))  # a is on disk only
    store.flush()
    reading, go = threading.Event(), threading.Event()
    open_lazy = store.disk.open_lazy

    def slow_read(*args, **kwargs):
        opened = open_lazy(*args, **kwargs)  # the file as it is now (the old record), header read
        if threading.current_thread().name.startswith("attnstore-prefetch"):
            reading.set()
            assert go.wait(10)
        return opened

    monkeypatch.setattr(store.disk, "open_lazy", slow_read)
    assert store.plan(["a", "b"]) == ["a"]
    assert reading.wait(10)
    newer = rec("a", salt=1)
    if then == "save":
        store.put_record(newer)
    else:
        store.drop("a")
    go.set()
    for _ in range(200):
        if session_key("default", "a") not in store._prefetching:
            break
        time.sleep(0.01)
    got, _ = store.get_record("a")
    assert (got is None) if then == "drop" else same(got, newer)
    store.close()


def test_a_namespace_never_counts_or_evicts_another_namespaces_records(tmp_path):
    """Two tenants on one disk_dir: the second one's disk_bytes bounds its own records. Before, its index took in
    every record file of the directory and evicted the first tenant's to make room (all of them)."""
    a = make(tmp_path, "lru", disk=None, namespace="a")
    for s in ("u0", "u1", "u2"):
        a.put_record(rec(s, ns="a"))
    a.close()
    file_size = len(rec("v0", ns="b").to_bytes())
    b = make(tmp_path, "lru", dram_records=1, disk=2 * file_size + file_size // 2, namespace="b")
    for s in ("v0", "v1"):
        b.put_record(rec(s, ns="b"))
    b.flush()
    assert b.stats()["disk_records"] == 2 and b.stats()["evictions_disk"] == 0
    b.close()
    a = make(tmp_path, "lru", namespace="a")
    assert sorted(s["session_id"] for s in a.sessions()) == ["u0", "u1", "u2"]
    assert all(a.get_record(s)[0] is not None for s in ("u0", "u1", "u2"))
    a.close()


def test_a_session_whose_save_is_under_way_keeps_its_place_in_the_queue(tmp_path):
    """The serving loop saves C's turn and passes the queue [C, A, B] at once, C's save still running: C, not
    held yet, was left out of the prefetch window, and its commit then yielded to A and B and went to disk."""
    import threading

    from conftest import greedy, random_ids, tiny_model

    model = tiny_model("llama")

    def turn(store, sid, seed):
        ids = random_ids(40, seed)
        cache = store.cache_for(model, sid, ids)
        out = greedy(model, ids, cache)
        return store.save(sid, cache, out.sequences), out

    with AttentionStore(StoreConfig(disk_dir=None, dram_bytes=None)) as probe:
        size = turn(probe, "x", 9)[0].result().nbytes
    store = AttentionStore(StoreConfig(disk_dir=tmp_path / "kv", dram_bytes=int(size * 2.5), policy="scheduler"))
    for sid, seed in (("A", 1), ("B", 2)):
        turn(store, sid, seed)[0].result()
    gate = threading.Event()
    store._save_pool.submit(gate.wait)  # C's save waits behind this: still under way when plan() comes
    fut, out = turn(store, "C", 3)
    store.plan(["C", "A", "B"])
    gate.set()
    fut.result()
    store.flush()
    assert store.dram.contains(store._key("C")) and store.dram.contains(store._key("A"))
    cache = store.cache_for(model, "C", torch.cat([out.sequences, random_ids(4, 7)], 1))
    assert cache.source == "dram"
    store.close()


def test_a_drop_between_an_eviction_and_its_demotion_stays_dropped(tmp_path):
    """write_back: a save evicts X from DRAM and then queues X's demotion to disk; a drop(X) in between found
    nothing pending, and the demotion then wrote X back (history and a new store resumed it). A write is now
    skipped once the session was saved or dropped after its record went into DRAM."""
    import threading

    store = make(tmp_path, "lru", dram_records=3, write_policy="write_back")
    for sid in ("X", "a", "b"):
        store.put_record(rec(sid))
    evicted = threading.Event()
    put = store.dram.put

    def slow_put(record, *a, **k):  # the eviction as it is; only the moment after it is made longer
        out = put(record, *a, **k)
        if any(r.session_id == "X" for r in out):
            evicted.set()
            time.sleep(0.2)
        return out

    store.dram.put = slow_put
    saver = threading.Thread(target=lambda: store.put_record(rec("c")))  # evicts X, the least recent
    saver.start()
    assert evicted.wait(10)
    store.drop("X")
    saver.join()
    store.flush()
    assert store.history("X") is None and not store.disk.contains(*dram_keys(store, "X"))
    store.close()
    again = make(tmp_path, "lru", write_policy="write_back")
    assert again.get_record("X")[0] is None
    again.close()


def test_a_prefetch_does_not_promote_a_record_older_than_one_being_written(tmp_path):
    """write_back + scheduler: a prefetch queued while S was on disk only ran after S was saved again and that
    newer record had left DRAM (its demotion queued, not written): it read the old file and promoted it, and the
    old record's later demotion overwrote the newest turn on disk for good."""
    import threading

    def srec(sid, salt):
        return synthetic_record("default", sid, list(range(50)), 256, salt=salt)

    one = srec("x", 0).nbytes
    store = AttentionStore(StoreConfig(dram_bytes=int(2.5 * one), disk_dir=tmp_path / "kv", fsync=False,
                                       write_policy="write_back", policy="scheduler"))
    for sid, salt in (("S", 1), ("A", 0), ("B", 0)):
        store.put_record(srec(sid, salt))  # S's first record demoted to disk
    store.flush()
    prefetch_busy, writers_busy = threading.Event(), threading.Event()
    store._prefetch_pool.submit(prefetch_busy.wait)
    store.plan(["S"])  # S on disk only: a prefetch is queued
    store.put_record(srec("S", 2))  # the newest turn
    store._pool.submit(writers_busy.wait)
    store.plan([])
    store.put_record(srec("C", 0))
    store.put_record(srec("D", 0))  # the newest turn leaves DRAM: its demotion waits for a writer
    prefetch_busy.set()
    store.wait_prefetch()
    writers_busy.set()
    store.flush()
    assert store.get_record("S")[0].meta["salt"] == 2
    for sid in "EFG":
        store.put_record(srec(sid, 0))
    store.close()
    again = AttentionStore(StoreConfig(disk_dir=tmp_path / "kv", fsync=False))
    assert again.get_record("S")[0].meta["salt"] == 2
    again.close()


def test_put_record_checks_the_layout_and_counts_the_ttl_from_now(tmp_path):
    """put_record accepted a record whose token ids and K/V rows disagree (served from DRAM, then quarantined once
    read back from disk), and kept an older saved_at, so a record put back could expire at once."""
    from attnstore_hf.record import LayerKV, RecordError

    store = make(tmp_path, "lru")
    bad = rec("a")
    bad.token_ids = bad.token_ids[:-3]  # 17 ids, 20 rows of K/V
    with pytest.raises(ValueError, match="not the last of the record's 17 tokens"):
        store.put_record(bad)
    lay = rec("b").layers[0]
    neg = rec("b", tokens=3)
    neg.layers = [LayerKV(lay.kind, -2, lay.keys[:, :, :5], lay.values[:, :, :5])]  # -2 + 5 == 3
    with pytest.raises(RecordError):
        neg.check_layout()
    assert store.get_record("a")[0] is None and store.get_record("b")[0] is None
    old = rec("c")
    old.meta["saved_at"] = time.time() - 3600
    store.put_record(old)
    assert time.time() - store.get_record("c")[0].meta["saved_at"] < 60
    store.close()


@pytest.mark.parametrize("write_policy", ["write_back", "write_through"])
def test_bookkeeping_of_sessions_held_nowhere_is_trimmed(tmp_path, monkeypatch, write_policy):
    """A long-running server sees millions of conversations: the store kept a version and the policy an access time
    for every session it ever saved, held or not (~300 bytes each, for good). Those of sessions held nowhere are
    now forgotten, and what is held is served as before, in the policy's order."""
    from attnstore_hf.store import core

    monkeypatch.setattr(core, "TRIM_SESSIONS", 8, raising=False)
    probe = make(tmp_path / "probe", "lru")
    probe.put_record(rec("s999", salt=999))  # (a header as long as the longest here)
    probe.flush()
    file_bytes = probe.disk.used
    probe.close()
    store = make(tmp_path, "lru", dram_records=3, disk=5 * file_bytes, write_policy=write_policy)
    saved, dropped = [], set()
    for i in range(200):
        store.put_record(rec(f"s{i}", salt=i))
        if i % 10 == 0:
            store.flush()
            store.drop(f"s{i}")
            dropped.add(f"s{i}")
        else:
            saved.append(f"s{i}")
    store.flush()
    assert len(store._versions) <= 40 and len(store.policy.last_access) <= 40  # not 200

    def holds(s, sid):  # (without a lookup: that would promote and touch)
        key = session_key(s.namespace, sid)
        return s.dram.contains(key) or key in s.disk.keys()

    held = [sid for sid in saved if holds(store, sid)]
    assert held == saved[-len(held):] and len(held) >= 5  # the newest ones: the LRU order survived the trims
    assert not any(holds(store, sid) for sid in dropped)
    for sid in held:
        assert same(store.get_record(sid)[0], rec(sid, salt=int(sid[1:])))
    store.close()
    with make(tmp_path, "lru", dram_records=3, disk=5 * file_bytes) as again:  # what the disk kept, intact
        found = [sid for sid in saved if holds(again, sid)]
        assert len(found) >= 4 and set(found) <= set(held)
        for sid in found:
            assert same(again.get_record(sid)[0], rec(sid, salt=int(sid[1:])))


def test_a_trim_does_not_make_saves_wait_for_a_disk_write(tmp_path, monkeypatch):
    """The trim held every DRAM lock while it read the disk tier's index, whose lock a disk write holds through
    its write, fsync and directory lock: every save and promotion waited for an unrelated write (or another
    process's). It reads what the tiers hold before taking the DRAM locks now."""
    import threading

    from attnstore_hf.store import core

    monkeypatch.setattr(core, "TRIM_SESSIONS", 0, raising=False)
    store = make(tmp_path, "lru")
    for i in range(5):
        store.put_record(rec(f"s{i}", salt=i))
    store.flush()
    store._trim_at = 0
    with store.disk._lock:  # a disk write under way
        trim = threading.Thread(target=store._trim_bookkeeping)
        trim.start()
        time.sleep(0.2)  # the trim is waiting for the disk tier
        save = threading.Thread(target=store.put_record, args=(rec("x"),))
        save.start()
        save.join(3)
        saved = not save.is_alive()
    trim.join(5)
    save.join(5)
    assert saved
    store.close()
