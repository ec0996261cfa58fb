"""Trace-driven simulation of a serving queue over ShareGPT through the real store and policy classes."""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
import math
import random
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field

import torch

from .config import StoreConfig
from .record import LayerKV, SessionRecord
from .store import AttentionStore

log = logging.getLogger(__name__)

#: KV bytes per token of common models in fp16 (2 * layers * kv_heads * head_dim * 2 bytes)
KV_BYTES_PER_TOKEN = {
    "llama2-13b": 2 * 40 * 40 * 128 * 2,   # 0.82 MB (the paper's 0.78 MiB)
    "llama2-7b": 2 * 32 * 32 * 128 * 2,
    "llama3-8b": 2 * 32 * 8 * 128 * 2,
    "gemma3-270m": 2 * 18 * 1 * 256 * 4,   # fp32, before sliding-window savings
}


def synthetic_record(namespace: str, session_id: str, token_ids: list[int], bytes_per_token: int,
                     salt: int = 0) -> SessionRecord:
    """A record of ``len(token_ids)`` tokens whose K/V take ``bytes_per_token`` per token (fp16), filled with a
    pattern that depends on the session, the token and ``salt`` (so byte-identity checks are meaningful)."""
    d = max(1, bytes_per_token // 4)  # K and V, d fp16 values each
    n = len(token_ids)
    base = (zlib.crc32(f"{session_id}\x00{salt}".encode("utf-8", "surrogatepass")) % 997) / 997.0
    col = torch.arange(d, dtype=torch.float32) / d
    row = torch.arange(n, dtype=torch.float32).unsqueeze(1) / max(n, 1)
    k = (row + col + base).to(torch.float16).reshape(1, 1, n, d)
    v = (row - col - base).to(torch.float16).reshape(1, 1, n, d)
    return SessionRecord(namespace, session_id, "synthetic", "float16", list(token_ids),
                         [LayerKV("full", 0, k, v)], meta={"salt": salt})


@dataclass
class Turn:
    session: int
    index: int
    user: int        # tokens of the user's message
    reply: int       # tokens of the assistant's reply


@dataclass
class SimConfig:
    sessions: int = 2000
    rate: float = 2.0             # new sessions per second (Poisson)
    think_s: float = 120.0        # mean time between a reply and the user's next message
    think_dist: str = "exp"       # "exp" (memoryless) or "lognormal" (heavy-tailed, sigma 1.5, same mean)
    slots: int = 32               # jobs served at once (batch)
    prefill_tok_s: float = 4000.0  # modeled prefill speed of the whole server
    decode_tok_s: float = 25.0     # modeled decode speed per job
    max_reply: int = 512
    context: int = 4096            # records are truncated to this many tokens (truncation issue)
    model: str = "llama2-13b"
    dram: float = 64e9             # modeled capacities in bytes
    disk: float = 300e9
    scale: float = 1e-4            # tensors and capacities scaled by this: hit rates depend on ratios only
    lookahead: int = 2048
    write_policy: str = "write_back"  # AttentionStore's: records reach disk when DRAM demotes them
    codec: str = "none"                # record codec: sizes shrink by the codec's measured ratio
    seed: int = 0
    policies: tuple = ("lru", "fifo", "scheduler")
    results: dict = field(default_factory=dict)


def load_turns(n_sessions: int, tokenizer=None) -> list[list[Turn]]:
    """The first ``n_sessions`` ShareGPT conversations as turns with token counts (real tokenizer if given)."""
    from .data import iter_sharegpt, turn_pairs

    convs = []
    for conv in iter_sharegpt():
        pairs = turn_pairs(conv)
        if pairs:
            convs.append(pairs)
        if len(convs) >= n_sessions:
            break
    texts = [t for pairs in convs for pair in pairs for t in pair]
    if tokenizer is not None:
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False).input_ids]
    else:  # ~4 characters per token
        lengths = [max(1, len(t) // 4) for t in texts]
    out, i = [], 0
    for s, pairs in enumerate(convs):
        turns = []
        for j in range(len(pairs)):
            turns.append(Turn(s, j, max(1, lengths[i]), max(1, lengths[i + 1])))
            i += 2
        out.append(turns)
    return out


def _think(rng: random.Random, cfg: SimConfig) -> float:
    if cfg.think_dist == "exp":
        return rng.expovariate(1.0 / cfg.think_s)
    if cfg.think_dist == "lognormal":  # same mean: exp(mu + sigma^2 / 2) = think_s
        sigma = 1.5
        return rng.lognormvariate(math.log(cfg.think_s) - sigma * sigma / 2, sigma)
    raise ValueError(f"think_dist must be 'exp' or 'lognormal', got {cfg.think_dist!r}")


def build_trace(sessions: list[list[Turn]], cfg: SimConfig) -> list[tuple]:
    """Discrete-event run of the serving queue. Returns the store operations in order:
    ``("plan", queue)`` when a turn joins the queue, ``("lookup", session, turn_index, queue_after)`` at dispatch
    and ``("save", session, turn_index, tokens)`` at completion. Service times assume the store works, so every policy replays the same trace."""
    rng = random.Random(cfg.seed)
    events: list[tuple] = []  # (time, seq, kind, payload)
    seq = 0
    t = 0.0
    for s in range(len(sessions)):
        t += rng.expovariate(cfg.rate)
        events.append((t, seq, "arrive", (s, 0)))
        seq += 1
    heapq.heapify(events)
    queue: list[tuple[int, int]] = []
    busy = 0
    history = [0] * len(sessions)
    ops = []
    while events:
        now, _, kind, (s, j) = heapq.heappop(events)
        if kind == "arrive":
            queue.append((s, j))
            ops.append(("plan", [q[0] for q in queue[: cfg.lookahead]]))
        else:  # done
            busy -= 1
            turn = sessions[s][j]
            history[s] = min(cfg.context, history[s] + turn.user + min(turn.reply, cfg.max_reply))
            ops.append(("save", s, j, history[s]))
            if j + 1 < len(sessions[s]):
                heapq.heappush(events, (now + _think(rng, cfg), seq, "arrive", (s, j + 1)))
                seq += 1
        while queue and busy < cfg.slots:
            s2, j2 = queue.pop(0)
            busy += 1
            ops.append(("lookup", s2, j2, [q[0] for q in queue[: cfg.lookahead]]))
            turn = sessions[s2][j2]
            service = (turn.user / cfg.prefill_tok_s) + min(turn.reply, cfg.max_reply) / cfg.decode_tok_s
            heapq.heappush(events, (now + service, seq, "done", (s2, j2)))
            seq += 1
    return ops


def codec_ratio(codec: str, heads: int = 8, head_dim: int = 128) -> float:
    """Bytes of a record stored with ``codec`` relative to 16-bit storage, measured by encoding a sample."""
    from .codec import encode

    if codec in ("none", "bf16", "fp16"):
        return 1.0
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, 1024, head_dim, generator=g)
    size = sum(t.numel() * t.element_size() for t in encode(k, k, codec).values())
    return size / (2 * k.numel() * 2)


def replay(ops: list[tuple], cfg: SimConfig, policy: str, dram: float | None = None) -> dict:
    """Run the trace's operations through a real ``AttentionStore`` with ``policy``. Returns hit statistics."""
    bpt = KV_BYTES_PER_TOKEN[cfg.model] * codec_ratio(cfg.codec)
    scaled_bpt = max(4, int(round(bpt * cfg.scale)))
    # the factor each tier's capacity is scaled by: what a record of the scaled size really takes per token there
    # (its K/V rounded to whole values, plus its token ids: 8 bytes each in DRAM, JSON in a file), so records and
    # capacities keep the modeled ratio (scaling by the K/V alone made records 7% too large, 17% with int8)
    probe = synthetic_record("sim", "probe", [0] * 1000, scaled_bpt)
    dram_scale, disk_scale = probe.nbytes / 1000 / bpt, len(probe.to_bytes()) / 1000 / bpt
    dram = cfg.dram if dram is None else dram
    tmp = tempfile.mkdtemp(prefix="attnstore-sim-")
    store = AttentionStore(StoreConfig(
        dram_bytes=int(dram * dram_scale), disk_dir=tmp, disk_bytes=int(cfg.disk * disk_scale), policy=policy,
        write_policy=cfg.write_policy, fsync=False, pin_memory=False, namespace="sim"))
    hits = {"dram": 0, "disk": 0}
    lookups = misses = 0
    try:
        for op in ops:
            if op[0] == "plan":
                if policy == "scheduler":
                    store.plan([f"s{u}" for u in op[1]], wait=True)
            elif op[0] == "lookup":
                _, s, j, upcoming = op
                if j > 0:  # first turns have no history: compulsory misses, not counted
                    lookups += 1
                    rec, tier = store.get_record(f"s{s}")
                    store.flush()  # a promotion may have demoted another record: finish that write first
                    if rec is None:
                        misses += 1
                    else:
                        hits[tier] += 1
                if policy == "scheduler":  # the job left the queue: the look-ahead moves on
                    store.plan([f"s{u}" for u in upcoming], wait=True)
            else:
                _, s, j, tokens = op
                store.put_record(synthetic_record("sim", f"s{s}", [0] * tokens, scaled_bpt, salt=j))
                store.flush()
        stats = store.stats()
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    total_hits = hits["dram"] + hits["disk"]
    return {
        "hit_rate": total_hits / lookups if lookups else 0.0,
        "dram_hit_rate": hits["dram"] / lookups if lookups else 0.0,
        "disk_hit_rate": hits["disk"] / lookups if lookups else 0.0,
        "dram_share_of_hits": hits["dram"] / total_hits if total_hits else 0.0,
        "lookups": lookups, "misses": misses, "prefetches": stats["prefetches"],
        "prefetch_hits": stats["prefetch_hits"], "evictions_dram": stats["evictions_dram"],
        "evictions_disk": stats["evictions_disk"],
    }


def flat_replay(ops: list[tuple], cfg: SimConfig, policy: str, capacity: float) -> dict:
    """The same trace through a textbook single-tier cache of ``capacity`` bytes, apart from the store's code: an
    independent check of what the trace itself favours. ``lru``: lookups and saves renew; ``fifo``: neither does
    (an updated record keeps its place). Records are sized like :func:`replay`'s (no codec); first turns are not
    counted."""
    if policy not in ("lru", "fifo"):
        raise ValueError(f"flat_replay policy must be 'lru' or 'fifo', got {policy!r}")
    bpt = KV_BYTES_PER_TOKEN[cfg.model]
    held: OrderedDict[int, float] = OrderedDict()  # first = first to leave
    used = 0.0
    lookups = hits = 0
    for op in ops:
        if op[0] == "lookup" and op[2] > 0:
            lookups += 1
            if op[1] in held:
                hits += 1
                if policy == "lru":
                    held.move_to_end(op[1])
        elif op[0] == "save":
            s, size = op[1], op[3] * bpt
            used += size - held.get(s, 0.0)
            held[s] = size
            if policy == "lru":
                held.move_to_end(s)
            while used > capacity and held:
                _, gone = held.popitem(last=False)
                used -= gone
    return {"hit_rate": hits / lookups if lookups else 0.0, "lookups": lookups, "capacity": capacity}
