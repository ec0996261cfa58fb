"""Public API behaviour: patching, errors, sizes, the working cache's growth and Cache-API citizenship."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import attnstore_hf
from attnstore_hf import (AttentionStore, AttentionStoreCache, ConfigError, StoreConfig, UnsupportedModelError,
                          parse_size, patch_model, unpatch_model)
from attnstore_hf.cache import GROWTH_FACTOR, MIN_GROWTH, ChunkedLayer
from conftest import VOCAB, compare, greedy, logit_diff, random_ids, saved_turn, tiny_model


def test_public_names():
    for name in ("AttentionStore", "StoreConfig", "AttentionStoreCache", "patch_model", "unpatch_model",
                 "UnsupportedModelError"):
        assert hasattr(attnstore_hf, name)
    import attnstore_hf.patches as patches

    assert patches.__name__ == "attnstore_hf.patches"


def test_patch_is_idempotent_and_reversible():
    model = tiny_model("qwen3")
    k_norm = model.model.layers[0].self_attn.k_norm
    before = len(k_norm._forward_hooks)
    p1 = patch_model(model)
    p2 = patch_model(model)
    assert p1 is p2
    assert len(k_norm._forward_hooks) == before + 1
    assert attnstore_hf.is_patched(model)
    assert unpatch_model(model) is True
    assert len(k_norm._forward_hooks) == before
    assert not attnstore_hf.is_patched(model)
    assert unpatch_model(model) is False
    # still a plain transformers model afterwards, and the state dict has no extra entries
    assert set(model.state_dict()) == set(tiny_model("qwen3").state_dict())


def test_gpt2_is_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as exc:
        patch_model(model)
    msg = str(exc.value)
    for fam in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma 3"):
        assert fam in msg
    assert "gpt2" in msg


def test_sizes():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    assert parse_size(None) is None
    for bad in ("lots", "-1GB", True, -5):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert StoreConfig(dram_bytes="512MB").dram_bytes == 512 * 10**6
    with pytest.raises(ConfigError):
        StoreConfig(write_policy="sometimes")
    with pytest.raises(ConfigError):
        StoreConfig(namespace="")
    with pytest.raises(ConfigError, match="NUL"):  # NUL separates namespace and session id in a record's key:
        StoreConfig(namespace="a\x00b")  # ("a", "b\x00c") and ("a\x00b", "c") would share one
    assert parse_size("2G") == parse_size("2GB") and parse_size("512k") == 512_000
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite"):
            parse_size(bad)


@pytest.mark.parametrize("field,value", [
    ("layerwise", "no"), ("pin_memory", "false"), ("fsync", 0), ("save_workers", "2"), ("save_queue", 1.5),
    ("stage_layers", 2.5), ("max_context", 100.5), ("keep_prefix", None), ("truncation_ratio", "0.5"),
    ("ttl_seconds", "-1"), ("redis_timeout_s", -1), ("redis_timeout_s", float("nan")), ("redis_chunk_bytes", 0),
    ("disk_dir", ""), ("disk_dir", 3)])
def test_config_rejects_values_of_the_wrong_kind(field, value):
    """A flag given as "no" would be true and 2.5 layers meaningless: each is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=field):
        StoreConfig(**{field: value})


def test_config_rejects_unusable_directories_and_windows(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        StoreConfig(disk_dir=a_file)
    with pytest.raises(ConfigError, match="cannot be created"):
        AttentionStore(StoreConfig(disk_dir=a_file / "sub"))
    with pytest.raises(ConfigError, match="reserve_tokens"):  # every turn would overflow
        StoreConfig(max_context=100)
    with pytest.raises(ConfigError, match="keep_prefix"):  # truncation could drop nothing
        StoreConfig(max_context=100, reserve_tokens=20, keep_prefix=80)
    assert StoreConfig(max_context=100, reserve_tokens=20, save_workers=np.int64(2)).save_workers == 2


def test_chunked_layer_grows_in_chunks_not_per_step():
    layer = ChunkedLayer()
    k = torch.randn(1, 2, 1, 8)
    ptrs = set()
    for step in range(1, 5001):
        layer.update(k, k, raw_keys=k)
        ptrs.add(layer._k.data_ptr())
        cap = layer._k.shape[-2]
        # never more than GROWTH_FACTOR x what is used (or MIN_GROWTH more), never less than it
        assert step <= cap <= max(step * GROWTH_FACTOR, step + MIN_GROWTH) + 1
    # 5000 steps, growing by 1.5x from MIN_GROWTH: a handful of allocations, not 5000
    assert len(ptrs) <= 2 + math.ceil(math.log(5000 / MIN_GROWTH, GROWTH_FACTOR))
    assert layer.get_seq_length() == 5000 and layer.keys.shape[-2] == 5000


def test_a_prefill_leaves_room_for_the_reply():
    """The first MIN_GROWTH decode steps after a prompt's prefill copy nothing (no regrowth of the history)."""
    layer = ChunkedLayer()
    prompt = torch.randn(1, 2, 300, 8)
    layer.update(prompt, prompt, raw_keys=prompt)
    ptr = layer._k.data_ptr()
    k = torch.randn(1, 2, 1, 8)
    for _ in range(MIN_GROWTH):
        layer.update(k, k, raw_keys=k)
    assert layer._k.data_ptr() == ptr and layer.get_seq_length() == 300 + MIN_GROWTH
    layer.update(k, k, raw_keys=k)
    assert layer._k.data_ptr() != ptr  # then it grows
    assert torch.equal(layer.keys[:, :, :300], prompt)


def test_chunked_layer_matches_dynamic_layer_semantics():
    from transformers.cache_utils import DynamicLayer

    ours, ref = ChunkedLayer(), DynamicLayer()
    for n in (5, 1, 1, 300, 1):
        k, v = torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4)
        a, b = ours.update(k, v, raw_keys=k), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ours.crop(-7), ref.crop(-7)
    assert torch.equal(ours.keys, ref.keys) and ours.get_seq_length() == ref.get_seq_length()
    idx = torch.tensor([1, 0])
    ours.reorder_cache(idx), ref.reorder_cache(idx)
    assert torch.equal(ours.values, ref.values)
    ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    assert torch.equal(ours.keys, ref.keys)
    ours.batch_select_indices(torch.tensor([0, 3])), ref.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(ours.keys, ref.keys)


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
def test_plain_cache_in_generate_equals_dynamic_cache(fam):
    """Without any store, AttentionStoreCache behaves like transformers' DynamicCache (batch 2, sampling off)."""
    model = tiny_model(fam)
    ids = torch.cat([random_ids(30, 1), random_ids(30, 2)])
    ours = model.generate(ids, past_key_values=AttentionStoreCache(model), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= 1e-4


def test_beam_search_with_cache():
    model = tiny_model("llama")
    ids = random_ids(20, 9)
    ours = model.generate(ids, past_key_values=AttentionStoreCache(model), num_beams=3, max_new_tokens=5,
                          do_sample=False)
    ref = model.generate(ids, num_beams=3, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_beam_search_turn_saves_the_prompt_its_beams_share(family, store_factory):
    """After beam search the cache holds one row per beam, the same up to where generation began: save() keeps
    that prompt (the reply is prefilled next turn), exact against a recompute. A sliding-window layer no longer
    holds the window before the prompt's end: a clear ValueError, nothing stored."""
    model = tiny_model(family)
    store = store_factory()
    ids = random_ids(20, 11)
    cache = store.cache_for(model, "s", ids)
    out = model.generate(ids, past_key_values=cache, num_beams=3, max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, attention_mask=torch.ones_like(ids))
    if family == "gemma3":
        with pytest.raises(ValueError, match="sliding-window"):
            store.save("s", cache, out)
        assert store.sessions() == []
        return
    rec = store.save("s", cache, out).result()
    assert rec.token_ids == ids[0].tolist() and rec.meta["tail_ids"] == out[0, 20:].tolist()
    assert store.history("s") == out[0].tolist()
    ids2 = torch.cat([out, random_ids(3, 12)], 1)
    cache2 = store.cache_for(model, "s", ids2)
    assert cache2.reused_tokens == 20
    compare(model, cache2, ids2)


def test_generate_given_only_the_new_message_says_what_to_pass(store_factory):
    model = tiny_model("llama")
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 13))
    new = random_ids(5, 14)
    cache2 = store.cache_for(model, "s", torch.cat([out.sequences, new], 1))
    with pytest.raises(ValueError, match="cache.input_ids"):  # transformers alone: "cannot reshape tensor of 0"
        model.generate(new, past_key_values=cache2, max_new_tokens=2, attention_mask=torch.ones_like(new))
    compare(model, store.cache_for(model, "s", cache2.input_ids), cache2.input_ids)  # then as it should be


def test_save_rejects_wrong_sequences(store_factory):
    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(20, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    with pytest.raises(ValueError, match="cache holds"):
        store.save("s", cache, out.sequences[:, :5])
    # a first turn (nothing restored): ids of the right length that are not this conversation's are refused too
    # (the record would hand the next turn K/V of other tokens: a wrong answer)
    for other in (random_ids(out.sequences.shape[1], 9), torch.cat([ids[:, :-1], out.sequences[:, -5:]], 1)):
        with pytest.raises(ValueError, match="does not start with"):
            store.save("s", cache, other)
    assert store.sessions() == []
    rec = store.save("s", cache, out.sequences).result()
    assert rec.num_tokens == out.sequences.shape[1] - 1
    ids2 = torch.cat([out.sequences, random_ids(5, 2)], 1)
    cache2 = store.cache_for(model, "s", ids2)
    out2 = greedy(model, ids2, cache2)
    wrong = out2.sequences.clone()
    wrong[0, 3] = (wrong[0, 3] + 1) % 150 + 8
    with pytest.raises(ValueError, match="does not start with"):
        store.save("s", cache2, wrong)


def test_ids_may_come_as_tokenizer_and_generate_outputs(store_factory):
    """input_ids as a tokenizer returns them (a BatchEncoding) and sequences as generate() returns them with
    return_dict_in_generate=True are taken as they are; anything else is a clear TypeError."""
    from transformers import BatchEncoding

    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(20, 15)
    cache = store.cache_for(model, "s", BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    out = greedy(model, ids, cache)  # a GenerateDecoderOnlyOutput
    rec = store.save("s", cache, out).result()
    assert rec.token_ids == out.sequences[0, :-1].tolist()
    with pytest.raises(TypeError, match="token ids"):
        store.cache_for(model, "s", object())


def test_input_validation(store_factory):
    model = tiny_model("llama")
    store = store_factory()
    with pytest.raises(ValueError, match="one sequence"):
        store.cache_for(model, "s", torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="session_id"):
        store.cache_for(model, "", random_ids(5, 0))
    with pytest.raises(ValueError, match="empty"):
        store.cache_for(model, "s", torch.ones(1, 0, dtype=torch.long))


def test_closed_store_says_so(store_factory):
    store = store_factory()
    store.close()
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed"):
        store.cache_for(tiny_model("llama"), "s", random_ids(5, 0))
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed"):
        store.drop("s")  # it would delete files a new store on the directory serves
    assert store.stats()["lookups"] == 0  # reading what it counted still works


def test_stats_keys_do_not_depend_on_the_tiers(store_factory):
    """stats() of a DRAM-only store had no disk_records / disk_bytes (KeyError for code written against a store
    with a disk); every store now reports the same keys, 0 for a tier it does not have."""
    with_disk, dram_only = store_factory().stats(), store_factory(disk_dir=None).stats()
    assert set(with_disk) == set(dram_only)
    assert dram_only["disk_records"] == dram_only["disk_bytes"] == 0


def test_generate_given_other_ids_than_the_turn_is_refused_at_any_length(store_factory):
    """A new message longer than the restored history would be sliced by generate() into "new" tokens that are
    not the conversation's (silently wrong before): the first forward compares its ids with the turn's and
    raises before anything changed, so the same cache then serves the right call exactly."""
    model = tiny_model("llama")
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(10, 1))
    new = random_ids(30, 5)
    cache = store.cache_for(model, "s", torch.cat([out.sequences, new], 1))
    assert cache.reused_tokens == 14
    with pytest.raises(ValueError, match="cache.input_ids"):
        model.generate(new, past_key_values=cache, max_new_tokens=2, attention_mask=torch.ones_like(new))
    other = cache.input_ids.clone()
    other[0, -1] = (other[0, -1] + 1) % 150 + 8
    with pytest.raises(ValueError, match="other ids"):
        model.generate(other, past_key_values=cache, max_new_tokens=2, attention_mask=torch.ones_like(other))
    compare(model, cache, cache.input_ids)


def test_a_second_generate_on_a_used_cache_must_continue_it(family, store_factory):
    """generate() given no more ids than the cache holds (the same prompt again) slices them wrongly and feeds a
    stretch of them again — silently wrong before, as with transformers' DynamicCache. The forward's mask or
    positions show it; nothing in the cache changes, and the conversation so far plus new tokens then continues
    it exactly."""
    model = tiny_model(family)
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 1))
    ids = torch.cat([out.sequences, random_ids(6, 2)], 1)
    cache = store.cache_for(model, "s", ids)
    out2 = greedy(model, ids, cache)
    held = cache.get_seq_length()
    for again in (ids, out2.sequences[:, :held]):  # fewer ids than it holds; exactly as many
        with pytest.raises(ValueError, match="does not continue"):
            greedy(model, again, cache)
        assert cache.get_seq_length() == held
    nxt = out2.sequences[:, held:held + 1]
    with pytest.raises(ValueError, match="attention mask covers"):  # a direct call with a mask of the new ids only
        model(nxt, attention_mask=torch.ones_like(nxt), past_key_values=cache)
    assert cache.get_seq_length() == held
    more = torch.cat([out2.sequences, random_ids(4, 3)], 1)
    ours, ref = greedy(model, more, cache), greedy(model, more)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= 1e-4


def test_save_refuses_a_reply_the_cache_did_not_compute(store_factory):
    """The prompt matches but the reply is another one of the same length (re-tokenised, from another call):
    its K/V are not in this cache, so storing it would give the next turn a wrong answer."""
    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(20, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache, new=8).sequences
    other = torch.cat([ids, random_ids(8, 42)], 1)
    with pytest.raises(ValueError, match="position 20"):
        store.save("s", cache, other)
    assert store.sessions() == []
    assert store.save("s", cache, out).result().token_ids == out[0, :-1].tolist()
    # a crop (assisted decoding rolls back rejected tokens) is followed: what is held after it is what counts
    cache.crop(-3)
    assert cache.held_ids() == out[0, :-4].tolist()


def test_save_of_an_empty_cache_says_so(store_factory):
    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(12, 3)
    cache = store.cache_for(model, "s", ids)
    with pytest.raises(ValueError, match="empty"):
        store.save("s", cache, ids)
    out = greedy(model, ids, cache)
    cache.reset()
    with pytest.raises(ValueError, match="empty"):
        store.save("s", cache, out.sequences)
    assert store.sessions() == []


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_restored_cache_serves_beams_and_several_return_sequences(family, store_factory):
    """generate() expands its inputs to one row per beam or return sequence but not a prefilled cache (transformers'
    own DynamicCache then fails the same way): the restored one-row cache is repeated at the first forward, exact
    against beam search without a cache."""
    model = tiny_model(family)
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 1))
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
              attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    cache = store.cache_for(model, "s", ids)
    assert cache.reused_tokens == 24
    ours = model.generate(cache.input_ids, past_key_values=cache, **kw)
    ref = model.generate(ids, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert (ours.sequences_scores - ref.sequences_scores).abs().max() <= 1e-4
    rows = torch.cat([ids, ids], 0)  # identical rows (one conversation) are fine; different ones are refused
    cache = store.cache_for(model, "s", ids)
    assert model.generate(rows, past_key_values=cache, max_new_tokens=2, do_sample=False,
                          attention_mask=torch.ones_like(rows)).shape == (2, ids.shape[1] + 2)
    rows[1, -1] = (rows[1, -1] + 1) % 150 + 8
    with pytest.raises(ValueError, match="one conversation"):
        model.generate(rows, past_key_values=store.cache_for(model, "s", ids), max_new_tokens=2,
                       attention_mask=torch.ones_like(rows))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padding_that_hides_restored_tokens_is_recomputed_and_not_stored(family, store_factory, caplog):
    """The conversation holds the pad id (0), so generate() masks it out (no attention_mask given): the stored K/V
    were computed without that mask, and positions derived from the mask skip it. The restored tokens are
    recomputed under the mask (exact against generate() without a cache), and a turn whose K/V depend on a mask
    is not stored (the session keeps its previous record)."""
    model = tiny_model(family)
    store = store_factory()
    first = random_ids(20, 1)
    first[0, 6] = 0  # a pad id inside the conversation
    cache = store.cache_for(model, "s", first)
    out = greedy(model, first, cache)  # attention_mask all ones: nothing masked, stored as usual
    rec = store.save("s", cache, out.sequences).result()
    assert rec is not None
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cache = store.cache_for(model, "s", ids)
    assert cache.reused_tokens == 24
    with caplog.at_level("WARNING"):
        ours = model.generate(cache.input_ids, past_key_values=cache, **kw)  # generate() infers the mask
    assert "recomputing them under that mask" in caplog.text
    ref = model.generate(ids, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= 1e-4
    assert cache.recomputed_tokens == 24 and cache.masked
    assert store.save("s", cache, ours.sequences).result() is None
    assert store.history("s") == out.sequences[0].tolist() and store.stats()["saves_skipped"] == 1


def test_token_ids_are_checked(store_factory):
    model = tiny_model("llama")
    store = store_factory()
    with pytest.raises(TypeError, match="integers"):
        store.cache_for(model, "s", torch.full((1, 5), 10.9))
    for bad in (-1, VOCAB):
        with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
            store.cache_for(model, "s", torch.tensor([[9, 10, bad]]))
    s = store.stats()  # refused before anything was read or counted (lookups once outnumbered hits + misses)
    assert (s["lookups"], s["hits"], s["misses"], s["loads"]) == (0, 0, 0, 0)


def test_plain_forwards_of_a_patched_model_keep_no_keys():
    """The capture hooks keep pre-RoPE keys only for an AttentionStoreCache (which takes them): a patched model
    used without one holds nothing afterwards."""
    model = tiny_model("llama")
    patch = attnstore_hf.patch_model(model)
    ids = random_ids(30, 1)
    model(ids)
    model.generate(ids, max_new_tokens=3, attention_mask=torch.ones_like(ids))
    assert patch.stash == {}
    cache = AttentionStoreCache(model)
    model(ids, past_key_values=cache, use_cache=True)
    assert patch.stash == {} and cache.layers[0].raw_state()[0].shape[-2] == 30


@pytest.mark.parametrize("how", ["load_state_dict", "assign", "optimizer_step", "to_dtype", "cast_round_trip",
                                 "data_assign"])
def test_weights_changed_after_patching_make_old_records_another_models(how, store_factory, caplog):
    """A checkpoint loaded into the same model object (in place or by replacing the parameters), an optimizer
    step, a cast: the records of the old weights are a miss with a warning, and the turn is exact for the new
    weights (before: the old K/V were restored, a wrong answer)."""
    model = tiny_model("llama")
    other = tiny_model("llama", seed=5).state_dict()  # built first: building a model registers parameters
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 1))
    if how == "load_state_dict":
        model.load_state_dict(other)
    elif how == "assign":
        model.load_state_dict(other, assign=True)
    elif how == "cast_round_trip":  # precision lost, same dtype: only the storages changed
        model.to(torch.bfloat16).to(torch.float32)
    elif how == "data_assign":
        for name, p in model.named_parameters():
            p.data = other[name].clone()
    elif how == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(out.sequences, labels=out.sequences).loss.backward()
        opt.step()
        model.zero_grad()
    else:
        model.to(torch.float64)
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    with caplog.at_level("WARNING"):
        cache = store.cache_for(model, "s", ids)
    assert cache.reused_tokens == 0 and "another model" in caplog.text
    compare(model, cache, ids)
    saved_turn(model, store, ids)  # the new weights' record is restored next
    assert store.cache_for(model, "s", torch.cat([ids, random_ids(3, 3)], 1)).reused_tokens > 0


def test_weights_changed_between_cache_for_and_save_are_not_stored(store_factory, caplog):
    """A hot reload between a turn's generate() and its save(), with another session's cache_for in between (which
    takes the new fingerprint): the cache holds K/V of the old weights, so labelling them with either fingerprint
    would hand a later turn wrong K/V. Not stored, a warning says why."""
    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(30, 1)
    cache = store.cache_for(model, "a", ids)
    out = greedy(model, ids, cache)
    model.load_state_dict(tiny_model("llama", seed=7).state_dict())
    store.cache_for(model, "b", random_ids(20, 2))
    with caplog.at_level("WARNING"):
        assert store.save("a", cache, out.sequences).result() is None
    assert "weights changed" in caplog.text and store.history("a") is None


def test_embeddings_and_leftover_rows_on_a_restored_cache_are_clear_errors(store_factory):
    """inputs_embeds cannot be checked against the stored tokens (a new message's embeddings alone were silently
    wrong); a one-row forward on a cache beam search left with several rows failed deep inside a matmul. On a
    fresh cache embeddings work as in transformers."""
    model = tiny_model("llama")
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 1))
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    embeds = model.get_input_embeddings()(ids)
    cache = store.cache_for(model, "s", ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=embeds, past_key_values=cache, max_new_tokens=2,
                       attention_mask=torch.ones_like(ids))
    fresh = store.cache_for(model, "other", ids)  # a miss
    ours = model.generate(inputs_embeds=embeds, past_key_values=fresh, max_new_tokens=3, do_sample=False,
                          attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False,
                                            attention_mask=torch.ones_like(ids)))
    beams = store.cache_for(model, "s", ids)
    out = model.generate(ids, past_key_values=beams, num_beams=3, max_new_tokens=2, do_sample=False,
                         attention_mask=torch.ones_like(ids))
    more = torch.cat([out, random_ids(2, 3)], 1)
    with pytest.raises(ValueError, match="holds 3"):
        model.generate(more, past_key_values=beams, max_new_tokens=2, attention_mask=torch.ones_like(more))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_on_a_restored_cache_says_what_happens(family, mode, store_factory):
    """transformers' assisted decoding and prompt lookup feed the whole sequence again on a prefilled cache
    (DynamicCache then computes a wrong answer): refused with a message that says so — and on a miss they work
    (transformers 5.17 crops with a 0-d tensor, which a layer once kept as its length: a shape error) and their
    turn is stored and resumed exactly."""
    model = tiny_model(family)
    store = store_factory()
    ids = random_ids(20, 1)
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    kw.update(prompt_lookup_num_tokens=3) if mode == "prompt_lookup" else kw.update(
        assistant_model=tiny_model(family, seed=3))
    cache = store.cache_for(model, "s", ids)
    out = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, model.generate(ids, **kw))
    store.save("s", cache, out).result()
    ids2 = torch.cat([out, random_ids(4, 2)], 1)
    kw["attention_mask"] = torch.ones_like(ids2)
    cache2 = store.cache_for(model, "s", ids2)
    assert cache2.reused_tokens == out.shape[1] - 1
    with pytest.raises(ValueError, match="whole sequence again"):
        model.generate(cache2.input_ids, past_key_values=cache2, **kw)
    # transformers 5.17 crops the cache (sliding layers to their window) before that forward: a new one
    compare(model, store.cache_for(model, "s", ids2), ids2)


def test_use_cache_false_with_a_store_cache_is_refused(store_factory):
    """generate(use_cache=False) feeds the whole sequence at every step, and a cache given anyway takes it in again
    each time (transformers' DynamicCache too: a wrong answer, 0.12 off here before)."""
    model = tiny_model("llama")
    store = store_factory()
    out, _ = saved_turn(model, store, random_ids(20, 1))
    ids = torch.cat([out.sequences, random_ids(4, 2)], 1)
    cache = store.cache_for(model, "s", ids)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(cache.input_ids, past_key_values=cache, use_cache=False, max_new_tokens=3,
                       attention_mask=torch.ones_like(ids))
    compare(model, cache, ids)


def test_a_save_racing_close_says_the_store_closed(store_factory):
    """close() on another thread shuts the save pool down between save()'s check and its hand-over: the caller
    gets AttnStoreError, not the thread pool's RuntimeError."""
    model = tiny_model("llama")
    store = store_factory()
    ids = random_ids(12, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store._save_pool.shutdown(wait=True)  # where close() has got to when the race is lost
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed during the save"):
        store.save("s", cache, out.sequences)


def test_a_failed_save_neither_breaks_flush_nor_close(store_factory, tmp_path):
    """A save whose commit raised (it warns) made flush() re-raise its exception if it was still under way, and so
    close(): the store stayed half open, its workers running and its DRAM records not written to disk. Now flush
    waits without raising (the save's future holds the exception, stats count it) and close finishes."""
    import threading

    model = tiny_model("llama")
    store = store_factory(write_policy="write_back")
    saved_turn(model, store, random_ids(10, 1), session="kept")
    go = threading.Event()
    build = store._build_record

    def failing(head, snap):  # the commit fails (here: fault injected) once close() is waiting for it
        go.wait(5)
        raise RuntimeError("out of host memory")

    store._build_record = failing
    ids = random_ids(12, 2)
    cache = store.cache_for(model, "lost", ids)
    fut = store.save("lost", cache, greedy(model, ids, cache).sequences)
    threading.Timer(0.2, go.set).start()
    store.close()
    assert isinstance(fut.exception(), RuntimeError) and store.stats()["saves_failed"] == 1
    store._build_record = build
    again = store_factory()  # the write-back record of the other session reached the disk
    assert again.cache_for(model, "kept", torch.cat([torch.tensor([again.history("kept")]), random_ids(3, 3)], 1)).reused_tokens > 0
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed"):
        store.cache_for(model, "kept", ids)


def test_an_interrupted_close_still_persists_and_closes(store_factory):
    """Ctrl-C during close() (here: in its flush) left the store open, its workers running and its write-back
    sessions in DRAM only (an earlier mend closed it at once instead: the sessions were lost and a save under way
    failed). Now close() finishes its work — the saves, DRAM to disk, the workers stopped — and then re-raises."""
    import threading

    model = tiny_model("llama")
    store = store_factory(write_policy="write_back")
    ids = random_ids(12, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store.save("s", cache, out.sequences)
    flush, calls = store.flush, []

    def interrupted():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        flush()

    store.flush = interrupted
    with pytest.raises(KeyboardInterrupt):
        store.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("attnstore")]
    assert store.stats()["saves_failed"] == 0
    store.close()  # returns: closed
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed"):
        store.save("s", cache, out.sequences)
    assert store_factory().history("s") == out.sequences[0].tolist()


def test_a_queued_save_still_guards_the_cache_after_another_snapshot(store_factory):
    """A cache remembered one pending save: a blocking record_from_cache() taken while an asynchronous save was
    queued behind others replaced it, so a crop and a forward on the cache overwrote K/V the queued save had not
    copied yet — its record held K/V of other tokens than its ids (every layer). Every pending save is now waited
    for before the cache changes in place."""
    import threading

    model = tiny_model("llama")
    store = store_factory(disk_dir=None, restore_mode="load")
    ids = random_ids(40, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    gate = threading.Event()
    store._save_pool.submit(gate.wait, 10)  # the save thread is busy with an earlier save
    fut = store.save("s", cache, out.sequences)  # queued: nothing copied yet
    ref = store.record_from_cache("t", cache, out.sequences)
    threading.Timer(0.3, gate.set).start()
    cache.crop(-10)  # waits for the queued save
    with torch.no_grad():
        model(random_ids(10, 7), past_key_values=cache, use_cache=True)
    rec = fut.result()
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(rec.layers, ref.layers))


def test_a_save_refused_by_a_closing_store_does_not_hang_the_cache(store_factory):
    """save() racing close(): the refused save's snapshot had already registered with the cache and was never
    copied, so the cache's next crop/reset/forward waited for it forever."""
    import threading

    model = tiny_model("llama")
    store = store_factory(disk_dir=None)
    ids = random_ids(20, 1)
    cache = store.cache_for(model, "s", ids)
    out = greedy(model, ids, cache)
    store._save_pool.shutdown()  # where a close() on another thread has got to
    with pytest.raises(attnstore_hf.AttnStoreError, match="closed during the save"):
        store.save("s", cache, out.sequences)
    t = threading.Thread(target=cache.crop, args=(-1,), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and cache.get_seq_length() == out.sequences.shape[1] - 2


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
def test_deepcopy_branches_a_conversation(fam, store_factory):
    """``copy.deepcopy(cache)`` (transformers' caches allow it; ours raised ``TypeError: cannot pickle
    '_thread._local'``): taken while the layer-wise restore still runs, it waits for it; the copy and the original
    then go on with different messages, each exactly as a recompute, and are saved and resumed as two sessions."""
    model = tiny_model(fam)
    store = store_factory(restore_mode="load")
    out, rec = saved_turn(model, store, random_ids(40, 1))
    ids = torch.cat([out.sequences, random_ids(5, 2)], 1)
    cache = store.cache_for(model, "s", ids)
    branch = copy.deepcopy(cache)
    assert branch.reused_tokens == cache.reused_tokens == rec.num_tokens and branch._model is model
    first = [compare(model, c, ids).sequences for c in (branch, cache)]  # the copy first: the original must not
    assert torch.equal(*first)                                           # see its tokens
    seqs = {}
    for session, c, seed in (("s-b", branch, 3), ("s", cache, 4)):
        nxt = torch.cat([first[0], random_ids(6, seed)], 1)
        got, ref = greedy(model, nxt, c), greedy(model, nxt)
        assert torch.equal(got.sequences, ref.sequences) and logit_diff(got, ref) <= 1e-4
        store.save(session, c, got.sequences).result()
        seqs[session] = got.sequences
    assert not torch.equal(seqs["s"][:, : seqs["s-b"].shape[1]], seqs["s-b"])
    for session, seq in seqs.items():
        nxt = torch.cat([seq, random_ids(3, 5)], 1)
        c = store.cache_for(model, session, nxt)
        assert c.reused_tokens == seq.shape[1] - 1
        compare(model, c, nxt)
