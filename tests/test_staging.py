"""Turns restored ahead of time (``AttentionStore.stage``): handed over only for the exact ids, exact answers."""

from __future__ import annotations

import time

import pytest
import torch

from attnstore_hf import AttentionStore, StoreConfig
from conftest import compare, greedy, random_ids, saved_turn, tiny_model


def next_turn(model, store, seed, session="s", n=40):
    out, rec = saved_turn(model, store, random_ids(n, seed), session)
    return torch.cat([out.sequences, random_ids(6, seed + 100)], dim=1), rec


def test_a_staged_turn_is_handed_over_and_exact(store_factory):
    model = tiny_model("llama")
    store = store_factory(restore_mode="load")
    ids, rec = next_turn(model, store, 1)
    staged = store.stage(model, "s", ids)
    assert staged.reused_tokens == rec.num_tokens
    cache = store.cache_for(model, "s", ids)
    assert cache is staged
    s = store.stats()
    assert (s["staged"], s["staged_used"], s["staged_dropped"], s["lookups"]) == (1, 1, 0, 2)
    compare(model, cache, ids)


def test_a_staged_turn_already_run_is_not_handed_over(store_factory):
    """stage() returns the cache, so a caller may run generate() on it before cache_for asks for the turn: that
    cache then holds the reply too, and handing it over would prefill the turn onto it (a wrong answer). It stays
    the caller's (not emptied) and the turn is restored afresh."""
    model = tiny_model("llama")
    store = store_factory(restore_mode="load")
    ids, rec = next_turn(model, store, 3)
    staged = store.stage(model, "s", ids)
    used = compare(model, staged, ids)
    cache = store.cache_for(model, "s", ids)
    assert cache is not staged and cache.reused_tokens == rec.num_tokens
    assert staged.get_seq_length() == used.sequences.shape[1] - 1
    assert store.stats()["staged_used"] == 0
    compare(model, cache, ids)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_staged_turn_with_held_back_layers_run_directly_is_exact(family, store_factory):
    """generate() on what stage() returned, with layers held back (``stage_layers``): the first forward releases
    them. Before, Gemma 3 built its full-attention mask from a held-back layer that still said 0 tokens (0.34 off)."""
    model = tiny_model(family)
    store = store_factory(restore_mode="load", stage_layers=1)
    ids, rec = next_turn(model, store, 4)
    staged = store.stage(model, "s", ids)
    assert staged._loader is not None and not staged._loader.released
    compare(model, staged, ids)


def test_stage_layers_holds_back_the_rest_until_the_turn_starts(store_factory):
    model = tiny_model("llama", num_hidden_layers=5)
    store = store_factory(restore_mode="load", stage_layers=2)
    ids, _ = next_turn(model, store, 2)
    staged = store.stage(model, "s", ids)
    loader = staged._loader
    assert loader is not None and loader.threaded
    loader._done[1].wait(5)
    time.sleep(0.1)  # the thread had time to run on if it were going to
    assert [d.is_set() for d in loader._done] == [True, True, False, False, False]
    cache = store.cache_for(model, "s", ids)
    assert cache is staged and loader.released
    compare(model, cache, ids)


@pytest.mark.parametrize("family,grouped", [("llama", False), ("llama", True), ("gemma3", False)])
def test_held_back_layers_take_no_cache_memory_until_the_turn_starts(family, grouped, store_factory, monkeypatch):
    """The staged turn's "read buffer" is sized in layers: only the ``stage_layers`` it loads ahead hold device
    memory; the others' buffers are allocated when the turn starts."""
    import attnstore_hf.cache as cache_mod

    if grouped:  # the accelerator path: no group spans the boundary
        monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model(family, num_hidden_layers=9)
    store = store_factory(restore_mode="load", stage_layers=3)
    ids, rec = next_turn(model, store, 4)

    def held(cache):
        return sum(t.numel() * t.element_size() for t in cache_mod._buffers(cache))

    staged = store.stage(model, "s", ids)
    before = held(staged)
    assert not any(layer.is_initialized for layer in staged.layers[3:])
    assert all(layer.is_initialized for layer in staged.layers[:3])
    cache = store.cache_for(model, "s", ids)
    assert cache is staged and all(layer.is_initialized for layer in cache.layers)
    after = held(cache)
    assert 0 < before < after
    compare(model, cache, ids)


def test_a_changed_turn_is_restored_afresh(store_factory):
    """The user edited the message after the turn was staged: the staged cache is dropped, the turn restored."""
    model = tiny_model("gemma3")
    store = store_factory(restore_mode="load", stage_layers=1)
    ids, rec = next_turn(model, store, 3)
    staged = store.stage(model, "s", ids)
    edited = torch.cat([ids[:, :-3], random_ids(5, 33)], dim=1)
    cache = store.cache_for(model, "s", edited)
    assert cache is not staged and cache.reused_tokens == rec.num_tokens
    assert staged._loader is None and staged.get_seq_length() == 0  # let go, emptied
    assert store.stats()["staged_dropped"] == 1
    compare(model, cache, edited)


def test_a_save_after_staging_drops_the_staged_turn(store_factory):
    model = tiny_model("mistral")
    store = store_factory(restore_mode="load")
    ids, rec = next_turn(model, store, 4)
    staged = store.stage(model, "s", ids)
    # the session's turn is served without the staged cache (another replica, a retry) and saved first
    cache = store.cache_for(model, "s", ids)
    assert cache is staged
    out = compare(model, cache, ids)
    store.save("s", cache, out.sequences).result()
    ids3 = torch.cat([out.sequences, random_ids(4, 44)], dim=1)
    early = store.stage(model, "s", ids3)
    store.save("s", cache, out.sequences).result()  # a save of the session after staging
    assert store.stats()["staged_dropped"] == 1 and early._loader is None
    fresh = store.cache_for(model, "s", ids3)
    assert fresh is not early and fresh.reused_tokens == out.sequences.shape[1] - 1
    compare(model, fresh, ids3)


def test_at_most_stage_sessions_are_held_and_close_lets_go(store_factory):
    model = tiny_model("qwen2")
    store = store_factory(restore_mode="load", stage_sessions=2, stage_layers=0)
    turns = {f"u{k}": next_turn(model, store, 10 + k, session=f"u{k}")[0] for k in range(3)}
    staged = {sid: store.stage(model, sid, ids) for sid, ids in turns.items()}
    assert list(store._staged) == [store._key("u1"), store._key("u2")]  # the oldest (u0) was dropped
    assert staged["u0"]._loader is None and store.stats()["staged_dropped"] == 1
    assert store.cache_for(model, "u2", turns["u2"]) is staged["u2"]
    compare(model, staged["u2"], turns["u2"])
    held = staged["u1"]._loader
    assert held is not None and not held.released
    store.close()  # a staged turn never served: its loader is stopped, nothing hangs
    assert held.finished and staged["u1"]._loader is None
    assert all(not t.name.startswith("attnstore-loader") or not t.is_alive()
               for t in __import__("threading").enumerate() if t is held._thread)


def test_staging_a_disk_record_streams_it_and_a_dropped_one_releases_the_file(store_factory, tmp_path):
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", write_policy="write_through")
    ids, rec = next_turn(model, store, 5)
    store.close()
    store2 = store_factory(restore_mode="load", stage_layers=1)
    staged = store2.stage(model, "s", ids)
    assert staged.source == "disk" and staged.reused_tokens == rec.num_tokens
    lazy = staged._loader.keepalive._lazy  # streamed from the file, layer by layer
    assert not lazy._f.closed
    other = torch.cat([ids, random_ids(2, 55)], dim=1)
    cache = store2.cache_for(model, "s", other)  # not the staged ids: dropped, the file handle released
    assert lazy._f.closed and staged._loader is None
    assert cache is not staged and cache.reused_tokens == rec.num_tokens
    compare(model, cache, other)
    assert store2.stats()["rejected_records"] == 0  # a dropped staged restore is not a bad file


def test_stage_sessions_zero_turns_staging_off(store_factory):
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", stage_sessions=0)
    ids, _ = next_turn(model, store, 6)
    staged = store.stage(model, "s", ids)
    assert not store._staged
    cache = store.cache_for(model, "s", ids)
    assert cache is not staged
    compare(model, cache, ids)


def test_a_dropped_staged_miss_is_emptied_unless_it_was_run(store_factory):
    """Nothing to restore (a new session): the staged cache has no loader; dropped, it is let go of all the same
    — unless someone ran it, then it is theirs and keeps what it computed."""
    model = tiny_model("llama")
    store = store_factory(restore_mode="load")
    ids = random_ids(12, 7)
    staged = store.stage(model, "new", ids)
    assert staged.reused_tokens == 0 and staged._loader is None
    store.drop("new")
    assert staged.turn_ids is None and store.stats()["staged_dropped"] == 1
    staged = store.stage(model, "new", ids)
    with torch.no_grad():
        model(ids, past_key_values=staged, use_cache=True)  # someone used it anyway
    store.drop("new")
    assert staged.get_seq_length() == 12 and staged.turn_ids is not None


def test_a_turn_staged_for_another_model_is_not_handed_over(store_factory):
    model = tiny_model("llama")
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    store = store_factory(restore_mode="load")
    ids, rec = next_turn(model, store, 8)
    staged = store.stage(model, "s", ids)
    assert staged.reused_tokens == rec.num_tokens
    cache = store.cache_for(other, "s", ids)
    assert cache is not staged and cache.reused_tokens == 0  # the record is the other model's: a miss
    assert staged._loader is None and store.stats()["staged_dropped"] == 1
    compare(other, cache, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage_layers", [None, 1])
def test_cuda_staged_turn_on_the_side_stream_is_exact(stage_layers, store_factory):
    """On CUDA a staged restore is enqueued on the side stream (``stage_layers``: the rest once the turn starts);
    the turn's forward waits per layer on the device, exact against a recompute."""
    model = tiny_model("llama").cuda()
    store = store_factory(restore_mode="load", layerwise=True, stage_layers=stage_layers)
    out, rec = saved_turn(model, store, random_ids(50, 90).cuda())
    ids = torch.cat([out.sequences, random_ids(6, 91).cuda()], dim=1)
    staged = store.stage(model, "s", ids)
    assert staged._loader is not None and staged._loader.stream is not None and not staged._loader.threaded
    assert staged._loader.released == (stage_layers is None)
    cache = store.cache_for(model, "s", ids)
    assert cache is staged and cache._loader.released and cache.reused_tokens == rec.num_tokens
    compare(model, cache, ids)


def test_a_staged_cache_the_caller_ran_is_never_emptied(store_factory):
    """docs: generate() run on what stage() returned stays the caller's. Staging more turns than
    ``stage_sessions`` (or a drop / save / close of the session) emptied it all the same: save() then said "the
    cache is empty", and a discard during the caller's generate() on another thread gave shape errors or
    silently wrong tokens. A forward claims the cache; a discard before it leaves a plain, empty cache."""
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", stage_sessions=1)
    ids, rec = next_turn(model, store, 5)
    other, _ = next_turn(model, store, 6, session="o")
    staged = store.stage(model, "s", ids)
    out = compare(model, staged, ids)
    held = staged.get_seq_length()
    store.stage(model, "o", other)  # one staged turn at most: "s" is dropped from the store's list
    store.drop("s")
    assert staged.get_seq_length() == held
    store.save("s", staged, out.sequences).result()
    ids3 = torch.cat([out.sequences, random_ids(4, 7)], dim=1)
    compare(model, store.cache_for(model, "s", ids3), ids3)
    # discarded before the caller ran it: emptied, a plain cache that computes everything, exactly
    early = store.stage(model, "s", ids3)
    store.drop("s")
    assert early.get_seq_length() == 0 and early.reused_tokens == 0
    compare(model, early, ids3)


def test_generate_on_a_cache_whose_store_closed_is_exact(store_factory, tmp_path):
    """write_back, DRAM full: a disk record streamed into a cache promotes itself when its last layer arrives,
    evicting another whose demotion went to the closed store's writer pool (RuntimeError out of generate())."""
    model = tiny_model("llama")
    cfg = dict(dram_bytes=3 * 40 * 1024, disk_dir=tmp_path / "kv", write_policy="write_back", fsync=False)
    with AttentionStore(StoreConfig(**cfg)) as first:
        ids0, _ = next_turn(model, first, 8, session="s0")
    store = store_factory(**cfg)
    for i, sid in enumerate(("a", "b")):
        next_turn(model, store, 20 + i, session=sid)
    cache = store.cache_for(model, "s0", ids0)
    assert cache.source == "disk"
    store.close()
    compare(model, cache, ids0)


def test_a_refused_first_forward_does_not_claim_a_staged_cache(store_factory, tmp_path):
    """A first forward refused by its checks (other ids) claimed the staged cache all the same: the store's
    discard then did nothing, and the loader thread holding back layers (and the record file it streamed) stayed
    for good. A truncated staged turn, discarded, kept its truncation bookkeeping and refused a plain forward."""
    model = tiny_model("llama")
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv", restore_mode="load")) as first:
        ids, _ = next_turn(model, first, 12)
    store = store_factory(disk_dir=tmp_path / "kv", restore_mode="load", stage_layers=1)
    staged = store.stage(model, "s", ids)
    loader = staged._loader
    assert loader is not None and not loader.released and staged.source == "disk"
    with pytest.raises(ValueError, match="other ids"), torch.no_grad():
        model(random_ids(ids.shape[1], 999), past_key_values=staged, use_cache=True)
    store.drop("s")
    assert staged._loader is None and staged.turn_ids is None and store.stats()["staged_dropped"] == 1
    if loader._thread is not None:
        loader._thread.join(5)
        assert not loader._thread.is_alive()
    # truncated, then discarded: its truncation bookkeeping goes (a carried turn then refuses to run at all, see
    # test_a_dropped_staged_turn_that_was_truncated_refuses_to_run)
    small = store_factory(disk_dir=None, max_context=48, reserve_tokens=0, restore_mode="load")
    out, _ = saved_turn(model, small, random_ids(30, 13))
    long_ids = torch.cat([out.sequences, random_ids(20, 14)], dim=1)
    staged = small.stage(model, "s", long_ids)
    assert staged.truncated > 0 and staged.reused_tokens > 0
    small.drop("s")
    assert staged.reused_tokens == 0 and staged.turn_ids is None and not staged.carried
    with pytest.raises(ValueError, match="get the turn again"):
        compare(model, staged, staged.input_ids)


def test_a_staged_turn_counts_in_stats_when_served_not_when_staged(store_factory):
    """A staged turn dropped unused (the message changed) counted a lookup, a hit and its tokens all the same:
    two turns served showed 3 lookups, 2 hits and a hit rate of 0.67."""
    model = tiny_model("llama")
    store = store_factory(restore_mode="load")
    ids, rec = next_turn(model, store, 30)  # turn 1: a miss
    store.stage(model, "s", ids)
    edited = torch.cat([ids[:, :-2], random_ids(4, 31)], dim=1)
    cache = store.cache_for(model, "s", edited)  # turn 2: restored afresh, a hit
    s = store.stats()
    assert (s["lookups"], s["hits"], s["misses"], s["staged"], s["staged_dropped"]) == (2, 1, 1, 1, 1)
    assert s["reused_tokens"] == cache.reused_tokens == rec.num_tokens and s["hit_rate"] == 0.5
    staged = store.stage(model, "s", edited)  # handed over: counted then
    assert store.stats()["lookups"] == 2 and store.cache_for(model, "s", edited) is staged
    assert store.stats()["lookups"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage_layers", [0, 1])
def test_cuda_staged_load_time_leaves_out_the_wait_for_the_turn(stage_layers, store_factory):
    """A staged restore with held-back layers timed its load from stage() to the last layer, the wait for the
    turn to start included (a second here, the whole previous turn in a serving loop): the cost model then saw
    a load of a few MB take seconds and chose recompute for later turns. The wait is left out now."""
    import time

    model = tiny_model("llama").cuda()
    store = store_factory(stage_layers=stage_layers, restore_mode="load", disk_dir=None)
    out, _ = saved_turn(model, store, random_ids(300, 1).cuda())
    ids = torch.cat([out.sequences, random_ids(5, 2).cuda()], 1)
    staged = store.stage(model, "s", ids)
    loader = staged._loader
    time.sleep(1.0)
    cache = store.cache_for(model, "s", ids)
    assert cache is staged
    compare(model, cache, ids)
    torch.cuda.synchronize()
    assert loader.seconds() is not None and loader.seconds() < 0.5


def test_a_dropped_staged_turn_that_was_truncated_refuses_to_run(store_factory):
    """A staged turn that overflowed the window (CA truncation: its restored K/V carry the dropped context) and
    was dropped by the store before it ran (here: another session staged beyond stage_sessions) was emptied and
    computed its kept ids afresh: another answer (0.21 off) for the same turn, silently. It now raises; the turn
    served again through cache_for is the one a kept turn gives."""
    model = tiny_model("mistral")
    store = store_factory(disk_dir=None, max_context=72, reserve_tokens=0, stage_sessions=1)
    out, _ = saved_turn(model, store, random_ids(50, 1), session="a")
    ids = torch.cat([out.sequences, random_ids(30, 2)], 1)
    kept = greedy(model, store.stage(model, "a", ids).input_ids, store.cache_for(model, "a", ids))
    staged = store.stage(model, "a", ids)
    assert staged.truncated and staged.carried
    store.stage(model, "b", random_ids(10, 3))  # more than stage_sessions: a's staged turn is dropped
    with pytest.raises(ValueError, match="get the turn again"):
        greedy(model, staged.input_ids, staged)
    cache = store.cache_for(model, "a", ids)
    again = greedy(model, cache.input_ids, cache)
    assert torch.equal(again.sequences, kept.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(again.logits, kept.logits)) <= 1e-4
