"""Nothing lost, nothing wrong: hostile files, kills mid-save, shared directories, a faulty soak, a fuzzed decoder."""

from __future__ import annotations

import json
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnstore_hf import AttentionStore, RecordError, SessionRecord, StoreConfig
from attnstore_hf.record import FORMAT_VERSION, _header_digest, session_key
from attnstore_hf.sim import SimConfig, build_trace, load_turns, synthetic_record
from conftest import greedy, logit_diff, random_ids, saved_turn, tiny_model


def same(a, b) -> bool:
    return a.token_ids == b.token_ids and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


class Boom:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_dressed_as_record_is_never_unpickled(store_factory, tmp_path):
    model = tiny_model("llama")
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 0))
    store.close()
    canary = tmp_path / "unpickled"
    path = tmp_path / "kv" / f"{session_key('default', 's')}.safetensors"
    path.write_bytes(pickle.dumps(Boom(str(canary))))
    fresh = store_factory()
    ids2 = torch.cat([out.sequences, random_ids(4, 1)], 1)
    c = fresh.cache_for(model, "s", ids2)
    assert c.reused_tokens == 0 and not canary.exists()
    assert fresh.stats()["rejected_records"] == 1
    assert list((tmp_path / "kv" / "quarantine").iterdir())


def test_other_format_version_is_rejected():
    rec = synthetic_record("default", "s", list(range(10)), 16)
    data = bytearray(rec.to_bytes())
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + hlen])
    inner = json.loads(header["__metadata__"]["attnstore"])
    inner["format_version"] = FORMAT_VERSION + 1
    inner["header_checksum"] = _header_digest(inner)  # a well-formed record of a future version
    header["__metadata__"]["attnstore"] = json.dumps(inner)
    new_header = json.dumps(header).encode()
    new_header += b" " * ((8 - len(new_header) % 8) % 8)
    forged = len(new_header).to_bytes(8, "little") + new_header + bytes(data[8 + hlen:])
    with pytest.raises(RecordError, match="format version"):
        SessionRecord.from_bytes(forged)


def test_record_of_other_shape_is_a_miss(store_factory):
    """Same fingerprint forged onto a record whose tensors have another head_dim: refused before use."""
    model = tiny_model("llama")
    store = store_factory()
    out, rec = saved_turn(model, store, random_ids(20, 0))
    bad = synthetic_record("default", "s", rec.token_ids, 64)
    bad.layers = bad.layers * len(rec.layers)
    bad.fingerprint, bad.dtype = rec.fingerprint, rec.dtype
    bad.layers = [type(l)(l.kind, l.start, l.keys.float(), l.values.float()) for l in bad.layers]
    store.put_record(bad)
    c = store.cache_for(model, "s", torch.cat([out.sequences, random_ids(3, 1)], 1))
    assert c.reused_tokens == 0 and store.stats()["rejected_records"] == 1


# ---- kills mid-save ----------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time
    from attnstore_hf import AttentionStore, StoreConfig
    from attnstore_hf.sim import synthetic_record
    d, start = sys.argv[1], int(sys.argv[2])
    store = AttentionStore(StoreConfig(disk_dir=d, dram_bytes=0))
    v = start
    print("ready", flush=True)
    while True:  # alternate versions of 5 sessions forever; the parent kills us somewhere
        for s in range(5):
            store.put_record(synthetic_record("default", f"s{s}", list(range(200 + v % 7)), 4096, salt=v))
            store.flush()
        v += 1
""")


def test_sigkill_at_random_points_never_leaves_a_torn_record(tmp_path):
    d = tmp_path / "kv"
    rng = random.Random(0)
    kills = 25
    seen: dict[int, int] = {}  # session -> the newest version found on disk so far: never lost, never older
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(k * 1000)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = AttentionStore(StoreConfig(disk_dir=d, dram_bytes=0))
        assert not list(d.glob("*.tmp"))  # leftovers of the killed writer are gone
        for s in range(5):
            rec, tier = store.get_record(f"s{s}")
            if rec is None:
                assert s not in seen, f"session s{s} (version {seen.get(s)}) was lost by kill {k}"
                continue
            v = rec.meta["salt"]  # whichever version it is, it is that version exactly
            assert same(rec, synthetic_record("default", f"s{s}", list(range(200 + v % 7)), 4096, salt=v))
            assert v >= seen.get(s, v), f"session s{s} went back from version {seen[s]} to {v}"
            seen[s] = v
        assert store.stats()["rejected_records"] == 0
        store.close()
    assert len(seen) == 5  # every session reached the disk at some point


# ---- two processes, one directory ----------------------------------------------------------------------------------
SHARER = textwrap.dedent("""
    import sys
    from attnstore_hf import AttentionStore, StoreConfig
    from attnstore_hf.sim import synthetic_record
    d, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = AttentionStore(StoreConfig(disk_dir=d))
    for i in range(n):
        store.put_record(synthetic_record("default", f"{me}-{i}", list(range(50 + i)), 512, salt=i))
        store.put_record(synthetic_record("default", "shared", list(range(60)), 512, salt=1000 + i))
    store.close()
""")


def test_two_processes_share_a_directory(tmp_path):
    d = tmp_path / "kv"
    n = 40
    procs = [subprocess.Popen([sys.executable, "-c", SHARER, str(d), me, str(n)]) for me in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    store = AttentionStore(StoreConfig(disk_dir=d))
    for me in ("a", "b"):
        for i in range(n):
            rec, _ = store.get_record(f"{me}-{i}")
            assert same(rec, synthetic_record("default", f"{me}-{i}", list(range(50 + i)), 512, salt=i))
    shared, _ = store.get_record("shared")  # last writer wins, whole
    assert same(shared, synthetic_record("default", "shared", list(range(60)), 512, salt=shared.meta["salt"]))
    assert store.stats()["rejected_records"] == 0
    # a record committed by another process after this store started is seen too
    late = AttentionStore(StoreConfig(disk_dir=d))
    late.put_record(synthetic_record("default", "late", list(range(9)), 512, salt=7))
    late.close()
    rec, tier = store.get_record("late")
    assert tier == "disk" and rec.meta["salt"] == 7
    store.close()


# ---- soak ---------------------------------------------------------------------------------------------------------
def test_soak_1000_sessions_with_faults(tmp_path):
    """1,000 ShareGPT sessions through the store with corruptions, process deaths between writes (DRAM lost) and
    refused writes injected."""
    cfg = SimConfig(sessions=1000, rate=4.0)
    ops = build_trace(load_turns(1000), cfg)
    rng = random.Random(1)
    d = tmp_path / "kv"
    conf = dict(dram_bytes=400_000, disk_dir=d, disk_bytes=2_000_000, policy="scheduler", fsync=False,
                namespace="soak")
    store = AttentionStore(StoreConfig(**conf))
    saved: dict[int, list] = {}
    faults = {"corrupt": 0, "crash": 0, "enospc": 0}
    hits = 0

    def put_or_fail(r):
        store.put_record(r)

    try:
        for op in ops:
            roll = rng.random()
            if roll < 0.01 and len(store.disk):  # flip a byte in a random committed file
                victim = rng.choice(sorted(d.glob("*.safetensors")))
                data = bytearray(victim.read_bytes())
                data[rng.randrange(len(data))] ^= 0xFF
                victim.write_bytes(bytes(data))
                faults["corrupt"] += 1
            elif roll < 0.015:  # the process dies between writes: no close(), DRAM lost, a new store on the same
                # directory (a write cut off midway is test_sigkill_at_random_points_never_leaves_a_torn_record's)
                store._pool.shutdown(wait=True)
                store = AttentionStore(StoreConfig(**conf))
                faults["crash"] += 1
            elif roll < 0.02:  # the disk refuses the next write (ENOSPC)
                orig = store.disk._write_file

                def refuse(key, data, orig=orig, tier=store.disk):
                    tier._write_file = orig
                    raise OSError(28, "No space left on device (injected)")

                store.disk._write_file = refuse
                faults["enospc"] += 1
            if op[0] == "plan":
                store.plan([f"s{u}" for u in op[1][:64]], wait=True)
            elif op[0] == "lookup" and op[2] > 0:
                rec, tier = store.get_record(f"s{op[1]}")
                if rec is not None:  # a hit is exactly one of the versions saved, never anything else
                    hits += 1
                    assert any(same(rec, v) for v in saved[op[1]])
            elif op[0] == "save":
                _, s, j, tokens = op
                r = synthetic_record("soak", f"s{s}", list(range(min(tokens, 300))), 16, salt=j)
                saved.setdefault(s, []).append(r)
                put_or_fail(r)
                store.flush()
            assert store.dram.used <= store.dram.capacity
            assert store.disk.used <= store.disk.capacity
            on_disk = {p.name[:64]: p.stat().st_size for p in d.glob("*.safetensors")}
            assert on_disk == dict(store.disk._index)
    finally:
        store.close()
    assert all(v > 3 for v in faults.values()), faults
    assert hits > 500
    print(f"soak: {len(ops)} operations, faults {faults}, {hits} hits")


# ---- fuzzed decoder -------------------------------------------------------------------------------------------------
GOOD = synthetic_record("default", "s", list(range(12)), 32).to_bytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=2048),
    st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)).map(
        lambda t: GOOD[: t[0]] + bytes([t[1]]) + GOOD[t[0] + 1:]),
    st.integers(0, len(GOOD)).map(lambda n: GOOD[:n]),
))
def test_decoder_only_ever_returns_a_verified_record_or_raises_record_error(data):
    try:
        rec = SessionRecord.from_bytes(data)
    except RecordError:
        return
    # accepted: then it must be the genuine record (a flipped byte somewhere harmless, e.g. JSON whitespace)
    assert same(rec, SessionRecord.from_bytes(GOOD))


def test_format_1_records_with_sha256_checksums_are_still_read(store_factory, monkeypatch, tmp_path):
    """Format 2 hashes tensors with xxh3-128; a format-1 file (sha256) written before still restores exactly."""
    import attnstore_hf.record as record_mod

    monkeypatch.setattr(record_mod, "FORMAT_VERSION", 1)
    monkeypatch.setattr(record_mod, "CHECKSUM", "sha256")
    model = tiny_model("gemma3")
    old = store_factory()
    out, _ = saved_turn(model, old, random_ids(40, 3))
    old.close()
    path = next((tmp_path / "kv").glob("*.safetensors"))
    head = json.loads(json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
                      ["__metadata__"]["attnstore"])
    assert head["format_version"] == 1 and len(next(iter(head["checksums"].values()))) == 64  # sha256 hex
    monkeypatch.undo()
    for layerwise in (True, False):  # streamed per layer, and read whole
        store = store_factory(layerwise=layerwise)
        ids = torch.cat([out.sequences, random_ids(5, 4)], dim=1)
        cache = store.cache_for(model, "s", ids)
        assert cache.reused_tokens == out.sequences.shape[1] - 1
        ours, ref = greedy(model, ids, cache), greedy(model, ids)
        assert torch.equal(ours.sequences, ref.sequences)
        assert logit_diff(ours, ref) <= 1e-4
        store.close()


def test_with_several_writers_the_newest_turn_of_a_session_is_what_the_disk_keeps(tmp_path):
    """save_workers > 1: two disk writes of one session may run at once or out of order; the older one must not
    land last (a restart would then resume a stale turn). Saves of 12 sessions, 3 turns each, back to back."""
    model = tiny_model("llama", num_hidden_layers=2)
    for attempt in range(3):
        d = tmp_path / f"kv{attempt}"
        want = {}
        with AttentionStore(StoreConfig(disk_dir=d, save_workers=4)) as store:
            for s in range(12):
                ids = random_ids(8, s)
                for t in range(3):
                    cache = store.cache_for(model, f"s{s}", ids)
                    with torch.no_grad():
                        model(cache.input_ids[:, cache.get_seq_length():], past_key_values=cache, use_cache=True)
                    seq = torch.cat([ids, random_ids(1, 100 + s)], 1)
                    store.save(f"s{s}", cache, seq)
                    ids = torch.cat([seq, random_ids(40 * (3 - t), 200 + s + t)], 1)
                want[f"s{s}"] = seq[0].tolist()
        with AttentionStore(StoreConfig(disk_dir=d)) as fresh:
            assert {sid: fresh.history(sid) for sid in want} == want


def test_a_disk_write_asked_for_after_another_of_the_session_wins(tmp_path):
    """Both writes of one session queued while a third party holds the session's write slot: whichever the pool
    starts first, the older is skipped and the newer is on disk."""
    model = tiny_model("llama", num_hidden_layers=2)
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv", save_workers=2, write_policy="write_back")) as store:
        out, old = saved_turn(model, store, random_ids(10, 1))
        _, new = saved_turn(model, store, torch.cat([out.sequences, random_ids(5, 2)], 1))
        lock = store._disk_order.lock(old.key)
        with lock:
            store._write_disk_async(old)
            store._write_disk_async(new)
            time.sleep(0.05)  # both jobs started and wait for the slot
        store.flush()
        assert store.disk.get(new.key).token_ids == new.token_ids
        assert store.stats()["disk_writes"] == 1
        assert len(store._disk_order) == 0  # no write queued: nothing kept of the session's write order


NO_CLOSE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, sys.argv[3])
    from conftest import greedy, random_ids, tiny_model
    from attnstore_hf import AttentionStore, StoreConfig
    store = AttentionStore(StoreConfig(disk_dir=sys.argv[1], write_policy=sys.argv[2]))
    model = tiny_model("llama")
    ids = random_ids(200, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store.save("s", cache, out.sequences)  # no result(), no close(): the script just ends
    if sys.argv[4] == "fork":  # fork while the save is under way: the child exits at once, the parent waits
        if os.fork() == 0:
            sys.exit(0)
        os.wait()
    if sys.argv[4] == "thread":  # a thread that outlives the main one still uses the store
        import threading, time

        def late():
            time.sleep(1.0)
            later = torch.cat([out.sequences, random_ids(3, 2)], 1)
            c = store.cache_for(model, "s", later)
            print("late", c.reused_tokens, flush=True)
            try:  # the pools have stopped by now (most likely): refused, and said why
                store.save("s", c, greedy(model, later, c).sequences)
            except Exception as exc:
                print("refused:", str(exc)[:40].replace(" ", "_"), flush=True)

        threading.Thread(target=late).start()
    print(out.sequences.shape[1], flush=True)
""")


@pytest.mark.parametrize("policy,then", [("write_through", "end"), ("write_back", "end"), ("write_back", "fork"),
                                         ("write_back", "thread")])
def test_a_script_that_ends_without_close_keeps_its_last_turn(policy, then, tmp_path):
    """Found by trying what users write: a script that saved and ended without ``store.close()`` lost the turn —
    the commit's disk write was refused ("cannot schedule new futures after interpreter shutdown", logged as a
    failed save) and write-back records were in DRAM only. As the interpreter exits, before the worker pools stop
    taking work, open stores finish their saves and write DRAM to disk; they stay open, so a thread that outlives
    the main one still uses them; a forked child leaves its parent's stores alone (persisting its copies waited
    forever for writer threads it does not have)."""
    tests = str(Path(__file__).resolve().parent)
    argv = [sys.executable, "-c", NO_CLOSE, str(tmp_path / "kv"), policy, tests, then]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saving failed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv")) as store:
        history = store.history("s")
    lines = proc.stdout.split()
    assert history is not None and len(history) == int(lines[0])
    if then == "thread":
        assert lines[1:3] == ["late", str(len(history) - 1)]  # restored from the open store, after main ended
        # a save then: refused as the interpreter exits (it said "closed during the save": the store was not)
        assert lines[3:] in ([], ["refused:", "the_interpreter_is_exiting:_its_worker_p"]), lines
