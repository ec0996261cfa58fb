"""The bundled Gemma 3 270M (real weights, sliding + global layers): multi-turn reuse equals recompute."""

from __future__ import annotations

import pytest
import torch

from attnstore_hf import AttentionStore, StoreConfig
from conftest import logit_diff

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from attnstore_hf.models import load_model

    return load_model(progress=False)


def test_three_turn_conversation_matches_recompute(gemma, tmp_path):
    from attnstore_hf.data import sharegpt_text

    model, tok = gemma
    # real ShareGPT text; the history grows past the 512-token sliding window by the third turn
    text = sharegpt_text(4000)
    chunks = [text[:1400], text[1400:2600], text[2600:3800]]
    store = AttentionStore(StoreConfig(disk_dir=tmp_path / "kv"))
    history: list[int] = []
    for turn, chunk in enumerate(chunks):
        ids = torch.tensor([history + tok(chunk, add_special_tokens=not history).input_ids])
        if turn == 2:  # the last turn from disk in a new store: the restart path on the real model
            store.close()
            store = AttentionStore(StoreConfig(disk_dir=tmp_path / "kv"))
        cache = store.cache_for(model, "real", ids)
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
        out = model.generate(ids, past_key_values=cache, **kw)
        ref = model.generate(ids, **kw)
        assert torch.equal(out.sequences, ref.sequences), f"turn {turn}"
        diff = logit_diff(out, ref)
        print(f"turn {turn}: {ids.shape[1]} tokens, {cache.reused_tokens} restored, max abs logit diff {diff:.2e}")
        assert diff <= 1e-4
        if turn:
            assert cache.reused_tokens == len(history) - 1
            assert cache.source == ("disk" if turn == 2 else "dram")
        store.save("real", cache, out.sequences)
        history = out.sequences[0].tolist()
    assert len(history) > 600  # beyond the sliding window
    store.close()
