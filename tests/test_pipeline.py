"""Layer-wise restore, asynchronous save and the load / recompute / both choice: exact, ordered, never lost."""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
import threading
import time

import pytest
import torch

import attnstore_hf.cache as cache_mod
from attnstore_hf.pipeline.cost import CostModel
from conftest import FAMILIES, compare, greedy, random_ids, saved_turn, tiny_model

TOL = 1e-4



@pytest.mark.parametrize("mode", ["load", "both", "tail", "recompute"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_every_restore_choice_matches_recompute(family, store_factory, mode, layerwise):
    model = tiny_model(family)
    store = store_factory(restore_mode=mode, layerwise=layerwise)
    out, rec = saved_turn(model, store, random_ids(80, 1))
    ids = torch.cat([out.sequences, random_ids(9, 2)], dim=1)
    cache = store.cache_for(model, "s", ids)
    if mode == "tail" and family == "gemma3":  # sliding layers hold only the window before the last token
        mode = "load"
    assert cache.restore_plan["choice"] == mode
    split = cache.restore_plan["split"]
    expected = {"load": rec.num_tokens, "both": rec.num_tokens, "tail": rec.num_tokens - split, "recompute": 0}
    assert cache.reused_tokens == expected[mode]
    if mode in ("both", "tail"):
        assert 0 < split < rec.num_tokens
        assert store.stats()[f"restore_{mode}"] == 1
    ours = compare(model, cache, ids)
    # what was restored (or recomputed) is saved again whole: the next turn continues exactly
    store.save("s", cache, ours.sequences)
    ids3 = torch.cat([ours.sequences, random_ids(4, 3)], dim=1)
    c3 = store.cache_for(model, "s", ids3)
    stored = ids3.shape[1] - 5  # the whole turn was saved, the last reply token has no KV yet
    assert c3.reused_tokens == {"recompute": 0, "tail": stored - c3.restore_plan["split"]}.get(mode, stored)
    compare(model, c3, ids3)


def test_layers_wait_for_their_own_kv_and_compute_overlaps_loading(store_factory, monkeypatch):
    """Layer i computes only after job i finished, and layer 0 computes before the last job finished."""
    model = tiny_model("llama", num_hidden_layers=6)
    store = store_factory(restore_mode="load", layerwise=True)
    out, _ = saved_turn(model, store, random_ids(60, 4))
    ids = torch.cat([out.sequences, random_ids(7, 5)], dim=1)
    log: list[tuple[str, int, float]] = []
    real_apply = cache_mod.apply_rope_into
    layer_of = {}  # data pointer of a layer's key buffer -> the layer (sized before any job runs)
    real_prepare = cache_mod.ChunkedLayer.prepare

    def prepare(self, *a, **k):
        real_prepare(self, *a, **k)
        layer_of[self._k.data_ptr()] = self

    monkeypatch.setattr(cache_mod.ChunkedLayer, "prepare", prepare)

    def slow_apply(out, keys, cos, sin):  # a slow tier: each layer takes 30 ms to arrive
        time.sleep(0.03)
        real_apply(out, keys, cos, sin)
        log.append(("loaded", layer_of[out.data_ptr()], time.perf_counter()))
        return out

    monkeypatch.setattr(cache_mod, "apply_rope_into", slow_apply)
    handles = []
    for i, layer in enumerate(model.model.layers):  # when each layer's attention is done (it waits inside)
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, o, i=i: log.append(("attn", i, time.perf_counter()))))
    try:
        cache = store.cache_for(model, "s", ids)
        assert cache._loader is not None and cache._loader.threaded
        with torch.no_grad():
            first = model(cache.input_ids[:, cache.reused_tokens:], past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    loaded = {cache.layers.index(layer): t for kind, layer, t in log if kind == "loaded"}
    attn = {i: t for kind, i, t in log if kind == "attn"}
    assert sorted(loaded) == list(range(6)) == sorted(attn)
    assert all(attn[i] >= loaded[i] for i in range(6)), "a layer computed before its K/V arrived"
    assert attn[0] < loaded[5], "no overlap: layer 0 waited for the whole record"
    ref = model(ids, use_cache=False).logits[:, -1]
    assert (first.logits[:, -1] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("restore_in", ["no_grad", "inference_mode"])
def test_a_layer_that_fails_mid_forward_is_recomputed_exactly(family, store_factory, monkeypatch, caplog, grouped,
                                                               restore_in):
    """(``restore_in``: ``cache_for`` under that mode, generate() outside it: the recovery writes the buffers made
    under inference mode.)"""
    if grouped:  # as on an accelerator: the third rotation is the group [2 3]'s
        monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model(family)
    store = store_factory(restore_mode="load", layerwise=True)
    out, rec = saved_turn(model, store, random_ids(50, 6))
    ids = torch.cat([out.sequences, random_ids(8, 7)], dim=1)
    real_rotate = cache_mod.apply_rope_into
    calls = {"n": 0}

    def flaky(*a, **k):  # the third layer's data turn out unusable after the forward has started
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated read error")
        return real_rotate(*a, **k)

    monkeypatch.setattr(cache_mod, "apply_rope_into", flaky)
    with caplog.at_level(logging.WARNING):
        with {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[restore_in]():
            cache = store.cache_for(model, "s", ids)
        assert cache.reused_tokens == rec.num_tokens
        ours = compare(model, cache, ids)
    assert "recomputing" in caplog.text and cache.recomputed_tokens == rec.num_tokens
    monkeypatch.setattr(cache_mod, "apply_rope_into", real_rotate)
    # the turn's record is whole and right
    store.save("s", cache, ours.sequences)
    ids3 = torch.cat([ours.sequences, random_ids(3, 8)], dim=1)
    compare(model, store.cache_for(model, "s", ids3), ids3)


def unsaved_turn(store_factory, family, n, seed):
    """A store and one generated turn that is not saved yet: (model, store, cache, generate output)."""
    model = tiny_model(family)
    store = store_factory(restore_mode="load")
    ids = random_ids(n, seed)
    cache = store.cache_for(model, "s", ids)
    return model, store, cache, greedy(model, ids, cache)


def held(monkeypatch, obj, name) -> threading.Event:
    """Make ``obj.name`` wait until the returned event is set (released after 0.2 s by a timer)."""
    gate = threading.Event()
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: (gate.wait(5), real(*a, **k))[1])
    return gate


def test_save_returns_before_commit_and_reads_see_the_write(store_factory, monkeypatch):
    model, store, cache, out = unsaved_turn(store_factory, "qwen3", 40, 9)
    gate = held(monkeypatch, store, "put_record")
    fut = store.save("s", cache, out.sequences)
    assert not fut.done()  # save() did not wait for the commit
    threading.Timer(0.2, gate.set).start()
    ids2 = torch.cat([out.sequences, random_ids(5, 10)], dim=1)
    c2 = store.cache_for(model, "s", ids2)  # waits for this session's save: read your writes
    assert fut.done() and c2.reused_tokens == out.sequences.shape[1] - 1
    compare(model, c2, ids2)


def test_changing_the_cache_right_after_save_does_not_change_the_record(store_factory, monkeypatch):
    """The snapshot is taken before the cache changes in place (crop + more tokens overwrite the buffers)."""
    model, store, cache, out = unsaved_turn(store_factory, "llama", 30, 11)
    expected = [t.clone() for t, _, _ in cache.raw_layers()]
    gate = held(monkeypatch, store, "_build_record")
    fut = store.save("s", cache, out.sequences)
    threading.Timer(0.2, gate.set).start()
    cache.crop(-10)  # waits for the snapshot copy, then overwrites the tail
    with torch.no_grad():
        model(random_ids(10, 12), past_key_values=cache, use_cache=True)
    rec = fut.result()
    for lay, want in zip(rec.layers, expected):
        assert torch.equal(lay.keys, want)


def test_save_queue_bounds_saves_in_flight(store_factory, monkeypatch):
    """With save_queue=2 and two saves held (their commit blocked), a third save() waits until one finishes."""
    model = tiny_model("mistral")
    store = store_factory(restore_mode="load", save_queue=2)
    gate = threading.Event()
    real_put = store.put_record

    def held_put(rec):
        gate.wait(30)
        real_put(rec)

    monkeypatch.setattr(store, "put_record", held_put)
    turns = []
    for k in range(3):
        ids = random_ids(20, 20 + k)
        cache = store.cache_for(model, f"s{k}", ids)
        turns.append((f"s{k}", cache, greedy(model, ids, cache).sequences))
    futs = [store.save(*turn) for turn in turns[:2]]  # both return at once
    third = threading.Thread(target=lambda: futs.append(store.save(*turns[2])), daemon=True)
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a third save was taken while two were in flight"
    gate.set()
    third.join(30)
    assert not third.is_alive()
    store.flush()
    assert all(f.done() for f in futs) and len(futs) == 3 and len(store.sessions()) == 3


@pytest.mark.parametrize("grouped", [False, True])
def test_random_interleavings_of_many_sessions_stay_exact(store_factory, monkeypatch, grouped):
    """Many sessions, turns in random order, small DRAM (records move to disk and back), every option mixed.
    ``grouped``: the accelerator's grouped restore forced on the CPU, with a pace that changes from turn to turn
    (the tier's bandwidth and the prefill times the cost model sees set at random), and some turns staged
    before they are served."""
    rng = random.Random(0)
    if grouped:
        monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    for family in ("llama", "gemma3"):
        model = tiny_model(family, num_hidden_layers=8) if grouped else tiny_model(family)
        store = store_factory(restore_mode="load", dram_bytes=60_000 if not grouped else 400_000)
        convs = {f"c{k}": random_ids(rng.randint(10, 40), 100 + k) for k in range(5)}
        paces = set()
        for step in range(16):
            sid = rng.choice(sorted(convs))
            ids = convs[sid]
            if grouped:
                store.cost.bandwidth["dram"] = rng.choice([1e5, 1e7, 1e9])
                store.cost.observe_prefill(rng.randint(1, 200), rng.uniform(1e-3, 5e-2))
                if rng.random() < 0.3:
                    store.stage(model, sid, ids)
            cache = store.cache_for(model, sid, ids)
            if cache.restore_plan and "pace" in cache.restore_plan:
                paces.add(round(cache.restore_plan["pace"][0], 1))
            ours = compare(model, cache, ids)
            store.save(sid, cache, ours.sequences)
            convs[sid] = torch.cat([ours.sequences, random_ids(rng.randint(2, 9), 1000 + step)], dim=1)
        assert store.stats()["hits"] >= 8
        assert not grouped or len(paces) >= 3  # the groups were sized by several different paces


def restore_groups(cache) -> list[list[int]]:
    """The full-attention layers of a restored cache, grouped by the device block their buffers are views of (the
    layers a grouped restore handled together), once every layer is in place."""
    cache.wait_loaded()
    groups: dict = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, cache_mod.ChunkedLayer):
            groups.setdefault(layer._k.untyped_storage().data_ptr(), []).append(i)
    return sorted(groups.values())


@pytest.mark.parametrize("layerwise", [True, False])
def test_grouped_restore_shares_blocks_and_is_exact(family, store_factory, monkeypatch, layerwise):
    """The accelerator restore (consecutive full-attention layers in groups of 1, 1, 2, 4: one copy per tensor,
    one kernel set per group), run here on the CPU: the layers of a group share one block, and every turn after
    it, decode growing the buffers and the next save included, matches a recompute."""
    monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model(family, num_hidden_layers=9)
    store = store_factory(restore_mode="load", layerwise=layerwise)
    ids = random_ids(40, 5)
    for turn in range(3):
        cache = store.cache_for(model, "s", ids)
        if turn:
            assert cache.reused_tokens == ids.shape[1] - 7  # the last reply token has no KV yet
            groups = restore_groups(cache)
            if family != "gemma3":  # every layer is full attention: groups [0] [1] [2 3] [4 5 6 7] [8]
                assert groups == [[0], [1], [2, 3], [4, 5, 6, 7], [8]]
            else:  # sliding layers break the runs; no group spans one
                assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
        out = compare(model, cache, ids)
        assert cache.recomputed_tokens == 0
        store.save("s", cache, out.sequences)
        ids = torch.cat([out.sequences, random_ids(6, 50 + turn)], dim=1)


@pytest.mark.parametrize("layerwise", [True, False])
def test_cache_for_reports_where_its_host_time_went(store_factory, layerwise):
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", layerwise=layerwise)
    miss = store.cache_for(model, "s", random_ids(30, 60))
    assert set(miss.host_ms) == {"prepare", "find", "match", "restore", "finish"}  # nothing restored
    out = greedy(model, miss.input_ids, miss)
    store.save("s", miss, out.sequences).result()
    ids = torch.cat([out.sequences, random_ids(4, 61)], dim=1)
    t0 = time.perf_counter()
    hit = store.cache_for(model, "s", ids)
    wall = (time.perf_counter() - t0) * 1e3
    ms = hit.host_ms
    assert {"restore_setup", "restore_issue"} <= set(ms)
    assert "restore_jobs" not in ms  # on a CPU a thread runs the jobs (on CUDA cache_for enqueues them: timed)
    assert all(v >= 0 for v in ms.values())
    assert ms["restore_setup"] + ms["restore_issue"] <= ms["restore"] + 1e-6
    assert sum(ms[k] for k in ("prepare", "find", "match", "restore", "finish")) <= wall + 1e-6
    compare(model, hit, ids)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_restored_cache_has_room_for_the_turn_and_its_reply(store_factory, monkeypatch, grouped):
    """Restored buffers hold the history, the new tokens and MIN_GROWTH more: the turn's prefill and the reply's
    first decode steps write in place (no copy of the whole history at the first decode step)."""
    if grouped:
        monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", layerwise=False)
    out, rec = saved_turn(model, store, random_ids(60, 62))
    ids = torch.cat([out.sequences, random_ids(7, 63)], dim=1)
    cache = store.cache_for(model, "s", ids)
    ptrs = [layer._k.data_ptr() for layer in cache.layers]
    assert all(layer._k.shape[-2] == ids.shape[1] + cache_mod.MIN_GROWTH for layer in cache.layers)
    compare(model, cache, ids)  # 7 new tokens + 5 generated
    assert [layer._k.data_ptr() for layer in cache.layers] == ptrs


def test_group_starts():
    assert sorted(cache_mod._group_starts(18)) == [0, 1, 2, 4, 8, 12, 16]
    assert sorted(cache_mod._group_starts(3)) == [0, 1, 2]


def _sizes(starts, n):
    s = sorted(starts) + [n]
    return [b - a for a, b in zip(s, s[1:])]


def test_group_starts_follow_the_pace_of_the_turn():
    """The forward 5.5x slower per layer than the load (an H100 at 1,024 tokens of Llama-3-8B history: load 5.4 ms,
    new tokens 29.7 ms): group k may reach layer 5.5 x its first and still land before compute gets there."""
    assert sorted(cache_mod._group_starts(32, (5.5, 0.0))) == [0, 1, 5, 27]
    # a head start of a third of the load (half of it counted: 32 * 1/3 * 0.5 = 5.3 layers) reaches further
    assert sorted(cache_mod._group_starts(32, (5.5, 1 / 3))) == [0, 1, 10]
    # the load slower than the forward (Llama-2-7B at 8,192: load 100 ms, new 30 ms): the fixed schedule
    assert cache_mod._group_starts(32, (0.3, 0.0)) == cache_mod._group_starts(32)
    fixed = _sizes(cache_mod._group_starts(32), 32)
    rng = random.Random(0)
    for _ in range(200):  # never finer than the fixed schedule: the k-th group at least as long as its k-th
        pace = (rng.uniform(0, 12), rng.uniform(0, 2))
        sizes = _sizes(cache_mod._group_starts(32, pace), 32)
        assert sizes[0] == 1 and sum(sizes) == 32
        assert all(a >= b for a, b in zip(sizes[:-1], fixed))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_paced_groups_are_exact_and_follow_the_measured_pace(store_factory, monkeypatch, device):
    """With the cost model's measurements saying the forward is 6x slower per layer than the load, the grouped
    restore (forced on the CPU) makes fewer, larger groups, and every turn still matches a recompute (on CUDA:
    the layers of a group wait for its one event once)."""
    monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama", num_hidden_layers=12).to(device)
    store = store_factory(restore_mode="load", layerwise=True)
    ids = random_ids(40, 71).to(device)
    out, rec = saved_turn(model, store, ids)
    ids = torch.cat([out.sequences, random_ids(6, 72).to(device)], dim=1)
    nbytes = rec.nbytes
    # what a store measures over a few turns: this tier loads the record in 1 ms; a forward of the new tokens
    # takes 6 ms, whatever its size (launch-bound)
    store.cost.bandwidth["dram"] = nbytes / 1e-3
    with store.cost._lock:  # the first turn's own forward, timed on a busy machine, would bend the fitted line
        store.cost._prefills.clear()
    for n in (6, 60, 600):
        store.cost.observe_prefill(n, 6e-3)
    cache = store.cache_for(model, "s", ids)
    assert cache.restore_plan["pace"] == pytest.approx((6.0, 0.0), rel=0.05)
    assert restore_groups(cache) == [[0], list(range(1, 6)), list(range(6, 12))]  # fixed: 1, 1, 2, 4, 4
    out = compare(model, cache, ids)
    store.save("s", cache, out.sequences)
    ids = torch.cat([out.sequences, random_ids(5, 73).to(device)], dim=1)
    compare(model, store.cache_for(model, "s", ids), ids)


def test_a_restore_group_stages_at_most_group_max_bytes(store_factory, monkeypatch):
    """However fast the forward is against the load, a group's record data (its device staging block) stays under
    GROUP_MAX_BYTES: here two layers' worth, so the paced group of 11 layers is cut into groups of 2."""
    monkeypatch.setattr(cache_mod, "GROUP_DEVICES", ("cuda", "cpu"))
    model = tiny_model("llama", num_hidden_layers=12)
    store = store_factory(restore_mode="load", layerwise=True)
    out, rec = saved_turn(model, store, random_ids(40, 74))
    ids = torch.cat([out.sequences, random_ids(6, 75)], dim=1)
    monkeypatch.setattr(cache_mod, "GROUP_MAX_BYTES", 2 * rec.layers[0].nbytes)
    store.cost.bandwidth["dram"] = rec.nbytes / 1e-3
    for n in (6, 60, 600):
        store.cost.observe_prefill(n, 50e-3)  # pace 50: one group after the first layer, but for the cap
    cache = store.cache_for(model, "s", ids)
    assert restore_groups(cache) == [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11]]
    compare(model, cache, ids)


def test_cost_model_choices():
    cm = CostModel()
    mb = 1 << 20
    # nothing measured yet: load
    assert cm.choose("disk", 100 * mb, 1000, "auto", accelerator=True)["choice"] == "load"
    cm.observe_load("disk", 100 * mb, 1.0)          # 100 MB/s
    cm.observe_prefill(1000, 0.1)                    # 0.1 ms per token
    plan = cm.choose("disk", 100 * mb, 1000, "auto", accelerator=False)
    assert plan["choice"] == "recompute" and plan["predicted_load_s"] == pytest.approx(1.0)
    assert plan["predicted_turn_s"] == pytest.approx({"load": 1.0, "recompute": 0.1})
    # a disk record is read and checked whole: recomputing part of it saves no reading, so never "both" there
    assert cm.choose("disk", 100 * mb, 1000, "auto", accelerator=True)["choice"] == "recompute"
    forced = cm.choose("disk", 100 * mb, 1000, "both", accelerator=True)
    assert forced["choice"] == "both" and forced["predicted_both_s"] == pytest.approx(1.0)  # all of it is read
    # a DRAM record can be loaded in part: both, split so both finish together
    cm.observe_load("dram", 100 * mb, 1.0)           # a slow link, as slow as the disk above
    plan = cm.choose("dram", 100 * mb, 1000, "auto", accelerator=True)
    # r * 0.1 ms == (1000 - r) * 1 ms  ->  r = 909
    assert plan["choice"] == "both" and plan["split"] == 909
    assert plan["predicted_both_s"] < min(plan["predicted_load_s"], plan["predicted_recompute_s"])
    assert cm.choose("dram", 100 * mb, 1000, "auto", accelerator=False)["choice"] == "recompute"  # CPU: no both
    assert cm.choose("dram", 100 * mb, 1000, "auto", accelerator=True, can_split=False)["choice"] == "recompute"
    fast = CostModel()
    fast.observe_prefill(1000, 0.1)
    fast.observe_load("dram", 100 * mb, 0.01)        # fast tier: load
    assert fast.choose("dram", 100 * mb, 1000, "auto", accelerator=True)["choice"] == "load"
    # never slower than recompute (as predicted): loading predicted 1.3x the recompute -> recompute
    near = CostModel()
    near.observe_prefill(1000, 0.1)
    near.observe_load("disk", 100 * mb, 0.13)
    assert near.choose("disk", 100 * mb, 1000, "auto", accelerator=True)["choice"] == "recompute"
    near.observe_load("disk", 100 * mb, 0.05)        # now predicted faster than recomputing: load
    assert near.choose("disk", 100 * mb, 1000, "auto", accelerator=True)["choice"] == "load"
    assert cm.choose("disk", 100 * mb, 1000, "load", accelerator=True)["choice"] == "load"
    assert cm.choose("disk", 1000, 20, "both", accelerator=True)["choice"] == "load"  # too short to split
    # tiny restores are never measured (their time is overhead)
    cm.observe_load("redis", 1000, 1.0)
    assert "redis" not in cm.bandwidth


def test_cost_model_fits_a_launch_bound_prefill_and_picks_as_measured_on_an_h100():
    """The numbers of an H100 run (Llama-3-8B shape, bf16): a 100-token forward takes ~30 ms however few its
    tokens (launching kernels), 8,292 tokens ~258 ms. With the fitted line the choices are the fastest ones
    measured: from page-locked DRAM load (layered 43 ms vs recompute 258), from a disk record in the page cache
    recompute (257 ms vs a layer-wise load of 332)."""
    cm = CostModel()
    for _ in range(3):
        cm.observe_prefill(100, 0.030)
        cm.observe_prefill(8292, 0.258)
    a, b = cm.prefill_line()
    assert a == pytest.approx(0.0272, abs=1e-3) and b == pytest.approx(27.8e-6, rel=0.02)
    kv = 1_073_741_824  # 8,192 tokens of Llama-3-8B KV in bf16
    cm.observe_load("dram", kv, 0.027)
    plan = cm.choose("dram", kv, 8192, "auto", accelerator=True, new_tokens=100)
    assert plan["choice"] == "load" and plan["predicted_turn_s"]["load"] == pytest.approx(0.030, abs=1e-3)
    cm.observe_load("disk", kv, 0.332)
    plan = cm.choose("disk", kv, 8192, "auto", accelerator=True, new_tokens=100)
    assert plan["choice"] == "recompute" and "both" not in plan["predicted_turn_s"]
    # seen only 100-token forwards, the line goes through the origin (0.3 ms a token): 8,192 tokens are predicted
    # at 2.5 s and the disk load is kept, until a longer forward shows the fixed part
    short = CostModel()
    short.observe_prefill(100, 0.030)
    short.observe_load("disk", kv, 0.332)
    assert short.prefill_line() == pytest.approx((0.0, 0.0003))
    assert short.choose("disk", kv, 8192, "auto", accelerator=True, new_tokens=100)["choice"] == "load"


def test_prefill_prediction_interpolates_between_the_sizes_seen():
    cm = CostModel()
    assert cm.prefill_seconds(100) is None
    for n, t in ((100, 0.030), (100, 0.032), (1124, 0.036), (2148, 0.065), (8292, 0.258)):
        cm.observe_prefill(n, t)
    assert cm.prefill_seconds(100) == pytest.approx(0.031)  # the median at a size seen
    assert cm.prefill_seconds(612) == pytest.approx(0.031 + 0.005 * 512 / 1024)  # between two sizes
    a, b = cm.prefill_line()
    assert a + b * 1124 > 1.3 * cm.prefill_seconds(1124) == pytest.approx(1.3 * 0.036)  # the line: far above
    assert cm.prefill_seconds(16384) == pytest.approx(a + b * 16384)  # beyond the sizes seen: the line
    assert cm.prefill_seconds(50) <= 0.031 and cm.prefill_seconds(0) == 0.0
    cm.observe_prefill(612, 0.050)  # a new forward: the prediction follows it at once
    assert cm.prefill_seconds(612) == pytest.approx(0.050)
    noisy = CostModel()  # a short forward measured slower than a longer one: never predicted that way
    for n, t in ((100, 0.049), (1124, 0.047), (4196, 0.125)):
        noisy.observe_prefill(n, t)
    assert noisy.prefill_seconds(1124) == pytest.approx(0.049)
    assert noisy.prefill_seconds(600) == pytest.approx(0.049)


def test_restore_host_time_counts_in_the_turn_as_measured_on_two_h100_hosts():
    """Llama-3-8B shape, bf16, 100 new tokens, record in page-locked DRAM (docs/img/overlap_gpu_llama3-8b*.json).
    Host B: the 100-token forward 48.8 ms, recomputing 1,124 tokens 46.7 ms, loading 1,024 tokens' KV 6.7 ms,
    cache_for's host work 8 ms: the layered turn took 62.9 ms, so recomputing was faster; the old prediction
    (the load alone against a line's 58 ms recompute) loaded. Host A: from 2,048 tokens on loading wins."""
    kv_per_token = 131_072  # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
    b = CostModel()
    b.observe_prefill(100, 0.0488)
    b.observe_prefill(1124, 0.0467)
    b.observe_prefill(8292, 0.2576)
    b.observe_load("dram", 1024 * kv_per_token, 0.0067)
    plan = b.choose("dram", 1024 * kv_per_token, 1024, "auto", accelerator=True, new_tokens=100)
    assert plan["choice"] == "load"  # nothing known of the restore's host work yet
    b.observe_restore_host("dram", 0.008)
    plan = b.choose("dram", 1024 * kv_per_token, 1024, "auto", accelerator=True, new_tokens=100)
    assert plan["predicted_restore_host_s"] == 0.008
    assert plan["predicted_turn_s"]["load"] == pytest.approx(0.008 + 0.0488)
    assert plan["choice"] == "recompute"
    a = CostModel()
    for n, t in ((100, 0.0297), (1124, 0.0357), (2148, 0.0645), (4196, 0.1250), (8292, 0.2584)):
        a.observe_prefill(n, t)
    a.observe_load("dram", 1024 * kv_per_token, 0.0054)
    a.observe_restore_host("dram", 0.0053)
    for hist in (2048, 4096, 8192):
        plan = a.choose("dram", hist * kv_per_token, hist, "auto", accelerator=True, new_tokens=100)
        # loaded (at 8,192 the bandwidth measured on 1,024 tokens predicts a 43 ms load, slower than the new
        # tokens' 30 ms forward: the last ~1,100 tokens are recomputed with them, see the tail test below)
        assert plan["choice"] == ("tail" if hist == 8192 else "load"), (hist, plan)
        assert plan["predicted_turn_s"][plan["choice"]] < plan["predicted_turn_s"]["recompute"]
    # once loads of other sizes are measured (host A: 2,048 / 4,096 / 8,192 tokens in 9.0 / 15.6 / 27.0 ms), the
    # load time follows a line with a fixed part: 8,192 tokens ~27 ms, faster than the new tokens: loaded whole
    for hist, sec in ((2048, 0.0090), (4096, 0.0156), (8192, 0.0270)):
        a.observe_load("dram", hist * kv_per_token, sec)
    assert a.load_seconds("dram", 8192 * kv_per_token) == pytest.approx(0.027, rel=0.05)
    assert a.load_seconds("dram", 1024 * kv_per_token) == pytest.approx(0.0054, rel=0.2)
    plan = a.choose("dram", 8192 * kv_per_token, 8192, "auto", accelerator=True, new_tokens=100)
    assert plan["choice"] == "load" and "tail" not in plan["predicted_turn_s"]
    # a sync restore's measured time already includes its host work: not added again
    plan = a.choose("dram", 2048 * kv_per_token, 2048, "auto", accelerator=True, new_tokens=100, layerwise=False)
    assert plan["predicted_restore_host_s"] == 0.0


def test_tail_recomputes_the_last_tokens_with_the_new_ones_where_the_load_is_the_slower_side():
    """Llama-2-7B shape on an H100 (no GQA: 0.5 MB of KV a token): 8,192 tokens load in 100 ms, the 100 new
    tokens' forward takes 30 ms and 1,124 tokens 41 ms (launch-bound), 8,292 tokens 262 ms; the layered turn
    took 102 ms. Loading the first ~5,900 tokens and recomputing the last ~2,250 with the new ones meets in the
    middle: ~72 ms predicted, one forward (both: two forwards, ~30 ms more)."""
    kv_per_token = 524_288
    cm = CostModel()
    for n, t in ((100, 0.030), (1124, 0.041), (2148, 0.066), (4196, 0.129), (8292, 0.262)):
        cm.observe_prefill(n, t)
    cm.observe_load("dram", 8192 * kv_per_token, 0.0997)
    plan = cm.choose("dram", 8192 * kv_per_token, 8192, "auto", accelerator=True, new_tokens=100)
    turn = plan["predicted_turn_s"]
    assert plan["choice"] == "tail" and turn["tail"] < min(turn["load"], turn["both"], turn["recompute"])
    r = plan["split"]
    assert 2000 < r < 2500  # where loading the rest takes as long as the forward over r + 100 tokens
    assert (8192 - r) / 8192 * 0.0997 == pytest.approx(cm.prefill_seconds(r + 100), rel=0.02)
    assert turn["tail"] == pytest.approx(turn["load"] - 0.0997 + cm.prefill_seconds(r + 100), rel=0.02)
    assert plan["pace"][0] == pytest.approx(1.0, rel=0.05)  # the forward and the (shorter) load keep pace
    # not on a CPU (loader and model share the cores), not where the record is read whole, not when loading is
    # already the faster side
    assert cm.choose("dram", 8192 * kv_per_token, 8192, "auto", accelerator=False, new_tokens=100)["choice"] \
        == "load"
    cm.observe_load("disk", 8192 * kv_per_token, 0.0997)
    assert "tail" not in cm.choose("disk", 8192 * kv_per_token, 8192, "auto", accelerator=True,
                                   new_tokens=100)["predicted_turn_s"]
    fast = CostModel()
    for n, t in ((100, 0.030), (8292, 0.262)):
        fast.observe_prefill(n, t)
    fast.observe_load("dram", 8192 * kv_per_token, 0.020)
    plan = fast.choose("dram", 8192 * kv_per_token, 8192, "auto", accelerator=True, new_tokens=100)
    assert plan["choice"] == "load" and "tail" not in plan["predicted_turn_s"]
    # forced: with nothing measured, half of it; where loading is the faster side, the fewest worth splitting off
    assert CostModel().choose("dram", 1000, 200, "tail", accelerator=False)["split"] == 100
    assert fast.choose("dram", 8192 * kv_per_token, 8192, "tail", accelerator=True, new_tokens=100)["split"] == 32


def test_the_store_measures_the_host_work_of_its_restores(store_factory):
    model = tiny_model("llama")
    store = store_factory(restore_mode="load", layerwise=True)
    out, _ = saved_turn(model, store, random_ids(40, 80))
    assert store.cost.restore_host_s == {}  # a miss restores nothing
    ids = torch.cat([out.sequences, random_ids(5, 81)], dim=1)
    cache = store.cache_for(model, "s", ids)
    assert set(store.cost.restore_host_s) == {"dram"}
    assert 0 < store.cost.restore_host_s["dram"] <= cache.host_ms["restore"] / 1e3
    compare(model, cache, ids)


def test_a_cpu_loader_is_timed_by_its_work_not_by_what_it_waited_for():
    """The time a CPU loader reports (and the cost model learns a tier's bandwidth from) is its thread's work:
    not the wait for a turn restored ahead to start, not the wait for Python's lock while the caller runs
    Python code (generate()'s set-up), which made 2 MB from DRAM look like 0.6 s and the next turn recompute."""
    from attnstore_hf.pipeline.loader import LayerLoader

    src = torch.randn(64, 1024)
    dst = [torch.empty_like(src) for _ in range(8)]
    jobs = [lambda d=d: [d.copy_(src) for _ in range(4)] for d in dst]
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.02)  # each hand-over of the lock waits for the holder's 20 ms slice
    try:
        loader = LayerLoader(jobs, "cpu", ahead=4).start()
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # the caller runs Python code, holding the lock, then the turn starts
            pass
        time.sleep(0.2)
        loader.wait_all()
    finally:
        sys.setswitchinterval(old)
    assert all(torch.equal(d, src) for d in dst)
    wall = loader.t_end - loader.t_start
    assert wall >= 0.5  # it did wait: for the lock, and for the release of the held-back half
    assert loader.seconds() == loader.cpu_seconds and loader.seconds() < 0.1, (loader.seconds(), wall)
    cm = CostModel()
    cm.observe_loader("dram", 8 * src.nbytes, 0.0, loader)
    assert cm.bandwidth["dram"] >= 8 * src.nbytes / 0.1


def test_auto_reports_its_choice_and_learns(store_factory):
    model = tiny_model("llama")
    store = store_factory()  # restore_mode="auto"
    out, _ = saved_turn(model, store, random_ids(40, 30))
    ids = torch.cat([out.sequences, random_ids(5, 31)], dim=1)
    cache = store.cache_for(model, "s", ids)
    plan = cache.restore_plan
    assert plan["mode"] == "auto" and plan["choice"] == "load" and plan["tier"] == "dram"
    assert store.cost.s_per_token is not None  # the first turn's prefill was timed
    compare(model, cache, ids)
    assert store.stats()["restore_load"] == 1


def _cuda():
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,threaded", [("load", False), ("load", True), ("both", False), ("tail", False)])
def test_cuda_side_stream_restore_and_write_stream_save_are_exact(family, mode, threaded, store_factory):
    model = tiny_model(family).cuda()
    store = store_factory(restore_mode=mode, layerwise=True, restore_thread=threaded)
    ids = random_ids(120, 40).cuda()
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store.save("s", cache, out.sequences)
    ids2 = torch.cat([out.sequences, random_ids(9, 41).cuda()], dim=1)
    c2 = store.cache_for(model, "s", ids2)
    tail = c2.restore_plan["split"] if c2.restore_plan["choice"] == "tail" else 0
    assert c2.reused_tokens == out.sequences.shape[1] - 1 - tail
    assert (tail > 0) == (mode == "tail" and family != "gemma3")
    if mode == "load":
        assert c2._loader is not None and c2._loader.stream is not None and c2._loader.threaded == threaded
        c2_stream = c2._loader.stream
        assert ("restore_jobs" in c2.host_ms) == (not threaded)  # enqueued by cache_for itself, and timed
    rec = store.dram.peek(store._key("s"))
    assert all(lay.keys.is_pinned() for lay in rec.layers)
    if mode == "load" and family != "gemma3":  # 4 full-attention layers restored as [0] [1] [2 3]
        blocks = [lay._k.untyped_storage().data_ptr() for lay in c2.layers]
        assert blocks[2] == blocks[3] and len(set(blocks)) == 3
    ours = compare(model, c2, ids2)
    assert c2.recomputed_tokens == 0  # every layer came from the side stream, none from a recovery
    if mode == "load":  # restores share the process's restore stream (the allocator caches per stream)
        store.save("s", c2, ours.sequences)
        ids3 = torch.cat([ours.sequences, random_ids(3, 42).cuda()], dim=1)
        c3 = store.cache_for(model, "s", ids3)
        assert c3._loader is not None and c3._loader.stream is c2_stream
        compare(model, c3, ids3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_record_evicted_while_its_copy_is_in_flight(store_factory):
    """The loader keeps the pinned source alive: evicting the record right after cache_for changes nothing."""
    model = tiny_model("llama").cuda()
    store = store_factory(restore_mode="load", dram_bytes=400_000, disk_dir=None)
    ids = random_ids(300, 50).cuda()
    out, rec = saved_turn(model, store, ids)
    ids2 = torch.cat([out.sequences, random_ids(5, 51).cuda()], dim=1)
    cache = store.cache_for(model, "s", ids2)
    for k in range(4):  # push the record out of DRAM and overwrite pinned memory
        other = random_ids(300, 60 + k).cuda()
        c = store.cache_for(model, f"o{k}", other)
        store.save(f"o{k}", c, greedy(model, other, c).sequences)
    store.flush()
    assert not store.dram.contains(store._key("s"))
    compare(model, cache, ids2)


def test_disk_record_streams_layer_by_layer_and_is_promoted_when_whole(family, store_factory, monkeypatch):
    """From disk, cache_for reads only the header; each layer is read and verified by the loader's thread (in the
    background, while earlier layers compute), and the record is promoted once every layer was verified."""
    from attnstore_hf.record import LazyRecord

    model = tiny_model(family)
    store = store_factory(restore_mode="load")
    out, rec = saved_turn(model, store, random_ids(60, 70))
    store.close()
    fresh = store_factory(restore_mode="load")
    read = []
    real = LazyRecord.materialize
    monkeypatch.setattr(LazyRecord, "materialize", lambda self, i, **k: (
        read.append((i, threading.current_thread().name)), real(self, i, **k))[1])
    ids = torch.cat([out.sequences, random_ids(6, 71)], dim=1)
    cache = fresh.cache_for(model, "s", ids)
    assert cache.source == "disk" and cache.reused_tokens == rec.num_tokens
    assert not fresh.dram.contains(rec.key)  # not promoted before every layer is verified
    compare(model, cache, ids)
    assert [i for i, _ in read] == list(range(len(rec.layers)))
    assert {name for _, name in read} == {"attnstore-loader"}  # none by the thread calling cache_for/generate
    assert fresh.dram.contains(rec.key) and fresh.stats()["bytes_read_disk"] > 0
    promoted = fresh.dram.peek(rec.key)
    for a, b in zip(promoted.layers, rec.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("where", ["dram", "disk"])
@pytest.mark.parametrize("restore_in,generate_in", [("inference_mode", "inference_mode"),
                                                    ("inference_mode", "no_grad"), ("no_grad", "inference_mode")])
def test_torch_inference_mode_anywhere_restores_exactly(family, store_factory, caplog, where, restore_in,
                                                        generate_in):
    """Found by trying what users write: under ``torch.inference_mode()`` every layer-wise restore failed on the
    loader thread (inference mode is per thread, and the cache's buffers were inference tensors, which a thread
    outside it may not write) and was recomputed with a warning; ``cache_for`` under it and generate() outside it
    raised (the forward's in-place write into the cache)."""
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    model = tiny_model(family)
    store = store_factory(restore_mode="load")
    ids, stored = random_ids(50, 80), 0
    for turn in range(3):
        if where == "disk" and turn:  # a new store: the record streams from disk through the loader thread
            store.close()
            store = store_factory(restore_mode="load")
        with caplog.at_level(logging.WARNING):
            with ctx[restore_in]():
                cache = store.cache_for(model, "s", ids)
            with ctx[generate_in]():
                ours = greedy(model, ids, cache)
        assert cache.reused_tokens == stored and cache.recomputed_tokens == 0
        assert cache.source == (None if turn == 0 else where)
        ref = greedy(model, ids)
        assert torch.equal(ours.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= TOL
        with ctx[restore_in]():
            store.save("s", cache, ours.sequences).result()
        stored = ours.sequences.shape[1] - 1
        ids = torch.cat([ours.sequences, random_ids(5, 81 + turn)], dim=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("threaded", [False, True])
def test_inference_mode_branches_and_going_back_on_every_loader_path(device, family, threaded, store_factory):
    """The ninth session's fixes on the restore paths of each device (CUDA: the side stream issued by cache_for,
    or by the loader thread): a restore made under ``torch.inference_mode()`` and run outside it, a
    ``copy.deepcopy`` taken mid-restore, and a turn going back over the last exchange (``sliding_extra_tokens``)
    are restored, never recomputed, and exact."""
    model = tiny_model(family).to(device)
    store = store_factory(restore_mode="load", restore_thread=threaded, sliding_extra_tokens=16)
    ids = random_ids(60, 90).to(device)
    with torch.inference_mode():
        cache = store.cache_for(model, "s", ids)
        out = greedy(model, ids, cache)
        store.save("s", cache, out.sequences)
    ids2 = torch.cat([out.sequences, random_ids(6, 91).to(device)], dim=1)
    with torch.inference_mode():
        c2 = store.cache_for(model, "s", ids2)
    branch = copy.deepcopy(c2)
    ours = compare(model, c2, ids2)  # generate() outside inference mode
    assert c2.reused_tokens == out.sequences.shape[1] - 1 and c2.recomputed_tokens == 0
    assert torch.equal(compare(model, branch, ids2).sequences, ours.sequences)
    store.save("s", c2, ours.sequences).result()
    back = torch.cat([out.sequences, random_ids(3, 93).to(device)], dim=1)  # turn 2's message taken back
    c3 = store.cache_for(model, "s", back)
    assert c3.reused_tokens == out.sequences.shape[1] and c3.recomputed_tokens == 0
    compare(model, c3, back)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_disk_record_streams_through_the_loader_thread(family, store_factory):
    """From disk on CUDA: the loader thread reads each layer into page-locked memory and enqueues its copy and
    rotation on the side stream; exact, and the promoted record is page-locked."""
    model = tiny_model(family).cuda()
    store = store_factory(restore_mode="load")
    out, rec = saved_turn(model, store, random_ids(90, 80).cuda())
    store.close()
    fresh = store_factory(restore_mode="load")
    ids = torch.cat([out.sequences, random_ids(7, 81).cuda()], dim=1)
    cache = fresh.cache_for(model, "s", ids)
    assert cache.source == "disk" and cache._loader.threaded and cache._loader.stream is not None
    compare(model, cache, ids)
    assert all(lay.keys.is_pinned() for lay in fresh.dram.peek(rec.key).layers)


def test_exiting_while_restores_run_in_the_background_does_not_abort(tmp_path):
    """A script that ends while loader threads still restore layers exits cleanly (a thread left inside a torch
    operation at interpreter exit aborts the process: "terminate called without an active exception")."""
    import subprocess
    import sys

    script = tmp_path / "quit_early.py"
    script.write_text(
        "import torch, transformers as tf\n"
        "from attnstore_hf import AttentionStore, StoreConfig\n"
        "cfg = tf.LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=32, num_attention_heads=32,\n"
        "                     num_key_value_heads=8, vocab_size=1000, max_position_embeddings=4096)\n"
        "torch.manual_seed(0)\n"
        "model = tf.LlamaForCausalLM(cfg).eval()\n"
        "ids = torch.randint(8, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))\n"
        "store = AttentionStore(StoreConfig(disk_dir=None, restore_mode='load'))\n"
        "with torch.no_grad():\n"
        "    c = store.cache_for(model, 's', ids)\n"
        "    model(ids, past_key_values=c, use_cache=True)\n"
        "store.save('s', c, ids).result()\n"
        "turn = torch.cat([ids, ids[:, :4]], 1)\n"
        "caches = [store.cache_for(model, 's', turn) for _ in range(20)]  # restores still running at exit\n"
        "print('done')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("done") and "terminate called" not in proc.stderr


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_threads_serving_sessions_on_one_model_and_store_stay_exact(family, store_factory):
    """A server's thread pool: four threads, each a session of four turns, one model and one store (small DRAM:
    records go to disk and back), forwards running at the same time; every turn equals a recompute."""
    model = tiny_model(family)
    store = store_factory(restore_mode="load", dram_bytes=200_000)
    errors: list = []

    def serve(k):
        try:
            ids = random_ids(15 + k, 300 + k)
            for t in range(4):
                cache = store.cache_for(model, f"s{k}", ids)
                ours = compare(model, cache, ids)
                store.save(f"s{k}", cache, ours.sequences)
                ids = torch.cat([ours.sequences, random_ids(3, 2000 + 10 * k + t)], dim=1)
        except BaseException as exc:  # reported below with the thread it failed in
            errors.append((k, exc))

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.stats()["hits"] == 12  # every turn after the first of each session restored its history


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recovery_and_serving_loop_take_ids_given_on_the_host(store_factory, monkeypatch):
    """cache_for accepts ids on the host (a list, a tokenizer's output); a layer failing mid-forward was recomputed
    from cache.input_ids as given, so on CUDA the recovery itself failed (device mismatch) instead of recomputing;
    the serving loop's teacher-forced forward fed host ids to a CUDA model."""
    from attnstore_hf.serving import ServingLoop

    model = tiny_model("llama").cuda()
    store = store_factory(restore_mode="load", layerwise=True)
    out, rec = saved_turn(model, store, random_ids(50, 6).cuda())
    ids = torch.cat([out.sequences.cpu(), random_ids(8, 7)], dim=1)
    real_rotate = cache_mod.apply_rope_into
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated read error")
        return real_rotate(*a, **k)

    monkeypatch.setattr(cache_mod, "apply_rope_into", flaky)
    cache = store.cache_for(model, "s", ids[0].tolist())
    assert cache.input_ids.device.type == "cpu"
    compare(model, cache, ids.cuda())
    assert cache.recomputed_tokens == rec.num_tokens
    monkeypatch.setattr(cache_mod, "apply_rope_into", real_rotate)
    loop = ServingLoop(model, "attnstore_scheduler_staged", store_factory(disk_dir=None))
    first = loop.run_turn("a", 0, random_ids(20, 1)[0].tolist(), random_ids(6, 2)[0].tolist(),
                          stage_next=("a", random_ids(4, 3)[0].tolist()))
    second = loop.run_turn("a", 1, random_ids(4, 3)[0].tolist(), [])
    assert second.reused > 0 and first.first_token == int(greedy(model, random_ids(20, 1).cuda()).sequences[0, -1])


def test_a_cache_never_run_lets_go_of_its_record_file_at_once(store_factory, tmp_path):
    """A restore nobody runs (a request cancelled before generate()) kept its disk record's file open until a
    garbage-collection pass (a reference cycle: the record and its reader; the cache and its layers' waiters):
    on a busy server, replaced record files piled up as open handles. Dropping the cache now closes it at once."""
    import gc

    def open_records():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(tmp_path / "kv")) and ".safetensors" in target:
                out.append(target)
        return out

    model = tiny_model("qwen3")
    first = store_factory()
    out, _ = saved_turn(model, first, random_ids(30, 1))
    first.close()
    store = store_factory(restore_mode="load", layerwise=True)  # the record is on disk only
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    gc.disable()
    try:
        cache = store.cache_for(model, "s", ids)
        assert cache.source == "disk" and open_records()
        thread = cache._loader._thread
        if thread is not None:  # (its loader thread done: only references keep the file open now)
            thread.join(30)
        del cache
        assert open_records() == []
    finally:
        gc.enable()
    compare(model, store.cache_for(model, "s", ids), ids)


def test_a_failed_load_during_both_is_a_recompute(store_factory, monkeypatch, caplog):
    """`both` loads the later tokens while the first are recomputed; a failure of that load (out of memory while
    decoding, say) left cache_for as an exception instead of the documented recompute with a warning."""
    model = tiny_model("llama")
    store = store_factory(restore_mode="both", disk_dir=None)
    out, rec = saved_turn(model, store, random_ids(60, 6))
    ids = torch.cat([out.sequences, random_ids(8, 7)], dim=1)

    def failing(*a, **k):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(cache_mod, "apply_rope", failing)
    with caplog.at_level(logging.WARNING):
        cache = store.cache_for(model, "s", ids)
    assert cache.restore_plan["choice"] == "both" and cache.reused_tokens == 0
    assert "loading the stored KV failed" in caplog.text
    compare(model, cache, ids)
