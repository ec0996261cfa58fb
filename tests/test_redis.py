"""The shared Redis tier against a real redis-server (started, stopped and restarted by these tests)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from attnstore_hf import AttentionStore, StoreConfig
from conftest import greedy, logit_diff, random_ids, tiny_model

pytestmark = pytest.mark.redis
TOL = 1e-4


class RedisServer:
    def __init__(self, workdir):
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self, *extra: str):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run must install it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def wait_backoff():
    time.sleep(2.2)  # the tier retries a failed server after a 2 s back-off


TURN = textwrap.dedent("""
    import json, sys, torch, warnings
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from attnstore_hf import AttentionStore, StoreConfig
    model_dir, disk_dir, url, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([ids])
    with AttentionStore(StoreConfig(disk_dir=disk_dir, redis_url=url)) as store:
        cache = store.cache_for(model, "s", ids)
        out = model.generate(cache.input_ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        store.save("s", cache, out.sequences)
    print(json.dumps({"reused": cache.reused_tokens, "source": cache.source, "sequences": out.sequences[0].tolist(),
                      "logits": [step[0].tolist() for step in out.logits]}))
""")


def run_turn(model_dir, disk_dir, url, ids):
    p = subprocess.run([sys.executable, "-c", TURN, str(model_dir), str(disk_dir), url, json.dumps(ids)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_two_machines_share_one_redis(redis_server, tmp_path):
    model = tiny_model("gemma3")
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(30, 0)[0].tolist()
    a1 = run_turn(tmp_path / "model", tmp_path / "diskA", redis_server.url, ids)  # replica A: turn 1
    assert a1["reused"] == 0
    ids2 = a1["sequences"] + random_ids(9, 1)[0].tolist()
    b2 = run_turn(tmp_path / "model", tmp_path / "diskB", redis_server.url, ids2)  # replica B: turn 2
    assert b2["source"] == "redis" and b2["reused"] == len(a1["sequences"]) - 1
    ref = greedy(model, torch.tensor([ids2]))
    assert b2["sequences"] == ref.sequences[0].tolist()
    assert (torch.tensor(b2["logits"]) - torch.cat(ref.logits)).abs().max().item() <= TOL  # every step
    # turn 3 back on A: its local record (turn 1) is stale; the longer shared one (turn 2) is used
    ids3 = b2["sequences"] + random_ids(4, 2)[0].tolist()
    a3 = run_turn(tmp_path / "model", tmp_path / "diskA", redis_server.url, ids3)
    assert a3["source"] == "redis" and a3["reused"] == len(b2["sequences"]) - 1
    assert a3["sequences"] == greedy(model, torch.tensor([ids3])).sequences[0].tolist()


def _turn(model, store, ids, session="s"):
    cache = store.cache_for(model, session, ids)
    out = greedy(model, cache.input_ids, cache)
    ref = greedy(model, cache.input_ids)
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_diff(out, ref) <= TOL
    store.save(session, cache, out.sequences)
    store.flush()
    return cache, out


def test_redis_down_at_start_then_back(redis_server, tmp_path, caplog):
    model = tiny_model("llama")
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        store = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    assert "not usable (ConnectionError" in caplog.text
    cache, out = _turn(model, store, random_ids(20, 0))  # local tiers work, correct answer
    assert store.stats()["redis_errors"] >= 1
    redis_server.start()
    wait_backoff()
    ids2 = torch.cat([out.sequences, random_ids(5, 1)], 1)
    cache, out = _turn(model, store, ids2)  # reconnects: this save reaches Redis
    assert store.stats()["redis_writes"] == 1
    store.close()
    other = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url))
    c, _ = _turn(model, other, torch.cat([out.sequences, random_ids(3, 2)], 1))  # exact against a recompute
    assert c.source == "redis" and c.reused_tokens == out.sequences.shape[1] - 1
    other.close()


def test_redis_dies_during_save_and_load_and_comes_back_empty(redis_server, tmp_path):
    model = tiny_model("qwen2")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    _, out = _turn(model, a, random_ids(20, 0))
    ids2 = torch.cat([out.sequences, random_ids(5, 1)], 1)
    # dies during a save: the publish fails, the local tiers keep the record, nothing crashes
    cache = a.cache_for(model, "s", ids2)
    out2 = greedy(model, cache.input_ids, cache)
    redis_server.stop()
    a.save("s", cache, out2.sequences)
    a.flush()
    assert a.stats()["redis_errors"] >= 1 and a.stats()["saves"] == 2
    # dies during a load: another replica with empty local tiers recomputes, correctly
    b = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url))
    ids3 = torch.cat([out2.sequences, random_ids(4, 2)], 1)
    c, _ = _turn(model, b, ids3)
    assert c.reused_tokens == 0
    # comes back empty (no persistence): misses, then it fills again
    redis_server.start()
    wait_backoff()
    d = AttentionStore(StoreConfig(disk_dir=tmp_path / "d", redis_url=redis_server.url))
    c, out4 = _turn(model, d, ids3)
    assert c.reused_tokens == 0
    e = AttentionStore(StoreConfig(disk_dir=tmp_path / "e", redis_url=redis_server.url))
    c, _ = _turn(model, e, torch.cat([out4.sequences, random_ids(2, 3)], 1))  # exact against a recompute
    assert c.source == "redis" and c.reused_tokens == out4.sequences.shape[1] - 1
    for s in (a, b, d, e):
        s.close()


def test_corrupt_shared_record_is_a_miss(redis_server, tmp_path, caplog):
    import redis as redis_py

    model = tiny_model("llama")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url, redis_chunk_bytes=1024))
    _, out = _turn(model, a, random_ids(20, 0))
    a.close()
    client = redis_py.Redis.from_url(redis_server.url)
    chunks = [k for k in client.keys("attnstore:*") if not k.endswith(b":m")]
    assert len(chunks) > 1  # chunked (1 kB values)
    man_key = [k for k in client.keys("attnstore:*") if k.endswith(b":m")][0]
    man = json.loads(client.get(man_key))
    man["sha256"] = "0" * 64  # a manifest that no longer matches its chunks
    client.set(man_key, json.dumps(man))
    b = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url))
    c, _ = _turn(model, b, torch.cat([out.sequences, random_ids(3, 1)], 1))
    assert c.reused_tokens == 0
    b.close()


def test_keys_share_one_hash_slot_and_carry_namespace(redis_server, tmp_path):
    import redis as redis_py

    model = tiny_model("llama")
    s = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url, namespace="tenant-x",
                                   redis_chunk_bytes=2048))
    _turn(model, s, random_ids(20, 0))
    s.close()
    keys = redis_py.Redis.from_url(redis_server.url).keys("*")
    assert keys and all(k.startswith(b"attnstore:tenant-x:{") for k in keys)
    tags = {k[k.index(b"{"): k.index(b"}") + 1] for k in keys}
    assert len(tags) == 1  # one hash tag: one Cluster slot for the whole record


def test_drop_removes_the_shared_record_too(redis_server, tmp_path):
    """drop() "forgets a session everywhere": the Redis copy as well, or the next lookup (here or on any
    replica) would bring it back."""
    model = tiny_model("llama")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    b = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url))
    ids = random_ids(20, 1)
    _, out = _turn(model, a, ids)
    ids2 = torch.cat([out.sequences, random_ids(4, 2)], 1)
    a.drop("s")
    assert a.history("s") is None
    for store in (a, b):
        assert store.cache_for(model, "s", ids2).reused_tokens == 0
    a.close()
    b.close()


@pytest.mark.parametrize("coordinates", ["full", "kept"])
def test_replicas_follow_a_truncated_conversation_by_its_turn(coordinates, redis_server, tmp_path):
    """Two replicas on one Redis take turns of a conversation that outgrows the window (CA truncation; the user
    keeps the full conversation, or the kept one: history()). A truncated turn's record holds fewer tokens than an
    older one, so "the longer record is newer" picked a replica's stale local copy (0.51 logit difference against
    one replica); with the kept history, shorter than that stale copy, the shared record was not even asked for
    (0.58 off) and the save took the stale copy's turn number. Records count their turn: each replica restores
    exactly what a single replica does, and every save is one turn more than the last."""
    model = tiny_model("mistral")
    kw = dict(redis_url=redis_server.url, max_context=48, reserve_tokens=4, truncation="ca")

    def chain(stores):
        full, seen = random_ids(30, 1), []
        for k in range(5):
            store = stores[k % len(stores)]
            cache = store.cache_for(model, "s", full)
            out = greedy(model, cache.input_ids, cache)
            seen.append((cache.reused_tokens, cache.truncated, out))
            rec = store.save("s", cache, out.sequences).result()
            store.flush()
            assert rec.meta["turn"] == k + 1 and store.redis.head(rec.key, rec.fingerprint)["turn"] == k + 1
            if coordinates == "full":
                full = torch.cat([full, out.sequences[:, cache.input_ids.shape[1]:], random_ids(9, 10 + k)], 1)
            else:
                full = torch.cat([out.sequences, random_ids(9, 10 + k)], 1)
        return seen

    one = AttentionStore(StoreConfig(disk_dir=tmp_path / "one", **kw))
    single = chain([one])
    one.close()
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    pair = [AttentionStore(StoreConfig(disk_dir=tmp_path / d, **kw)) for d in ("a", "b")]
    shared = chain(pair)
    for store in pair:
        store.close()
    assert any(t for _, t, _ in single)  # the conversation was truncated on the way
    for (r1, t1, o1), (r2, t2, o2) in zip(single, shared):
        assert (r1, t1) == (r2, t2)
        assert torch.equal(o1.sequences, o2.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(o1.logits, o2.logits)) <= TOL


def test_an_expired_shared_record_is_removed_once_found(redis_server, tmp_path):
    """ttl_seconds: a record found expired in Redis is a miss and is removed there (before, every later lookup of
    the session downloaded it again only to find it expired)."""
    model = tiny_model("llama")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    _, out = _turn(model, a, random_ids(20, 1))
    a.close()
    b = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url, ttl_seconds=0.05))
    time.sleep(0.1)
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    assert b.cache_for(model, "s", ids).reused_tokens == 0
    s = b.stats()
    assert s["expired"] == 1 and s["bytes_read_redis"] > 0
    assert b.cache_for(model, "s", ids).reused_tokens == 0
    assert b.stats()["bytes_read_redis"] == s["bytes_read_redis"]  # not downloaded again
    b.close()


def test_garbage_manifests_are_misses_and_cost_nothing(redis_server, tmp_path, caplog):
    """A manifest that is JSON but not an object crashed cache_for (AttributeError) and drop (TypeError); one
    claiming millions of chunks took 32 s and 1.4 GB before the miss. Each is now a miss, at once."""
    import redis as redis_py

    model = tiny_model("llama")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    _, out = _turn(model, a, random_ids(20, 0))
    a.close()
    client = redis_py.Redis.from_url(redis_server.url)
    man_key = next(k for k in client.keys("attnstore:*") if k.endswith(b":m"))
    real = json.loads(client.get(man_key))
    huge = json.dumps({**real, "n": 2_000_000, "size": 2_000_000 * 4 << 20})
    ids = torch.cat([out.sequences, random_ids(3, 1)], 1)
    for i, garbage in enumerate(["5", "null", '"x"', "[1, 2]", "not json", huge]):
        client.set(man_key, garbage)
        b = AttentionStore(StoreConfig(disk_dir=tmp_path / f"b{i}", redis_url=redis_server.url))
        t0 = time.perf_counter()
        c, _ = _turn(model, b, ids)
        assert c.reused_tokens == 0, garbage
        b.drop("s")
        assert time.perf_counter() - t0 < 5, garbage
        assert client.get(man_key) is None and b.stats()["redis_errors"] == 0, garbage
        b.close()


def test_a_full_redis_keeps_no_half_written_record(redis_server, tmp_path, caplog):
    """maxmemory with noeviction: a write failing half-way (OOM) left its first chunks with no manifest and no
    expiry, taking memory from every later write. They are deleted, or expire on their own."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_server.url)
    model = tiny_model("llama")
    s = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url, redis_chunk_bytes=4096))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 100_000)
    written = []
    monitor = s.redis._delete_chunks

    def spy(base, wid, n):  # how many chunks the failed write had put there
        written.append(sum(client.exists(f"{base}:{wid}:{i}") for i in range(n)))
        return monitor(base, wid, n)

    s.redis._delete_chunks = spy
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        _turn(model, s, random_ids(200, 0))  # ~200 kB of K/V: half of it fits
    assert s.stats()["redis_errors"] >= 1 and "could not publish" in caplog.text
    assert written and written[0] > 0  # chunks had been written before the server refused
    assert client.keys("attnstore:*") == []
    s.close()


def test_a_key_of_another_type_is_that_sessions_problem_only(redis_server, tmp_path):
    """One manifest key replaced by a list (WRONGTYPE) put the whole tier in back-off: no other session was
    published, and the session itself could never be published or dropped again."""
    import redis as redis_py

    model = tiny_model("llama")
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url)) as a:
        _, out = _turn(model, a, random_ids(20, 0), session="bad")
    client = redis_py.Redis.from_url(redis_server.url)
    man_key = next(k for k in client.keys("attnstore:*") if k.endswith(b":m"))
    client.delete(man_key)
    client.rpush(man_key, "x")
    s = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url))
    c, _ = _turn(model, s, torch.cat([out.sequences, random_ids(3, 1)], 1), session="bad")  # a miss
    assert c.reused_tokens == 0
    for i, sid in enumerate(("b", "c", "d")):
        _turn(model, s, random_ids(20, 10 + i), session=sid)
    assert s.stats()["redis_writes"] == 4  # "bad" replaced its wrong-type key, then b, c and d: no back-off
    assert client.type(man_key) == b"string"
    s.drop("bad")
    assert client.type(man_key) == b"none"
    s.close()


def test_credentials_stay_out_of_logs_and_a_dead_cluster_is_a_miss(tmp_path, caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    model = tiny_model("llama")
    for url in (f"redis://app:S3cretPassw0rd@127.0.0.1:{port}/0", f"redis+cluster://127.0.0.1:{port}/0"):
        with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
            store = AttentionStore(StoreConfig(disk_dir=tmp_path / str(len(url)), redis_url=url, redis_timeout_s=0.5))
            cache, out = _turn(model, store, random_ids(20, 0))  # a miss, then a save: warnings, exact answers
            c2, _ = _turn(model, store, torch.cat([out.sequences, random_ids(3, 1)], 1))
            assert c2.source == "dram"
            store.close()
    assert "not usable (" in caplog.text and "S3cretPassw0rd" not in caplog.text


def _chunks(client):
    return {k: client.ttl(k) for k in client.keys("attnstore:*") if not k.endswith(b":m")}


def test_replicas_racing_to_publish_one_session_leave_no_chunk_behind(redis_server):
    """A replica read the manifest it would replace before uploading its chunks; another committed meanwhile,
    and its chunks were then named by no manifest and never expired. The manifest is now swapped atomically
    (SET ... GET) and the chunks of the one actually replaced are deleted."""
    import redis as redis_py

    from attnstore_hf.store.redis import RedisTier

    client = redis_py.Redis.from_url(redis_server.url)
    a, b = (RedisTier(redis_server.url, chunk_bytes=8) for _ in range(2))
    fp = "f" * 16
    a.put_bytes("k", fp, b"first record bytes", turn=1)
    swap = a._swap_manifest

    def late(base, man):  # b publishes while a's chunks are uploaded, before a commits
        b.put_bytes("k", fp, b"b's record bytes!", turn=2)
        return swap(base, man)

    a._swap_manifest = late
    a.put_bytes("k", fp, b"a's record, committed last", turn=3)
    assert a.get_bytes("k", fp) == b"a's record, committed last"
    man = json.loads(client.get(next(k for k in client.keys("attnstore:*") if k.endswith(b":m"))))
    chunks = _chunks(client)
    assert len(chunks) == man["n"] and all(man["w"].encode() in k for k in chunks)  # only the committed write's
    assert set(chunks.values()) == {-1}  # no ttl_seconds: kept until replaced or dropped


def test_a_failure_after_the_commit_keeps_the_published_record(redis_server):
    """The step after the commit (the chunks' expiry) failing made the write delete its own chunks, which the
    committed manifest named: the shared record was gone. Now it stays readable (its chunks keep the pending
    expiry), and the record it replaced is deleted."""
    import redis as redis_py

    from attnstore_hf.store import redis as tier_mod

    client = redis_py.Redis.from_url(redis_server.url)
    t = tier_mod.RedisTier(redis_server.url, chunk_bytes=8)
    fp = "f" * 16
    t.put_bytes("k", fp, b"old record bytes", turn=1)

    def broken(*a):
        raise redis_py.exceptions.ConnectionError("reset after the commit")

    t._keep_chunks = broken
    t.put_bytes("k", fp, b"new record bytes!", turn=2)
    assert tier_mod.RedisTier(redis_server.url).get_bytes("k", fp) == b"new record bytes!"  # (t backs off now)
    chunks = _chunks(client)
    assert len(chunks) == 3 and all(0 < ttl <= tier_mod.PENDING_TTL_S for ttl in chunks.values())
    man_key = next(k for k in client.keys("attnstore:*") if k.endswith(b":m"))
    assert 0 < client.ttl(man_key) <= tier_mod.PENDING_TTL_S  # it does not outlive its chunks


def test_chunks_take_the_records_expiry_once_committed(redis_server):
    import redis as redis_py

    from attnstore_hf.store.redis import PENDING_TTL_S, RedisTier

    client = redis_py.Redis.from_url(redis_server.url)
    t = RedisTier(redis_server.url, chunk_bytes=8, ttl_seconds=10 * PENDING_TTL_S)
    t.put_bytes("k", "f" * 16, b"some record bytes")
    assert all(PENDING_TTL_S < ttl <= 10 * PENDING_TTL_S for ttl in _chunks(client).values())


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_a_record_fetched_from_redis_reaches_the_local_disk(policy, redis_server, tmp_path):
    """A record read from Redis was put in DRAM only: write-through never wrote it to disk (its eviction assumed it
    was there), and one that DRAM did not keep (larger than DRAM, or yielding to protected sessions) was kept
    nowhere — every later turn fetched it from Redis again, and a restart without Redis lost it. Now it goes to
    the local disk too."""
    model = tiny_model("llama")
    a = AttentionStore(StoreConfig(disk_dir=tmp_path / "a", redis_url=redis_server.url))
    _, out = _turn(model, a, random_ids(20, 1))
    a.close()
    dram = "1KB" if policy == "write_back" else "2GB"  # write-back: a record larger than DRAM
    b = AttentionStore(StoreConfig(disk_dir=tmp_path / "b", redis_url=redis_server.url, dram_bytes=dram,
                                   write_policy=policy))
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    assert b.cache_for(model, "s", ids).source == "redis"
    b.flush()
    assert b.stats()["disk_writes"] == 1
    b.close()
    local = AttentionStore(StoreConfig(disk_dir=tmp_path / "b"))  # no Redis: the local disk has it
    cache = local.cache_for(model, "s", ids)
    assert cache.source == "disk" and cache.reused_tokens == out.sequences.shape[1] - 1
    ref = greedy(model, ids)
    got = greedy(model, ids, cache)
    assert torch.equal(got.sequences, ref.sequences)
    assert logit_diff(got, ref) <= TOL
    local.close()


def test_an_older_record_never_lands_in_redis_after_a_newer_one(redis_server, tmp_path):
    """With several writer threads, two saves of one session were published by two threads at once: the older
    record, slower to upload, committed its manifest last, and every other replica resumed from it. Now writes of a
    session run one at a time and an older one asked before a newer is skipped."""
    model = tiny_model("llama")
    store = AttentionStore(StoreConfig(disk_dir=None, redis_url=redis_server.url, save_workers=4))
    put, calls = store.redis.put_bytes, []

    def slow_first(*args, **kwargs):  # the first of the burst takes longer (a bigger record, a busy link)
        calls.append(kwargs["tokens"])
        if len(calls) == 2:
            time.sleep(0.5)
        return put(*args, **kwargs)

    store.redis.put_bytes = slow_first
    ids = random_ids(12, 0)
    _, out = _turn(model, store, ids)
    for step in range(3):  # three more turns saved back to back, without waiting for the writes
        ids = torch.cat([out.sequences, random_ids(3, step + 1)], 1)
        cache = store.cache_for(model, "s", ids)
        out = greedy(model, cache.input_ids, cache)
        store.save("s", cache, out.sequences)
    store.flush()
    fp = store.get_record("s")[0].fingerprint
    assert store.redis.head(store._key("s"), fp)["tokens"] == out.sequences.shape[1] - 1
    store.close()
    # and another replica resumes the newest turn from it
    other = AttentionStore(StoreConfig(disk_dir=None, redis_url=redis_server.url))
    nxt = torch.cat([out.sequences, random_ids(2, 9)], 1)
    cache = other.cache_for(model, "s", nxt)
    assert cache.source == "redis" and cache.reused_tokens == out.sequences.shape[1] - 1
    assert logit_diff(greedy(model, nxt, cache), greedy(model, nxt)) <= TOL
    other.close()


def test_redis_gets_the_record_dram_got_last_when_two_threads_save_one_session(redis_server, tmp_path):
    """Two threads committing records of one session (put_record, or save() with async_save off): the Redis write
    was asked for after the DRAM lock was released, so a thread paused there let the other one's record go into
    DRAM after its own yet be published before it: Redis kept the older record. Now asked for under the lock."""
    import threading

    from attnstore_hf.sim import synthetic_record

    store = AttentionStore(StoreConfig(disk_dir=None, redis_url=redis_server.url))
    a = synthetic_record("default", "s", list(range(10)), 16, salt=1)
    b = synthetic_record("default", "s", list(range(12)), 16, salt=2)
    ask, a_asking = store._write_redis_async, threading.Event()

    def paused(rec):  # thread A is descheduled just before asking for its publication
        if rec is a:
            a_asking.set()
            time.sleep(0.5)
        ask(rec)

    store._write_redis_async = paused
    ta = threading.Thread(target=store.put_record, args=(a,))
    ta.start()
    assert a_asking.wait(5)
    tb = threading.Thread(target=store.put_record, args=(b,))
    tb.start()
    ta.join()
    tb.join()
    store.flush()
    in_dram = store.dram.peek(a.key)
    assert store.redis.head(a.key, a.fingerprint)["tokens"] == in_dram.num_tokens
    store.close()


def test_a_password_protected_redis_says_why_and_serves_with_the_password(tmp_path, caplog):
    """A missing or wrong password was logged as "not reachable" (the server was up): the warning now names the
    refusal (AuthenticationError), never the password; each is a miss, exact; the right password shares records."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run must install it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start("--requirepass", "sekret-pw")
    try:
        model = tiny_model("llama")
        base = f"127.0.0.1:{server.port}/0"
        for url in (f"redis://{base}", f"redis://:wrong-pw@{base}"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
                with AttentionStore(StoreConfig(disk_dir=None, redis_url=url)) as store:
                    cache, out = _turn(model, store, random_ids(20, 0))
                    assert cache.reused_tokens == 0
            assert "not usable (AuthenticationError" in caplog.text, caplog.text
            assert "wrong-pw" not in caplog.text
        url = f"redis://:sekret-pw@{base}"
        with AttentionStore(StoreConfig(disk_dir=None, redis_url=url)) as store:
            _, out = _turn(model, store, random_ids(20, 0))
        with AttentionStore(StoreConfig(disk_dir=None, redis_url=url)) as other:
            c, _ = _turn(model, other, torch.cat([out.sequences, random_ids(3, 1)], 1))
            assert c.source == "redis" and c.reused_tokens == out.sequences.shape[1] - 1
    finally:
        server.stop()
