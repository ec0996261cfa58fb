"""Shared fixtures: tiny random-weight models of every supported family, stores on temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from attnstore_hf import AttentionStore, StoreConfig

warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated.*")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
VOCAB = 160
FIRST_SAFE_ID = 8  # ids below this are special (pad/bos/eos) in the tiny configs: random inputs avoid them


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    layers = overrides.pop("num_hidden_layers", None)  # at construction: configs derive layer_types from it
    if layers is not None:
        common["num_hidden_layers"] = layers
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 256})
    elif family == "gemma3":
        # sliding window (8) much shorter than the histories below; local and global RoPE thetas differ
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": layers or 6, "num_key_value_heads": 1}, head_dim=16,
                                  sliding_window=8, sliding_window_pattern=3)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM, "gemma3": tf.Gemma3ForCausalLM}[family]
    model = cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def random_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_SAFE_ID, VOCAB, (1, n), generator=g)


def greedy(model, ids, cache=None, new=5):
    kwargs = {} if cache is None else {"past_key_values": cache}
    # no padding here: a generated pad id (0) must not be masked out of the prompt of the next turn
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


def logit_diff(a, b) -> float:
    """Largest absolute difference of two generate() outputs' logits over every generated step."""
    assert len(a.logits) == len(b.logits)
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


def compare(model, cache, ids, tol=1e-4):
    """generate() on ``cache`` (restored for ``cache.input_ids``) gives the recompute's tokens and logits."""
    ours = greedy(model, cache.input_ids, cache)
    ref = greedy(model, ids)
    assert torch.equal(ours.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff <= tol, diff
    return ours


def saved_turn(model, store, ids, session="s"):
    """One turn through the store: restore, generate greedily, save. Returns (generate output, record)."""
    cache = store.cache_for(model, session, ids)
    out = greedy(model, ids, cache)
    return out, store.save(session, cache, out.sequences).result()


@pytest.fixture
def store_factory(tmp_path):
    stores = []

    def make(**kw):
        kw.setdefault("disk_dir", tmp_path / "kv")
        s = AttentionStore(StoreConfig(**kw))
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def run_bench(tmp_path, *argv, timeout=900):
    """``scripts/bench.py argv`` in a subprocess with a temporary directory of its own: it must exit 0 and leave
    nothing there (a bench's records can be GBs; CI once ran out of disk)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr[-3000:]
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert not left, f"left in the temporary directory: {left}"
    return r
