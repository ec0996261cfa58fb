"""StoreConfig.sliding_extra_tokens: sliding-window layers keep the K/V of tokens that left their window, so a turn
that goes back in the conversation (an undone or edited last message, a regenerated reply) is restored, exactly."""

from __future__ import annotations

import random

import pytest
import torch

from attnstore_hf import AttentionStoreCache, ConfigError, StoreConfig
from attnstore_hf.cache import SlidingLayer
from conftest import greedy, logit_diff, random_ids, tiny_model

TOL = 1e-4
WINDOW = 8  # the tiny Gemma 3's sliding window (conftest); its model has 2 global and 4 sliding layers


def turn(model, store, ids, session="s", new=5):
    """cache_for + generate + save; checks the logits against a recompute. Returns (sequences, cache)."""
    cache = store.cache_for(model, session, ids)
    out, ref = greedy(model, ids, cache, new=new), greedy(model, ids, new=new)
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_diff(out, ref) <= TOL
    store.save(session, cache, out.sequences).result()
    return out.sequences, cache


def sliding_lengths(store, session="s"):
    rec, _ = store.get_record(session)
    return [(lay.start, lay.length) for lay in rec.layers if lay.kind == "sliding"]


@pytest.mark.parametrize("fam,overrides", [("gemma3", {}), ("mistral", {"sliding_window": WINDOW})])
@pytest.mark.parametrize("extra", [0, 12, 40])
def test_going_back_restores_what_the_extra_tokens_cover(fam, overrides, extra, store_factory):
    """Turn 1: 40 prompt tokens, 5 generated; turn 2 (restored): 6 more, 5 generated. Then turns that go back to
    before turn 2's reply (a regenerated reply), before its message (undone / edited), and further. Restored
    exactly wherever the record's sliding layers hold the window the kept prefix needs, recomputed (and exact)
    elsewhere; with ``extra=0`` (the default) every going back is a full recompute."""
    model = tiny_model(fam, **overrides)
    store = store_factory(sliding_extra_tokens=extra)
    seq1, _ = turn(model, store, random_ids(40, 1))
    ids2 = torch.cat([seq1, random_ids(6, 2)], 1)
    seq2, cache2 = turn(model, store, ids2)
    assert cache2.reused_tokens == seq1.shape[1] - 1
    stored = seq2.shape[1] - 1  # the last generated token has no K/V yet
    for start, length in sliding_lengths(store):
        assert start + length == stored
        # turn 2's forwards pushed 11 tokens out of the window (turn 1's last token, the 6 new ones, 4 generated
        # ones fed back); a layer keeps at most `extra` of them
        assert length == WINDOW - 1 + min(extra, 11)
    first_kept = stored - (WINDOW - 1) - min(extra, 11)
    for back_to in (ids2.shape[1], seq1.shape[1], seq1.shape[1] - 3, 20):
        ids = torch.cat([seq2[:, :back_to], random_ids(4, back_to)], 1)
        cache = store.cache_for(model, "s", ids)
        out, ref = greedy(model, ids, cache), greedy(model, ids)
        assert torch.equal(out.sequences, ref.sequences)
        assert logit_diff(out, ref) <= TOL
        restorable = back_to - (WINDOW - 1) >= first_kept
        assert cache.reused_tokens == (back_to if restorable else 0), (back_to, first_kept)
    if extra == 0:  # the old behaviour: the window before the last token only
        assert all(length == WINDOW - 1 for _, length in sliding_lengths(store))


def test_a_long_conversation_going_back_at_random_stays_exact(store_factory):
    """Twelve turns; before each one, at random, go back over the last reply, the last exchange or a few tokens,
    or not. Every turn gives the recompute's tokens and logits, and a turn that goes back no further than the
    tokens the last turn pushed out of the window (all of it: extra is larger) is restored."""
    model = tiny_model("gemma3")
    store = store_factory(sliding_extra_tokens=64)
    rng = random.Random(7)
    seq, _ = turn(model, store, random_ids(30, 0))
    prev_len = 30
    for t in range(12):
        stored = seq.shape[1]
        back_to = rng.choice([stored, stored, prev_len, prev_len - rng.randint(1, 3), stored - rng.randint(1, 4)])
        ids = torch.cat([seq[:, :back_to], random_ids(rng.randint(2, 9), 100 + t)], 1)
        new_seq, cache = turn(model, store, ids, new=rng.randint(2, 6))
        assert cache.reused_tokens == min(back_to, stored - 1), (t, back_to, stored)
        seq, prev_len = new_seq, ids.shape[1]


def test_beam_search_save_keeps_the_extra_tokens(store_factory):
    """Beam search saves the tokens its beams share (prompt_views): the sliding layers keep what they hold before
    them, extra tokens included, and the next turn going back is restored exactly."""
    model = tiny_model("gemma3")
    store = store_factory(sliding_extra_tokens=16)
    ids = random_ids(30, 3)
    cache = store.cache_for(model, "s", ids)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                         min_new_tokens=4, num_beams=3, do_sample=False)
    rec = store.save("s", cache, out).result()
    assert rec.num_tokens == 30
    # 30 + 3 tokens fed, the last 7 held: 26 left the window, the last 16 kept (positions 10..25), so the record
    # holds positions 10..29 (the beams differ from position 30 on)
    assert {(lay.start, lay.length) for lay in rec.layers if lay.kind == "sliding"} == {(10, 20)}
    back = torch.cat([ids[:, :25], random_ids(3, 4)], 1)
    cache = store.cache_for(model, "s", back)
    got, ref = greedy(model, back, cache), greedy(model, back)
    assert cache.reused_tokens == 25
    assert logit_diff(got, ref) <= TOL


def test_extra_tokens_survive_disk_and_a_new_store(store_factory):
    model = tiny_model("gemma3")
    store = store_factory(sliding_extra_tokens=16)
    seq, _ = turn(model, store, random_ids(30, 5))
    store.close()
    fresh = store_factory(sliding_extra_tokens=0)  # records keep what they hold, whatever the reader's setting
    ids = torch.cat([seq[:, :30], random_ids(3, 6)], 1)
    cache = fresh.cache_for(model, "s", ids)
    assert cache.source == "disk" and cache.reused_tokens == 30
    got, ref = greedy(model, ids, cache), greedy(model, ids)
    assert logit_diff(got, ref) <= TOL


def test_kept_tokens_are_bounded_and_copied(store_factory):
    """A long reply decoded token by token keeps at most ``extra`` tokens aside (in few chunks), each a copy (not a
    view holding an older window alive)."""
    model = tiny_model("gemma3")
    cache = AttentionStoreCache(model, sliding_extra_tokens=5)
    ids = random_ids(20, 8)
    greedy(model, ids, cache, new=60)
    for layer in cache.layers:
        if isinstance(layer, SlidingLayer):
            assert layer._fallen_len <= 2 * 5 and len(layer._fallen) <= 33
            for raw, values in layer._fallen:
                assert raw._base is None and values._base is None
            raw, values, start = layer.raw_state()
            assert raw.shape[-2] == values.shape[-2] == WINDOW - 1 + 5
            assert start == 20 + 59 - raw.shape[-2]


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True])
def test_bad_values_are_refused(bad, tmp_path):
    with pytest.raises(ConfigError, match="sliding_extra_tokens"):
        StoreConfig(sliding_extra_tokens=bad)
    with pytest.raises(ValueError, match="sliding_extra_tokens"):
        AttentionStoreCache(tiny_model("gemma3"), sliding_extra_tokens=bad)


def test_undo_twice_over_turns_that_started_at_the_same_place(store_factory):
    """The chat's undo() leaves the last token without K/V, like a turn's record: undo, a new turn from there, undo
    again is restored both times (with the K/V of every token stored, the second undo needed one token more than
    the turn in between pushed out of the window: a recompute, found by the chat's test on the real model)."""
    from attnstore_hf.cli.chat import undo

    model = tiny_model("gemma3")
    store = store_factory(sliding_extra_tokens=32)
    h1, _ = turn(model, store, random_ids(30, 9))
    h1 = h1[0].tolist()
    for t in range(3):
        turn(model, store, torch.cat([torch.tensor([h1]), random_ids(5, 20 + t)], 1))
        got = undo(model, store, "s", h1)
        assert store.history("s") == h1
        assert got == {"restored": len(h1) - 1, "prefilled": 0, "source": "dram"}, t
    ids = torch.cat([torch.tensor([h1]), random_ids(4, 30)], 1)
    cache = store.cache_for(model, "s", ids)
    ours, ref = greedy(model, ids, cache), greedy(model, ids)
    assert cache.reused_tokens == len(h1) - 1 and logit_diff(ours, ref) <= TOL


def test_a_numpy_integer_is_taken():
    """(``StoreConfig`` took a numpy integer, then every ``cache_for`` refused it: found by a review.)"""
    np = pytest.importorskip("numpy")
    cfg = StoreConfig(sliding_extra_tokens=np.int64(16))
    assert type(cfg.sliding_extra_tokens) is int and cfg.sliding_extra_tokens == 16
    cache = AttentionStoreCache(tiny_model("gemma3"), sliding_extra_tokens=np.int64(4))
    assert {layer.extra_tokens for layer in cache.layers if isinstance(layer, SlidingLayer)} == {4}
