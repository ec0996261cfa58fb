"""Restored caches give what a recompute gives, across families, tiers, stores and processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import compare, greedy, logit_diff, random_ids, saved_turn, tiny_model

TOL = 1e-4


def run_conversation(model, store, session="s", turns=3, first=40, user=17, new=5, seed=0):
    """Play a conversation; at each turn compare the restored run against a full recompute."""
    ids = random_ids(first, seed)
    reports = []
    for turn in range(turns):
        cache = store.cache_for(model, session, ids)
        out = greedy(model, ids, cache, new)
        ref = greedy(model, ids, None, new)
        reports.append({
            "turn": turn,
            "prompt": ids.shape[1],
            "reused": cache.reused_tokens,
            "same_tokens": torch.equal(out.sequences, ref.sequences),
            "logit_diff": logit_diff(out, ref),
        })
        store.save(session, cache, out.sequences)
        ids = torch.cat([out.sequences, random_ids(user, seed + 100 + turn)], dim=1)
    return reports, ids


def check(reports):
    for r in reports:
        assert r["same_tokens"], r
        assert r["logit_diff"] <= TOL, r
    assert reports[0]["reused"] == 0
    for prev, r in zip(reports, reports[1:]):
        # everything but the new user message and the last generated token (which has no KV yet) is restored
        assert r["reused"] == r["prompt"] - 17 - 1, (prev, r)


def test_three_turns_match_recompute(family, store_factory):
    model = tiny_model(family)
    store = store_factory()
    reports, _ = run_conversation(model, store)
    check(reports)
    assert store.stats()["hits_dram"] == 2


def test_new_store_same_disk_dir_resumes(family, store_factory, tmp_path):
    model = tiny_model(family)
    store = store_factory()
    reports, ids = run_conversation(model, store, turns=2)
    store.close()
    again = store_factory()  # same disk_dir, empty DRAM: served from disk
    cache = again.cache_for(model, "s", ids)
    out, ref = greedy(model, ids, cache), greedy(model, ids)
    assert cache.source == "disk"
    assert cache.reused_tokens == ids.shape[1] - 17 - 1
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_diff(out, ref) <= TOL
    assert again.stats()["hits_disk"] == 1


SUBPROCESS = textwrap.dedent("""
    import json, sys, torch, warnings
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from attnstore_hf import AttentionStore, StoreConfig
    model_dir, disk_dir, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([ids])
    with AttentionStore(StoreConfig(disk_dir=disk_dir)) as store:
        cache = store.cache_for(model, "s", ids)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        print(json.dumps({"reused": cache.reused_tokens, "source": cache.source,
                          "sequences": out.sequences[0].tolist(), "logits": [step[0].tolist() for step in out.logits]}))
""")


def test_new_process_resumes(family, store_factory, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "model")
    store = store_factory()
    _, ids = run_conversation(model, store, turns=2)
    store.close()
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path / "model"), str(tmp_path / "kv"),
                           json.dumps(ids[0].tolist())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = greedy(model, ids)
    assert got["source"] == "disk"
    assert got["reused"] == ids.shape[1] - 17 - 1
    assert got["sequences"] == ref.sequences[0].tolist()
    assert (torch.tensor(got["logits"]) - torch.cat(ref.logits)).abs().max().item() <= TOL  # every step


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3"])
def test_changed_history_token_restores_only_prefix(fam, store_factory):
    model = tiny_model(fam)
    store = store_factory()
    _, ids = run_conversation(model, store, turns=2)
    edited = ids.clone()
    pos = 20
    edited[0, pos] = FIRST = (int(edited[0, pos]) + 1 - 8) % (160 - 8) + 8
    assert FIRST != ids[0, pos]
    cache = store.cache_for(model, "s", edited)
    out, ref = greedy(model, edited, cache), greedy(model, edited)
    if fam == "gemma3":
        # the sliding layers (window 8) no longer hold the window that a 20-token prefix needs: full recompute
        assert cache.reused_tokens == 0
    else:
        assert cache.reused_tokens == pos
    assert torch.equal(out.sequences, ref.sequences)
    assert logit_diff(out, ref) <= TOL


def test_other_session_and_namespace_never_reuse(store_factory, tmp_path):
    model = tiny_model("llama")
    store = store_factory()
    _, ids = run_conversation(model, store, turns=2)
    assert store.cache_for(model, "someone-else", ids).reused_tokens == 0
    store.close()
    other = store_factory(namespace="tenant-b")
    assert other.cache_for(model, "s", ids).reused_tokens == 0
    same = store_factory()
    assert same.cache_for(model, "s", ids).reused_tokens > 0


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast", "autocast+bf16 codec"])
def test_restored_record_is_bit_identical_to_kept_dynamic_cache(fam, dtype, store_factory):
    """transformers' own recipe (keep the DynamicCache in memory) vs a record restored from disk. ``autocast``: a
    float32 model under ``torch.autocast("cpu", torch.bfloat16)`` throughout, whose K/V come in bfloat16 (values,
    pre-RoPE keys) and float32 (rotated keys): every save failed ("layer 0 does not match the record's codec and
    dtype"), so nothing was ever restored. Its records are float32 (the model's); the ``bf16`` codec halves them and
    is still exact there (its K/V are bfloat16 values)."""
    import contextlib

    from transformers import DynamicCache

    autocast = isinstance(dtype, str)
    model = tiny_model(fam, dtype=torch.float32 if autocast else dtype)
    codec = "bf16" if dtype == "autocast+bf16 codec" else "none"
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        _kept_vs_restored(model, lambda: store_factory(codec=codec), DynamicCache)


@pytest.mark.parametrize("model_dtype,autocast_dtype", [(torch.bfloat16, torch.float16),
                                                        (torch.float16, torch.bfloat16)])
def test_autocast_to_the_other_16_bit_type_is_not_stored(model_dtype, autocast_dtype, store_factory, caplog):
    """A bfloat16 model under float16 autocast (or the reverse) computes K/V its own dtype cannot hold, or rotates
    keys in another dtype than a restore would: a restored turn differed from a kept DynamicCache (3e-4, 2e-3;
    found by a review). Such a turn is not stored, with a warning; the next one recomputes, and nothing breaks."""
    import logging

    model = tiny_model("llama", dtype=model_dtype)
    store = store_factory()
    ids = random_ids(40, 3)
    with torch.autocast("cpu", dtype=autocast_dtype), caplog.at_level(logging.WARNING):
        cache = store.cache_for(model, "s", ids)
        out = greedy(model, ids, cache)
        assert store.save("s", cache, out.sequences).result() is None
        assert "autocast to another 16-bit type" in caplog.text
        ids2 = torch.cat([out.sequences, random_ids(5, 4)], dim=1)
        assert store.cache_for(model, "s", ids2).reused_tokens == 0
    assert store.stats()["saves_skipped"] == 1


def _kept_vs_restored(model, store_factory, DynamicCache):
    store = store_factory()
    ids = random_ids(40, 3)
    kept = DynamicCache(config=model.config)
    first = greedy(model, ids, kept)
    cache = store.cache_for(model, "s", ids)
    first_ours = greedy(model, ids, cache)
    assert torch.equal(first.sequences, first_ours.sequences)
    store.save("s", cache, first_ours.sequences)
    store.close()
    ids2 = torch.cat([first.sequences, random_ids(11, 4)], dim=1)
    cont = greedy(model, ids2, kept, new=4)
    restored = store_factory().cache_for(model, "s", ids2)
    assert restored.source == "disk" and restored.reused_tokens == first.sequences.shape[1] - 1
    cont_ours = greedy(model, ids2, restored, new=4)
    for a, b in zip(cont.logits, cont_ours.logits):
        assert torch.equal(a, b), (a - b).abs().max()
    assert torch.equal(cont.sequences, cont_ours.sequences)


def test_bf16_restored_close_to_recompute(store_factory):
    """Against a one-shot recompute only a tolerance holds in bf16 (prefill and decode round differently)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    store = store_factory()
    ids = random_ids(40, 5)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store.save("s", cache, out.sequences)
    ids2 = torch.cat([out.sequences, random_ids(9, 6)], dim=1)
    restored = store.cache_for(model, "s", ids2)
    a = greedy(model, ids2, restored).logits[0].float()
    b = greedy(model, ids2).logits[0].float()
    assert (a - b).abs().max().item() < 0.1


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    # dynamic NTK rescales past max_position_embeddings (1024 here), which these histories stay under; crossing
    # length-dependent frequencies: test_rope_whose_frequencies_depend_on_the_length_is_exact
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_scaling_types(rope, store_factory):
    model = tiny_model("llama", rope_parameters=ROPES[rope])
    assert model.model.rotary_emb.rope_type == rope  # the override reached the model's RoPE module
    store = store_factory()
    reports, _ = run_conversation(model, store)
    check(reports)


def test_mistral_sliding_window(store_factory):
    model = tiny_model("mistral", sliding_window=8)
    store = store_factory()
    reports, _ = run_conversation(model, store)
    check(reports)
    assert "sliding" in store.cache_for(model, "x", random_ids(5, 1)).layer_kinds


def test_captured_keys_rotate_to_exactly_the_models_keys(family):
    """Hook capture is bit-exact: pre-RoPE keys re-rotated here equal the keys transformers caches itself."""
    from transformers import DynamicCache

    from attnstore_hf import AttentionStoreCache
    from attnstore_hf.rope import apply_rope

    model = tiny_model(family)
    ids = random_ids(30, 11)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ref, use_cache=True)
        ours = AttentionStoreCache(model)
        model(ids, past_key_values=ours, use_cache=True)
    adapter = ours._patch.adapter
    for i, ((raw, values, start), ref_layer) in enumerate(zip(ours.raw_layers(), ref.layers)):
        n = raw.shape[-2]
        positions = torch.arange(start, start + n).unsqueeze(0)
        cos, sin = adapter.rope_tables(model, i, positions, raw.dtype, raw.device)
        assert torch.equal(apply_rope(raw, cos, sin), ref_layer.keys[:, :, -n:]), f"layer {i}"
        assert torch.equal(values, ref_layer.values[:, :, -n:])
        if ours.layer_kinds[i] == "sliding":  # the window, not the history
            assert n == ref_layer.sliding_window - 1 < ids.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotation_into_a_strided_buffer_is_bit_identical(dtype):
    """The restore rotates keys straight into the cache's buffer (a strided view): same bits as apply_rope."""
    from attnstore_hf.rope import apply_rope, apply_rope_into

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 4, 37, 16, generator=g).to(dtype)
    cos, sin = torch.randn(1, 37, 16, generator=g).to(dtype), torch.randn(1, 37, 16, generator=g).to(dtype)
    buf = torch.zeros(1, 4, 64, 16, dtype=dtype)
    out = apply_rope_into(buf[:, :, :37], keys, cos, sin)
    assert not out.is_contiguous() and out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:, :, :37], apply_rope(keys, cos, sin))
    assert torch.count_nonzero(buf[:, :, 37:]) == 0


@pytest.mark.parametrize("family,overrides", [("gemma3", {}), ("llama", {}), ("llama", {"rope_parameters": {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}})])
def test_rope_tables_kept_across_turns_equal_fresh_ones(family, overrides):
    """The RoPE tables a restore uses are kept and grown across turns (static rope types): every prefix equals the
    table the model computes for exactly that many positions, and replaced frequencies are noticed."""
    from attnstore_hf import AttentionStoreCache

    model = tiny_model(family, **overrides)
    patch = AttentionStoreCache(model)._patch
    adapter = patch.adapter
    for span in (40, 300, 700, 90):
        for i in range(patch.num_layers):
            cos, sin = patch.rope_tables(model, i, span, torch.float32, torch.device("cpu"))
            fcos, fsin = adapter.rope_tables(model, i, torch.arange(span).unsqueeze(0), torch.float32, "cpu")
            assert cos.shape[1] >= span
            assert torch.equal(cos[:, :span], fcos) and torch.equal(sin[:, :span], fsin), (span, i)
    kept = len(patch._rope)
    assert kept == len(set(patch.layer_types)) and kept >= 1
    again = patch.rope_tables(model, 0, 500, torch.float32, torch.device("cpu"))
    assert again[0] is patch.rope_tables(model, 0, 20, torch.float32, torch.device("cpu"))[0]  # no recompute
    rotary = adapter.decoder(model).rotary_emb
    name = next(n for n, _ in rotary.named_buffers() if n.endswith("inv_freq") and "original" not in n)
    setattr(rotary, name, getattr(rotary, name) * 0.5)  # someone replaces the frequencies: tables follow
    cos, _ = patch.rope_tables(model, 0, 50, torch.float32, torch.device("cpu"))
    fcos, _ = adapter.rope_tables(model, 0, torch.arange(50).unsqueeze(0), torch.float32, "cpu")
    assert torch.equal(cos[:, :50], fcos)


def test_dynamic_rope_tables_are_not_kept():
    """A rope type whose frequencies depend on the length ("dynamic") gets a fresh table of exactly the span."""
    from attnstore_hf import AttentionStoreCache

    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    patch = AttentionStoreCache(model)._patch
    cos, _ = patch.rope_tables(model, 0, 33, torch.float32, torch.device("cpu"))
    assert cos.shape[1] == 33 and not patch._rope


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 8, "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]}


def test_rope_whose_frequencies_depend_on_the_length_is_exact(store_factory):
    """longrope switches factors past original_max_position_embeddings (dynamic NTK rescales past
    max_position_embeddings): K/V computed with one set are not what a forward with the other computes, beyond the
    first layer. A record was reused across the switch (2.9e-4 off), and `both` recomputed the first tokens in a
    forward of their own, short enough for the other factors (1.4e-3 off). Records now note the frequencies they
    were computed with (meta rope_regime) and are reused only under the same; `both` is not used."""
    model = tiny_model("llama", rope_parameters=LONGROPE)
    store = store_factory(restore_mode="both")
    out, rec = saved_turn(model, store, random_ids(40, 1))
    assert rec.meta["rope_regime"] == "longrope:short"
    ids = torch.cat([out.sequences, random_ids(40, 2)], dim=1)  # 85 tokens: past the switch
    cache = store.cache_for(model, "s", ids)
    assert cache.reused_tokens == 0  # computed with the short factors: recomputed
    out = compare(model, cache, ids)
    rec = store.save("s", cache, out.sequences).result()
    assert rec.meta["rope_regime"] == "longrope:long"
    ids = torch.cat([out.sequences, random_ids(20, 3)], dim=1)
    cache = store.cache_for(model, "s", ids)  # long and long: reused, loaded (not both)
    assert cache.reused_tokens == rec.num_tokens and cache.restore_plan["choice"] == "load"
    compare(model, cache, ids)
    # a turn that crosses the switch while generating holds K/V of both: never reused
    mixed = store_factory(disk_dir=None)
    cache = mixed.cache_for(model, "m", random_ids(62, 4))
    out = compare(model, cache, cache.input_ids)
    assert mixed.save("m", cache, out.sequences).result().meta["rope_regime"] == "mixed"
    assert mixed.cache_for(model, "m", torch.cat([out.sequences, random_ids(3, 5)], dim=1)).reused_tokens == 0


def test_rope_regime_is_that_of_the_kept_tokens_after_a_truncation(store_factory):
    """A truncated turn's forward runs over the kept ids: its rotary frequencies are those of their length, as
    save() notes them. The lookup checked the record against the length *before* truncation, so a record computed
    with longrope's long factors was loaded into a forward that runs with the short ones (kept 45 of 91 tokens,
    under the switch at 64): mixed frequencies, not what any forward computes. Now it is recomputed from the kept
    ids, exactly a fresh forward over them."""
    model = tiny_model("llama", rope_parameters=LONGROPE)
    store = store_factory(max_context=80, reserve_tokens=0, truncation_ratio=0.5)
    out, rec = saved_turn(model, store, random_ids(70, 1))
    assert rec.meta["rope_regime"] == "longrope:long"
    ids = torch.cat([out.sequences, random_ids(20, 2)], dim=1)  # 91 tokens > 80: half of them dropped
    cache = store.cache_for(model, "s", ids)
    assert cache.truncated > 0 and cache.input_ids.shape[1] <= 64  # the forward: short factors
    assert cache.reused_tokens == 0
    out = compare(model, cache, cache.input_ids)
    rec = store.save("s", cache, out.sequences).result()
    assert rec.meta["rope_regime"] == "longrope:short"
    # the next turn (kept coordinates, short factors again) reuses it
    ids = torch.cat([torch.tensor([rec.meta["origin_ids"]]), torch.tensor([rec.meta["tail_ids"]]),
                     random_ids(5, 3)], dim=1)
    cache = store.cache_for(model, "s", ids)
    assert cache.reused_tokens == rec.num_tokens
    compare(model, cache, cache.input_ids)  # no truncation in this turn: exactly a fresh forward over its ids


def test_dynamic_ntk_past_its_threshold_is_exact(store_factory):
    """Dynamic NTK rescales its frequencies past max_position_embeddings (the other dynamic test stays under it,
    where it is the default rope): a turn there is recomputed, a turn under it is reused, each exactly. The
    rotary module is stateful — its frequencies only grow, from the longest forward it has seen, until a short
    forward resets them — so two identical generate() calls in a row already differ (1.6e-4 here): each run,
    ours and the reference, starts from the module's initial state. (max_context keeps truncation away.)"""
    model = tiny_model("llama", max_position_embeddings=64,
                       rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    rotary = model.model.rotary_emb

    def run(ids, cache=None):
        rotary.register_buffer("inv_freq", rotary.original_inv_freq.clone(), persistent=False)
        rotary.max_seq_len_cached = rotary.original_max_seq_len
        return greedy(model, ids, cache)

    store = store_factory(max_context=4096, reserve_tokens=0)
    ids = random_ids(30, 1)
    reused = []
    for extra in (10, 30, 3):  # 45 tokens (under the threshold), 80 (past it), 88 (after a turn that crossed it)
        cache = store.cache_for(model, "s", ids)
        ours, ref = run(ids, cache), run(ids)
        assert torch.equal(ours.sequences, ref.sequences) and logit_diff(ours, ref) <= TOL
        reused.append(cache.reused_tokens)
        rec = store.save("s", cache, ours.sequences).result()
        ids = torch.cat([ours.sequences, random_ids(extra, extra)], dim=1)
    cache = store.cache_for(model, "s", ids)
    ours, ref = run(ids, cache), run(ids)
    assert torch.equal(ours.sequences, ref.sequences) and logit_diff(ours, ref) <= TOL
    reused.append(cache.reused_tokens)
    assert rec.meta["rope_regime"] == "mixed"
    assert reused[0] == 0 and reused[1] == 34 and reused[2] == 0 and reused[3] == 0, reused
