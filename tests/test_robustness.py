"""Bad input becomes a cache miss with a warning: never a crash, never a wrong answer."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid

import pytest
import torch

from attnstore_hf import AttentionStore, RecordError, SessionRecord, StoreConfig
from attnstore_hf.record import session_key
from conftest import greedy, logit_diff, random_ids, saved_turn, tiny_model

TOL = 1e-4


def first_turn(model, store, session="s", seed=0):
    out, _ = saved_turn(model, store, random_ids(30, seed), session)
    store.flush()
    return torch.cat([out.sequences, random_ids(9, seed + 1)], dim=1)


def assert_miss_but_correct(model, store, ids, session="s", late=False):
    """``late``: the damage is found while the layers stream in (after generate() started): the layers not yet
    used are recomputed in place and the answer is still the recompute's."""
    cache = store.cache_for(model, session, ids)
    if not late:
        assert cache.reused_tokens == 0
    out, ref = greedy(model, ids, cache), greedy(model, ids)
    if late:
        assert cache.recomputed_tokens == cache.reused_tokens > 0
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_diff(out, ref) <= TOL
    return cache, out


def record_file(tmp_path, session="s", namespace="default"):
    return tmp_path / "kv" / f"{session_key(namespace, session)}.safetensors"


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate", "garbage", "empty", "header_only"])
def test_damaged_file_is_a_miss(damage, layerwise, store_factory, tmp_path, caplog):
    model = tiny_model("llama")
    store = store_factory()
    ids = first_turn(model, store)
    store.close()
    path = record_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip_tensor_byte":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "empty":
        data = bytearray()
    elif damage == "header_only":
        data = data[:8]
    path.write_bytes(bytes(data))
    fresh = store_factory(layerwise=layerwise)
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        # streamed from disk layer by layer, a damaged tensor (its header is fine) is found mid-forward
        cache, out = assert_miss_but_correct(model, fresh, ids, late=layerwise and damage == "flip_tensor_byte")
    assert "rejected" in caplog.text
    assert fresh.stats()["rejected_records"] == 1
    assert not path.exists()  # the bad file is out of the way (quarantined) ...
    assert len(list((tmp_path / "kv" / "quarantine").iterdir())) == 1
    fresh.save("s", cache, out.sequences)
    fresh.close()
    again = store_factory()  # ... and replaced by a good one
    assert again.cache_for(model, "s", torch.cat([out.sequences, random_ids(3, 7)], 1)).reused_tokens > 0


def test_record_from_another_model_is_a_miss(store_factory, caplog):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)  # same config, other weights
    store = store_factory()
    ids = first_turn(a, store)
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        assert_miss_but_correct(b, store, ids)
    assert "another model" in caplog.text


def test_record_from_another_dtype_is_a_miss(store_factory, caplog):
    model = tiny_model("gemma3")
    store = store_factory()
    ids = first_turn(model, store)
    store.close()
    bf16 = tiny_model("gemma3", dtype=torch.bfloat16)
    fresh = store_factory()
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        cache = fresh.cache_for(bf16, "s", ids)
    assert cache.reused_tokens == 0 and "another model or dtype" in caplog.text


def test_record_of_another_family_is_a_miss(store_factory):
    store = store_factory()
    ids = first_turn(tiny_model("qwen2"), store)
    assert_miss_but_correct(tiny_model("mistral"), store, ids)


def test_swapped_file_for_another_session_is_rejected(store_factory, tmp_path):
    model = tiny_model("llama")
    store = store_factory()
    ids = first_turn(model, store, session="alice")
    first_turn(model, store, session="bob", seed=50)
    store.close()
    # an attacker (or a bug) copies bob's file over alice's: the header names bob, so alice gets a miss
    record_file(tmp_path, "alice").write_bytes(record_file(tmp_path, "bob").read_bytes())
    assert_miss_but_correct(model, store_factory(), ids, session="alice")


HOSTILE = ["../../etc/passwd", "a/b\\c", "\x00nul", "x" * 10_000, "😀 émoji", " ", "CON", "..", "*?<>|"]


def test_hostile_session_ids_stay_inside_disk_dir(store_factory, tmp_path):
    model = tiny_model("llama")
    store = store_factory()
    ids = {sid: first_turn(model, store, session=sid, seed=i) for i, sid in enumerate(HOSTILE)}
    store.close()
    files = sorted(p.name for p in (tmp_path / "kv").glob("*.safetensors"))
    assert len(files) == len(HOSTILE)
    assert all(len(f) == 64 + len(".safetensors") for f in files)
    assert sorted(os.listdir(tmp_path)) == ["kv"]
    fresh = store_factory()
    for sid, seq in ids.items():
        assert fresh.cache_for(model, sid, seq).reused_tokens == seq.shape[1] - 9 - 1


@pytest.mark.parametrize("bad", ["", None, 7, b"alice"])
def test_every_method_refuses_an_empty_or_non_str_session_id(bad):
    model = tiny_model("llama")
    with AttentionStore(StoreConfig(disk_dir=None)) as store:
        ids = first_turn(model, store)
        cache = store.cache_for(model, "s", ids)
        calls = {"get_record": lambda: store.get_record(bad), "cache_for": lambda: store.cache_for(model, bad, ids),
                 "stage": lambda: store.stage(model, bad, ids), "save": lambda: store.save(bad, cache, ids),
                 "record_from_cache": lambda: store.record_from_cache(bad, cache, ids),
                 "history": lambda: store.history(bad), "drop": lambda: store.drop(bad),
                 "plan": lambda: store.plan([bad])}
        for name, call in calls.items():
            with pytest.raises(ValueError, match="session_id must be a non-empty str"):
                call()
        assert store.history("s") == ids[0, :-9].tolist()  # nothing was lost on the way


def test_leftover_temp_files_are_cleaned_and_nobody_elses(store_factory, tmp_path):
    """A write interrupted by a crash leaves ``<key>.<pid>.<thread>.tmp``: removed at start. Files of the same
    directory that merely end in .tmp (a user's, another tool's) are not the store's to delete."""
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / f"{'a' * 64}.123.456.tmp").write_bytes(b"half a record")
    others = ["draft.tmp", "report.final.tmp", f"{'b' * 64}.tmp", "notes.1.2.tmp"]
    for name in others:
        (tmp_path / "kv" / name).write_bytes(b"someone's")
    store_factory()
    assert sorted(p.name for p in (tmp_path / "kv").iterdir()) == sorted([".lock"] + others)


def test_decoder_rejects_every_kind_of_garbage():
    model = tiny_model("llama")
    with AttentionStore(StoreConfig(disk_dir=None)) as store:
        first_turn(model, store)
        rec = store.dram.get(session_key("default", "s"))
    good = rec.to_bytes()
    assert SessionRecord.from_bytes(good).token_ids == rec.token_ids
    for cut in (0, 3, 8, 100, len(good) - 1):
        with pytest.raises(RecordError):
            SessionRecord.from_bytes(good[:cut])
    with pytest.raises(RecordError):
        SessionRecord.from_bytes(good, expect_session="mallory")
    with pytest.raises(RecordError):
        SessionRecord.from_bytes(good, expect_namespace="other")


def _tmpfs(mnt, size: str):
    """A tmpfs of ``size`` mounted on ``mnt`` for the test (root only: skipped elsewhere), unmounted after."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tmpfs-{uuid.uuid4().hex[:6]}", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        why = f"cannot mount a tmpfs here: {r.stderr.decode().strip()}"
        if os.environ.get("CI"):  # .ci/run runs as root: these fault tests must run there
            pytest.fail(why)
        pytest.skip(why)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def tiny_fs(tmp_path):
    yield from _tmpfs(tmp_path / "full", "16k")


def test_full_disk_keeps_serving_from_dram(tiny_fs, caplog):
    model = tiny_model("llama")
    store = AttentionStore(StoreConfig(disk_dir=tiny_fs, disk_bytes=None))
    try:
        with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
            ids = first_turn(model, store)  # the record (about 35 kB) does not fit on a 16 kB disk
        assert store.stats()["disk_write_errors"] == 1
        assert "could not write" in caplog.text
        assert [p.name for p in tiny_fs.iterdir()] == [".lock"]  # no half-written file left behind
        cache = store.cache_for(model, "s", ids)
        assert cache.reused_tokens > 0 and cache.source == "dram"
        out, ref = greedy(model, ids, cache), greedy(model, ids)
        assert torch.equal(out.sequences, ref.sequences)
    finally:
        store.close()


def test_a_damaged_header_is_left_out_of_sessions(store_factory, tmp_path, caplog):
    """One flipped bit in a header's JSON key (``token_ids`` -> ``token\\x7fids``) raised KeyError from sessions(),
    and with it the chat's session list. The header's own checksum leaves it out; a lookup quarantines it."""
    model = tiny_model("llama")
    store = store_factory()
    ids = first_turn(model, store, session="a")
    first_turn(model, store, session="b", seed=5)
    store.close()
    path = record_file(tmp_path, "a")
    data = bytearray(path.read_bytes())
    at = data.index(b"token_ids")
    data[at + 5] ^= 0x20  # "_" -> DEL: still valid JSON, a key of another name
    path.write_bytes(bytes(data))
    fresh = store_factory()
    assert [s["session_id"] for s in fresh.sessions()] == ["b"]
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        assert_miss_but_correct(model, fresh, ids, session="a")
    assert "rejected" in caplog.text


def test_files_that_cannot_be_read_are_misses(store_factory, tmp_path, caplog):
    """A dangling link with a record's name made the store's start raise FileNotFoundError; a directory with a
    record's name (or a file not ours to read) raised from cache_for and history()."""
    model = tiny_model("llama")
    store = store_factory()
    ids = first_turn(model, store, session="a")
    store.close()
    kv = tmp_path / "kv"
    (kv / f"{session_key('default', 'gone')}.safetensors").symlink_to(kv / "nowhere")
    path = record_file(tmp_path, "a")
    path.unlink()
    path.mkdir()
    fresh = store_factory()  # started: the dangling link is not a record
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        assert_miss_but_correct(model, fresh, ids, session="a")
        assert fresh.history("a") is None and fresh.sessions() == []
    assert "cannot read" in caplog.text


@pytest.fixture
def small_fs(tmp_path):
    yield from _tmpfs(tmp_path / "fs", "4m")


def test_a_read_only_disk_serves_what_it_holds_and_dropped_sessions_stay_dropped(small_fs, caplog):
    """A disk remounted read-only (ext4 errors=remount-ro): starting a store raised OSError on its lock file,
    drop() and the lookup of an expired session raised too. Now it starts, serves its records exactly, and a
    session it could not delete is not served again (nor picked up as another process's record)."""
    model = tiny_model("llama")
    with AttentionStore(StoreConfig(disk_dir=small_fs)) as store:
        ids_a = first_turn(model, store, session="a")
        ids_b = first_turn(model, store, session="b", seed=7)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with caplog.at_level(logging.WARNING, logger="attnstore_hf"):
        with AttentionStore(StoreConfig(disk_dir=small_fs)) as store:
            cache = store.cache_for(model, "a", ids_a)
            assert cache.source == "disk" and cache.reused_tokens == ids_a.shape[1] - 9 - 1
            out, ref = greedy(model, ids_a, cache), greedy(model, ids_a)
            assert torch.equal(out.sequences, ref.sequences)
            assert logit_diff(out, ref) <= TOL
            store.save("a", cache, out.sequences).result()  # DRAM; the disk write fails with a warning
            store.drop("b")
            assert store.history("b") is None
            assert_miss_but_correct(model, store, ids_b, session="b")
    assert "cannot remove" in caplog.text and "could not write" in caplog.text
