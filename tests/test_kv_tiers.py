"""The tiers under the prefix cache: the disk tier's files (checksums, crash safety, sizes, the model check),
and multi-turn conversations whose history comes back from host memory or disk with the same greedy replies
as a recompute."""

import collections
import concurrent.futures
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, page_copy
from jaxpage.config import EngineConfig
from jaxpage.kv_tiers import DiskTier, KVStore
from jaxpage.page_pool import page_hashes
from jaxpage.runner import kv_bytes_per_page

FINGERPRINT = {"model": "test", "page_size": 4}
KEYS = page_hashes(list(range(40)), 4)


def page(i: int) -> np.ndarray:
    return np.full((2, 3), i, np.float32)


def test_disk_pages_survive_a_restart_and_stay_within_the_size(tmp_path):
    disk = DiskTier(str(tmp_path), 3, FINGERPRINT)
    for i, key in enumerate(KEYS[:5]):
        disk.put(key, page(i))
    disk.flush()
    assert len(disk) == 3 and len(list(tmp_path.glob("*.kv"))) == 3  # the two oldest went
    assert disk.get(KEYS[0]) is None and disk.get(KEYS[4]).tolist() == page(4).tolist()
    with pytest.raises(ValueError, match="kv_disk_cache_dir.*in use by another engine"):
        DiskTier(str(tmp_path), 3, FINGERPRINT)
    disk.close()
    again = DiskTier(str(tmp_path), 2, FINGERPRINT)  # smaller now: the least recently used goes
    assert len(again) == 2
    again.flush()
    assert len(list(tmp_path.glob("*.kv"))) == 2 and again.get(KEYS[4]).tolist() == page(4).tolist()


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip_checksum", "delete", "other_tokens"])
def test_a_damaged_file_is_a_miss_and_goes(tmp_path, damage):
    disk = DiskTier(str(tmp_path), 8, FINGERPRINT)
    disk.put(KEYS[0], page(7))
    disk.flush()
    (file,) = tmp_path.glob("*.kv")
    blob = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        file.write_bytes(blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:])
    elif damage == "flip_checksum":
        file.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "delete":
        file.unlink()
    else:  # a valid file under another page's name
        disk.put(KEYS[1], page(1))
        disk.flush()
        os.replace(tmp_path / (KEYS[1].digest.hex() + ".kv"), file)
    assert disk.get(KEYS[0]) is None and KEYS[0].digest not in disk
    disk.flush()
    assert not file.exists() and disk.num_bad_files == 1


def test_a_write_cut_short_is_never_read(tmp_path):
    disk = DiskTier(str(tmp_path), 8, FINGERPRINT)
    disk.put(KEYS[0], page(0))
    disk.flush()
    (file,) = tmp_path.glob("*.kv")
    # A crash mid-write leaves a temporary file; the name a reader looks for only ever holds a whole file.
    (tmp_path / (KEYS[1].digest.hex() + ".tmp")).write_bytes(file.read_bytes()[:10])
    disk.close()
    again = DiskTier(str(tmp_path), 8, FINGERPRINT)
    assert len(again) == 1 and not list(tmp_path.glob("*.tmp"))
    assert again.get(KEYS[1]) is None and again.get(KEYS[0]).tolist() == page(0).tolist()


def test_a_directory_of_another_model_or_page_size_is_refused(tmp_path):
    DiskTier(str(tmp_path), 8, FINGERPRINT).close()
    with pytest.raises(ValueError, match=r"kv_disk_cache_dir.*page_size is 4 there, 8 here"):
        DiskTier(str(tmp_path), 8, {**FINGERPRINT, "page_size": 8})
    (tmp_path / "jaxpage-kv-tier.json").write_text("{not json")
    with pytest.raises(ValueError, match="kv_disk_cache_dir.*unreadable"):
        DiskTier(str(tmp_path), 8, FINGERPRINT)


def test_a_missing_or_read_only_directory_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="kv_disk_cache_dir.*not an existing directory"):
        DiskTier(str(tmp_path / "nope"), 8, FINGERPRINT)
    # Permissions do not stop root, which CI may run as: ask the check itself.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="kv_disk_cache_dir.*not writable"):
        DiskTier(str(tmp_path), 8, FINGERPRINT)


def test_the_host_tier_spills_its_least_recently_used_pages_to_disk(tmp_path):
    store = KVStore(2, DiskTier(str(tmp_path), 8, FINGERPRINT))
    for i, key in enumerate(KEYS[:4]):
        store.save(key, page(i))
    assert store.num_host_pages == 2 and len(store.disk) == 2
    found = store.lookup(KEYS[:5], limit=10)
    assert [tier for tier, _ in found] == ["disk", "disk", "host", "host"]
    assert [kv.tolist() for _, kv in found] == [page(i).tolist() for i in range(4)]
    # Pages read from disk went back to the host tier, pushing the others down.
    assert [tier for tier, _ in store.lookup(KEYS[:5], limit=3)] == ["host", "host", "disk"]


def test_discarded_pages_leave_every_tier(tmp_path):
    store = KVStore(2, DiskTier(str(tmp_path), 8, FINGERPRINT))
    for i, key in enumerate(KEYS[:4]):
        store.save(key, page(i))
    store.discard(KEYS[:4])
    assert store.lookup(KEYS[:1], limit=4) == [] and store.lookup(KEYS[2:3], limit=4) == []
    store.close()
    assert not list(tmp_path.glob("*.kv"))


def test_the_look_ahead_reads_queued_pages_from_disk_and_keeps_them_in_host_memory(tmp_path):
    store = KVStore(3, DiskTier(str(tmp_path), 16, FINGERPRINT))
    for i, key in enumerate(KEYS[:6]):
        store.save(key, page(i))
    assert [KEYS[i].digest in store.disk for i in range(3)] == [True] * 3  # the oldest three spilled
    store.want(KEYS[:2])  # a queued request will look up pages 0 and 1
    deadline = time.monotonic() + 10
    while store.num_prefetched < 2 and time.monotonic() < deadline:
        store._collect()
        time.sleep(0.01)
    assert store.num_prefetched == 2
    # Host memory now evicts the pages no queued request wants, not the wanted ones, though they are older
    # (plain LRU would have sent pages 0 and 1 back to disk).
    store.save(KEYS[6], page(6))
    store.save(KEYS[7], page(7))
    found = store.lookup(KEYS[:2], limit=2)
    assert [tier for tier, _ in found] == ["host", "host"]
    assert [kv.tolist() for _, kv in found] == [page(0).tolist(), page(1).tolist()]
    store.unwant(KEYS[:2])
    assert not store.wanted


def test_a_lookup_shares_the_disk_reads_the_look_ahead_has_under_way(tmp_path, monkeypatch):
    store = KVStore(1, DiskTier(str(tmp_path), 16, FINGERPRINT))
    for i, key in enumerate(KEYS[:5]):
        store.save(key, page(i))
    store.disk.flush()  # pages 0-3 are files now
    reads, read = collections.Counter(), store.disk._read

    def slow_read(key):
        reads[key.token_ids] += 1
        time.sleep(0.05)
        return read(key)

    monkeypatch.setattr(store.disk, "_read", slow_read)
    store.want(KEYS[:4])
    found = store.lookup(KEYS[:4], limit=4)  # while the look-ahead still reads them
    assert [kv.tolist() for _, kv in found] == [page(i).tolist() for i in range(4)]
    assert reads == {KEYS[i].token_ids: 1 for i in range(4)}  # each file read once
    store.close()


def test_a_lookup_does_not_queue_behind_the_read_ahead(tmp_path, monkeypatch):
    store = KVStore(1, DiskTier(str(tmp_path), 16, FINGERPRINT))
    for i, key in enumerate(KEYS[:10]):
        store.save(key, page(i))
    store.disk.flush()  # pages 0-8 are files now
    threads, read = {}, store.disk._read

    def slow_read(key):
        threads[key.token_ids] = threading.current_thread().name
        time.sleep(0.2)
        return read(key)

    monkeypatch.setattr(store.disk, "_read", slow_read)
    store.want(KEYS[:9])  # 9 reads ahead on 8 threads: page 8's waits for a thread
    found = store.lookup(KEYS[8:9], limit=1)
    assert [kv.tolist() for _, kv in found] == [page(8).tolist()]
    assert threads[KEYS[8].token_ids].startswith("kv-disk-read_")  # the lookup's own pool, not the queue
    assert all(threads[KEYS[i].token_ids].startswith("kv-disk-read-ahead") for i in range(8))
    store.close()


def test_a_page_discarded_while_read_ahead_does_not_come_back(tmp_path):
    store = KVStore(1, DiskTier(str(tmp_path), 16, FINGERPRINT))
    for i, key in enumerate(KEYS[:3]):
        store.save(key, page(i))
    store.disk.flush()  # pages 0 and 1 are files now
    store.want(KEYS[:1])  # the look-ahead reads page 0 into memory
    concurrent.futures.wait([store._reading[KEYS[0].digest][1]], timeout=10)
    store.discard(KEYS[:1])  # its K/V turns out to be garbage (the request that wrote it failed)
    store.settle()  # the finished read must not put the page back in host memory
    assert store.lookup(KEYS[:1], limit=1) == []
    store.close()


def test_the_disk_tier_evicts_the_files_no_queued_request_wants_first(tmp_path):
    store = KVStore(1, DiskTier(str(tmp_path), 2, FINGERPRINT))
    for i, key in enumerate(KEYS[:3]):
        store.save(key, page(i))  # pages 0 and 1 go to disk
    store.want([KEYS[0]])  # a queued request will look page 0 up
    store.save(KEYS[3], page(3))  # page 2 goes to disk, which holds 2: page 1 goes, not the older page 0
    assert [KEYS[i].digest in store.disk for i in range(3)] == [True, False, True]
    store.close()


@pytest.mark.parametrize(
    ("bindings", "message"),
    [
        (["EngineConfig.kv_host_cache_gib = 0"], "kv_host_cache_gib must be a positive number, got 0"),
        (["EngineConfig.kv_host_cache_gib = 1e-9"], r"kv_host_cache_gib \(1e-09\) is below one KV page"),
        (
            ["EngineConfig.kv_host_cache_gib = 1.0", "EngineConfig.kv_disk_cache_dir = '{dir}'",
             "EngineConfig.kv_disk_cache_gib = 1e-9"],
            r"kv_disk_cache_gib \(1e-09\) is below one KV page",
        ),
        (["EngineConfig.kv_disk_cache_dir = '{dir}'"], "kv_disk_cache_dir needs kv_host_cache_gib"),
        (
            ["EngineConfig.kv_host_cache_gib = 1.0", "EngineConfig.enable_prefix_caching = False"],
            "kv_host_cache_gib needs enable_prefix_caching",
        ),
    ],
)  # fmt: skip
def test_bad_tier_settings_name_the_field(tmp_path, bindings, message):
    with pytest.raises(ValueError, match=message):
        LLM.from_gin(["configs/tiny_test.gin"], [b.format(dir=tmp_path) for b in bindings])


# ---- conversations ---------------------------------------------------------------------------------------

# 33 pages of 8 tokens: the filler request between turns takes nearly all of them, so the conversation's
# pages leave the device pool and come back from the tier under it.
POOL = ["EngineConfig.num_pages = 34"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
FILLER = list(range(1000, 1250))


def page_gib(num_pages: int) -> float:
    config = LLM.from_gin(["configs/tiny_test.gin"]).engine.model_config
    return num_pages * kv_bytes_per_page(config, 8) / 2**30


def converse(llm: LLM, turns: int = 3, between=None) -> list[tuple[list[int], int, dict]]:
    """Replies, cached prompt tokens and tier hits of a conversation whose every turn extends the last prompt
    and reply."""
    prompt, replies = list(range(200, 240)), []
    for turn in range(turns):
        if between is not None and turn:
            between(turn)
        out = llm.generate(prompt, GREEDY)[0]
        reply = out.outputs[0].token_ids
        replies.append((reply, out.metrics.num_cached_tokens, out.metrics.tier_hit_tokens))
        llm.generate(FILLER, SamplingParams(max_tokens=1))
        prompt = prompt + reply + list(range(300 + 10 * turn, 310 + 10 * turn))
    return replies


@pytest.fixture(scope="module")
def recomputed():
    turns = converse(LLM.from_gin(["configs/tiny_test.gin"], POOL))
    assert [cached for _, cached, _ in turns] == [0, 8, 8]  # the filler left only the first page
    return [reply for reply, _, _ in turns]


@pytest.mark.parametrize(
    "write_through, sync_transfers",
    [(False, False), (True, False), (False, True)],
    ids=["on_eviction", "write_through", "sync"],
)
def test_history_from_host_memory_gives_the_recomputed_replies(recomputed, write_through, sync_transfers):
    llm = LLM.from_gin(
        ["configs/tiny_test.gin"],
        POOL
        + [
            f"EngineConfig.kv_host_cache_gib = {page_gib(200)}",
            f"EngineConfig.kv_tier_write_through = {write_through}",
            f"EngineConfig.kv_tier_sync_transfers = {sync_transfers}",
        ],
    )
    turns = converse(llm)
    assert [reply for reply, _, _ in turns] == recomputed
    # Turn 2 computed 40 + 9 tokens of turn 1 (the last reply token's K/V never is): 6 full pages, all
    # reused; the filler left the first on the device, the rest came back from host memory.
    assert [cached for _, cached, _ in turns] == [0, 48, 64]
    assert [hits for _, _, hits in turns] == [
        {"host": 0, "disk": 0},
        {"host": 40, "disk": 0},
        {"host": 56, "disk": 0},
    ]


def queued_turns(bindings: list[str]) -> tuple[list[list[int]], list, object]:
    """Three conversations' first and second turns, one request running at a time, so that second turns
    queue: their replies, the second turns' outputs, and the engine's metrics."""
    llm = LLM.from_gin(["configs/tiny_test.gin"], POOL + ["EngineConfig.max_num_seqs = 1"] + bindings)
    prompts = [list(range(200 + 60 * c, 240 + 60 * c)) for c in range(3)]
    first = llm.generate(prompts, GREEDY)
    llm.generate(FILLER, SamplingParams(max_tokens=1))  # evicts the conversations from the device
    prompts = [p + o.outputs[0].token_ids + [7, 8, 9] for p, o in zip(prompts, first, strict=True)]
    second = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in first + second], second, llm.engine.metrics()


@pytest.mark.parametrize("lookahead", [True, False])
def test_queued_turns_find_their_history_loaded_ahead_with_the_recomputed_replies(lookahead):
    replies, _, _ = queued_turns([])
    tiers = [
        f"EngineConfig.kv_host_cache_gib = {page_gib(200)}",
        f"EngineConfig.kv_tier_lookahead = {lookahead}",
    ]
    replies_from_tiers, second, metrics = queued_turns(tiers)
    assert replies_from_tiers == replies
    # Each second turn reuses its 6 full pages. The first is admitted at once and loads them from host memory;
    # with the look-ahead the queued two find theirs loaded into the pool while the first ran.
    assert [o.metrics.num_cached_tokens for o in second] == [48, 48, 48]
    host_hits = [o.metrics.tier_hit_tokens["host"] for o in second]
    assert host_hits == ([48, 0, 0] if lookahead else [48, 48, 48])
    # (At most 12: a page the filler left on the device needs no load.)
    assert 0 < metrics.host_prefetched_pages <= 12 if lookahead else metrics.host_prefetched_pages == 0


def disk_bindings(directory) -> list[str]:
    return POOL + [
        f"EngineConfig.kv_host_cache_gib = {page_gib(2)}",  # two pages: the rest spills to disk
        f"EngineConfig.kv_disk_cache_dir = '{directory}'",
        f"EngineConfig.kv_disk_cache_gib = {page_gib(500)}",
    ]


def test_history_from_disk_gives_the_recomputed_replies_also_after_a_restart(tmp_path, recomputed):
    llm = LLM.from_gin(["configs/tiny_test.gin"], disk_bindings(tmp_path))
    turns = converse(llm)
    assert [reply for reply, _, _ in turns] == recomputed
    assert [cached for _, cached, _ in turns] == [0, 48, 64]
    assert all(hits["disk"] > 0 for _, _, hits in turns[1:]), turns
    store = llm.engine.store
    llm.engine.close()
    assert store.num_host_pages <= 2 and len(store.disk) == len(list(tmp_path.glob("*.kv"))) <= 500
    # A new engine over the same directory finds the conversation there.
    again = LLM.from_gin(["configs/tiny_test.gin"], disk_bindings(tmp_path))
    turns = converse(again)
    assert [reply for reply, _, _ in turns] == recomputed
    assert turns[1][2]["disk"] > 0, turns


def test_damaged_disk_files_fall_back_to_recompute_with_the_same_replies(tmp_path, recomputed):
    llm = LLM.from_gin(["configs/tiny_test.gin"], disk_bindings(tmp_path))

    def damage_every_file(turn):
        llm.engine.store.disk.flush()
        for file in tmp_path.glob("*.kv"):
            blob = bytearray(file.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            file.write_bytes(bytes(blob))

    turns = converse(llm, between=damage_every_file)
    assert [reply for reply, _, _ in turns] == recomputed
    assert llm.engine.store.disk.num_bad_files > 0


def test_a_disk_tier_of_another_page_size_is_refused_by_the_engine(tmp_path):
    LLM.from_gin(["configs/tiny_test.gin"], disk_bindings(tmp_path)).engine.close()
    with pytest.raises(ValueError, match="kv_disk_cache_dir.*page_size is 8 there, 16 here"):
        LLM.from_gin(["configs/tiny_test.gin"], disk_bindings(tmp_path) + ["EngineConfig.page_size = 16"])


def test_engine_config_validates_tier_fields():
    with pytest.raises(ValueError, match="kv_disk_cache_gib must be a positive number"):
        EngineConfig(kv_disk_cache_gib=-1.0)


@pytest.mark.slow
def test_smollm2_history_from_host_memory_or_disk_gives_the_recomputed_replies(tmp_path):
    # Small buckets: the 30-layer model compiles few shapes. 17 usable pages of 16 tokens: the filler between
    # turns (16 pages) evicts all of the conversation's pages but its first.
    settings = dict(
        num_pages=18, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
        token_buckets=(16, 64), seq_buckets=(4,), page_buckets=(16,),
    )  # fmt: skip
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    filler = list(range(1000, 1250))

    def tiers(mode: str, page_bytes: int) -> dict:
        gib = page_bytes / 2**30
        if mode == "host":
            return dict(kv_host_cache_gib=100 * gib)
        if mode == "disk":  # two pages of host memory: the rest spills to disk
            disk = dict(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_gib=100 * gib)
            return dict(kv_host_cache_gib=2 * gib, **disk)
        return {}

    replies, hits, page_bytes = {}, {}, 0
    for mode in ("recompute", "host", "disk"):  # recompute first: its engine tells a page's bytes
        llm = LLM(**settings, **tiers(mode, page_bytes))
        page_bytes = kv_bytes_per_page(llm.engine.model_config, 16)
        first = llm.generate(list(range(2000, 2060)), greedy)[0]
        llm.generate(filler, SamplingParams(max_tokens=1))
        second = llm.generate(first.prompt_token_ids + first.outputs[0].token_ids + [3000] * 10, greedy)[0]
        replies[mode] = (first.outputs[0].token_ids, second.outputs[0].token_ids)
        hits[mode] = second.metrics.tier_hit_tokens
        llm.engine.close()
    assert replies["host"] == replies["recompute"] and replies["disk"] == replies["recompute"]
    assert hits["host"]["host"] > 0 and hits["disk"]["disk"] > 0, hits


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned_host", "numpy"])
def test_pages_move_to_host_memory_and_back_and_reserving_it_changes_nothing(pinned):
    # Pinned host memory is the GPU's way, numpy the CPU's (page_copy.uses_pinned_memory); both run here.
    pool = tuple(
        (jnp.arange(2 * 5 * 4 * 3.0).reshape(2, 5, 4, 3) + i, jnp.full((2, 5, 4, 3), -1.0 - i))
        for i in range(2)
    )
    expected = [(np.asarray(k), np.asarray(v)) for k, v in pool]
    page_copy.reserve_host_memory(pool, 3)
    saved = page_copy.gather_pages_to_host(pool, [1, 3, 4], max_piece=2, pinned=pinned)  # pieces of 2 and 1
    if pinned:
        assert [page.sharding.memory_kind for page in saved] == ["pinned_host"] * 3
    else:
        assert all(isinstance(page, np.ndarray) for page in saved)
    np.testing.assert_array_equal(np.asarray(saved[1])[0, 0], expected[0][0][:, 3])  # layer 0, K of page 3
    # Back into other pages, one of them as numpy (what the disk tier reads).
    from_disk = [saved[0], np.asarray(saved[1]), saved[2]]
    pool = page_copy.scatter_pages_from_host(pool, [2, 1, 3], from_disk, 2, pinned=pinned)
    for (k, v), (k0, v0) in zip(pool, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(k)[:, [2, 1, 3]], k0[:, [1, 3, 4]])
        np.testing.assert_array_equal(np.asarray(v)[:, [0, 4]], v0[:, [0, 4]])


@pytest.mark.parametrize(
    "shape,dtype", [((2, 2, 3, 5, 4, 3), np.float32), ((7,), jnp.bfloat16), ((1, 3), np.int8)]
)
def test_stacked_pages_start_where_xla_takes_them_without_a_copy(shape, dtype):
    data = page_copy._aligned_empty(shape, dtype)
    assert data.shape == shape and data.dtype == dtype and data.flags.c_contiguous
    assert data.ctypes.data % 64 == 0
    data[...] = 1
    assert jax.device_put(data, jax.devices("cpu")[0]).unsafe_buffer_pointer() == data.ctypes.data


def test_a_read_that_fails_is_a_logged_miss(tmp_path, caplog):
    store = KVStore(1, DiskTier(str(tmp_path), 16, FINGERPRINT))
    for i, key in enumerate(KEYS[:3]):
        store.save(key, page(i))
    store.disk.flush()  # pages 0-1 are files now, page 2 in host memory

    def stage(data):
        raise RuntimeError("pinned host memory exhausted")

    store.stage = stage
    with caplog.at_level("WARNING", logger="jaxpage.kv_tiers"):
        assert store.lookup(KEYS[:3], limit=3) == []  # the first page's read failed: nothing after it counts
    assert "reading a page failed" in caplog.text and "pinned host memory exhausted" in caplog.text
    store.close()
