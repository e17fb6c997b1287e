"""Device side of the engine: the KV cache, per-slot sampling state, chunked prefill, and the
batched decode step captured as CUDA graphs.

Row ``j`` of a decode batch works on cache slot ``row_slots[j]``: a step runs ``b`` rows, ``b`` the
smallest captured batch size covering the running streams, wherever their slots are (with the
prefix cache, finished conversations keep low slots while new ones take higher ones). Padding rows
point at slot 0's scratch position, where they write, and their tokens are ignored. Attention reads
the first ``kv_len`` positions of each row's slot, ``kv_len`` the smallest captured length covering
the longest sequence. One CUDA graph per (b, kv_len) pair replays embedding, 40 layers, logits and
sampling with no host work; the host only writes the rows' tokens, positions and slots before and
reads the sampled ids after.

Everything here runs on one thread (the engine's worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from glm4voice.llm.model import GLMModel, KVCache, dynamic_rows
from glm4voice.llm.sampling import sample_next

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
MIN_KV_BUCKET = 256
DEFAULT_PREFILL_GRAPH_LENGTHS = (64, 128, 256, 512)
"""Padded prompt lengths with a prefill CUDA graph (a first-turn voice prompt is ~100-200 tokens)."""


def kv_buckets(max_seq_len: int, smallest: int = MIN_KV_BUCKET) -> tuple[int, ...]:
    """Attention lengths with a captured graph: powers of two from ``smallest``, then max_seq_len."""
    sizes, size = [], smallest
    while size < max_seq_len:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_seq_len,)


def _cover(sizes: Sequence[int], n: int) -> int | None:
    return next((s for s in sizes if s >= n), None)


@dataclass(frozen=True)
class Launch:
    """A decode step in flight (see :meth:`ModelRunner.launch`)."""

    rows: tuple[DecodeRow, ...]
    b: int
    out: torch.Tensor
    event: torch.cuda.Event | None


@dataclass(frozen=True)
class DecodeRow:
    slot: int
    token: int
    position: int
    """Position of ``token`` in its sequence (where its key/value are written)."""


class ModelRunner:
    def __init__(
        self,
        model: GLMModel,
        max_slots: int,
        max_seq_len: int,
        *,
        cuda_graphs: bool,
        compile: bool,
        graph_batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES,
        kv_lengths: Sequence[int] | None = None,
        cache_dtype: torch.dtype | None = None,
        prefill_graph_lengths: Sequence[int] = (),
        continued_prefill_graphs: bool = False,
    ) -> None:
        self.model = model
        self.device = model.device
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = KVCache.allocate(model.config, max_slots, max_seq_len, cache_dtype or model.dtype, self.device)
        self.rope = model.rope_tables(max_seq_len + 1, self.device)
        self.scratch = self.cache.scratch_position
        sizes = sorted({s for s in graph_batch_sizes if s < max_slots} | {max_slots})
        self.batch_sizes = tuple(sizes)
        self.kv_lengths = tuple(sorted(set(kv_lengths))) if kv_lengths else kv_buckets(max_seq_len)
        if self.kv_lengths[-1] < max_seq_len:
            raise ValueError(f"kv lengths {self.kv_lengths} do not reach max_seq_len {max_seq_len}")
        device = self.device
        self.tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.row_slots = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.positions = torch.full((max_slots,), self.scratch, dtype=torch.long, device=device)
        self.temperature = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.first_logits = torch.zeros(max_slots, model.config.vocab_size, dtype=torch.float32, device=device)
        """Each slot's logits for its first reply token (kept so that a repeated prompt draws from
        exactly the same distribution without a prefill; see glm4voice.llm.prefix_cache)."""
        pin = device.type == "cuda"
        self._host_tokens = torch.zeros(max_slots, dtype=torch.long, pin_memory=pin)
        self._host_positions = torch.full((max_slots,), self.scratch, dtype=torch.long, pin_memory=pin)
        self._host_slots = torch.zeros(max_slots, dtype=torch.long, pin_memory=pin)
        self._tokens_np, self._positions_np = self._host_tokens.numpy(), self._host_positions.numpy()
        self._slots_np = self._host_slots.numpy()
        # two output buffers and events: step k+1 may be launched before step k is collected
        self._outputs = [torch.zeros(max_slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._parity = 0
        self.sample: Callable = sample_next
        if compile:
            model.compile_steps()
            self.sample = dynamic_rows(torch.compile(sample_next))
        else:
            model.eager_steps()
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_pool: Any = None
        """The memory pool of every graph below (set by :meth:`warm_up` on CUDA)."""
        # prefill graphs: whole prompts (start 0) padded to one of these lengths; static inputs are
        # the ids, and [slot, last row, sampling counter]
        lengths = sorted({int(n) for n in prefill_graph_lengths if 0 < n <= max_seq_len}) if self.cuda_graphs else []
        self.prefill_graph_lengths = tuple(lengths)
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.continued_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        """Graphs of chunks that continue a cached sequence (prefix-cache hits), keyed by (padded
        chunk length, attention length)."""
        self._want_continued_graphs = continued_prefill_graphs and bool(lengths)
        self.prefill_graphs_enabled = True
        """Use the captured prefill graphs (switchable, e.g. to measure both paths in one run)."""
        longest = max(lengths, default=1)
        self._pf_ids = torch.zeros(longest, dtype=torch.long, device=device)
        self._pf_meta = torch.zeros(3, dtype=torch.long, device=device)
        self._pfc_meta = torch.zeros(3, dtype=torch.long, device=device)  # slot, start, real ids
        self._pf_token = torch.zeros(1, dtype=torch.long, device=device)
        self._pf_host_ids = torch.zeros(longest, dtype=torch.long, pin_memory=pin)
        self._pf_host_meta = torch.zeros(3, dtype=torch.long, pin_memory=pin)
        self._pf_host_token = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        self._pf_event = torch.cuda.Event() if pin else None

    # --- per-slot state -----------------------------------------------------------------------------
    def set_sampling(self, slot: int, temperature: float, top_p: float, seed: int) -> None:
        self.temperature[slot] = temperature
        self.top_p[slot] = top_p
        self.seeds[slot] = seed

    def copy_prefix(self, source: int, target: int, length: int, first_logits: bool = False) -> None:
        """Keys and values of positions ``[0, length)`` of slot ``source`` into slot ``target`` (every
        layer; one strided device copy, ordered after every step already launched); with
        ``first_logits``, the source's first-token logits too."""
        if source == target or length <= 0:
            return
        kv = self.cache.kv  # [layers, 2, slots, kv_heads, capacity, head_dim]
        kv[:, :, target, :, :length].copy_(kv[:, :, source, :, :length], non_blocking=True)
        if first_logits:
            self.first_logits[target].copy_(self.first_logits[source], non_blocking=True)

    @torch.inference_mode()
    def sample_first(self, slot: int, counter: int) -> int:
        """The first reply token of ``slot`` drawn from its kept first-token logits (for the token at
        position ``counter``, as the prefill that made them would have)."""
        row = slice(slot, slot + 1)
        counter_t = torch.tensor([counter], dtype=torch.long, device=self.device)
        token = self.sample(self.first_logits[row], self.temperature[row], self.top_p[row], self.seeds[row], counter_t)
        return int(token.item())

    # --- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: Sequence[int], start: int, sample: bool) -> int | None:
        """Write ``ids`` (positions ``start ..``) into ``slot``; with ``sample``, draw and return
        the next token (the one at position ``start + len(ids)``). A whole prompt (``start`` 0,
        ``sample``) that fits a captured prefill graph replays that graph."""
        if sample and start == 0 and self.prefill_graphs_enabled:
            length = _cover(self.prefill_graph_lengths, len(ids))
            if length is not None and length in self.prefill_graphs:
                return self._replay_prefill(length, slot, ids)
        if start > 0 and self.prefill_graphs_enabled and self.continued_graphs:
            key = (_cover(self.prefill_graph_lengths, len(ids)), _cover(self.kv_lengths, start + len(ids)))
            if key in self.continued_graphs:
                token = self._replay_continued(key, slot, ids, start)
                return token if sample else None
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits = self.model.prefill(ids_t, self.cache, slot, start, self.rope)
        if not sample:
            return None
        self.first_logits[slot].copy_(logits[0])
        counter = torch.tensor([start + len(ids)], dtype=torch.long, device=self.device)
        token = self.sample(logits, self.temperature[slot : slot + 1], self.top_p[slot : slot + 1],
                            self.seeds[slot : slot + 1], counter)  # fmt: skip
        return int(token.item())

    def _prefill_step(self, length: int) -> None:
        """The body of a prefill graph: the padded prompt of ``length`` ids through the model into
        the slot ``_pf_meta[0]``, then the first token drawn from row ``_pf_meta[1]``."""
        slot, last, counter = self._pf_meta[0:1], self._pf_meta[1:2], self._pf_meta[2:3]
        logits = self.model.prefill_first_chunk(self._pf_ids[:length], last, slot, self.cache, self.rope)
        self.first_logits.index_copy_(0, slot, logits)
        token = self.sample(logits, self.temperature.index_select(0, slot), self.top_p.index_select(0, slot),
                            self.seeds.index_select(0, slot), counter)  # fmt: skip
        self._pf_token.copy_(token)

    def _continued_step(self, length: int, kv_len: int) -> None:
        """The body of a continuation prefill graph: ``_pf_ids[:length]`` at positions ``start ..``
        of slot ``_pfc_meta = (slot, start, n)``, then the token drawn for position ``start + n``."""
        meta = self._pfc_meta
        slot, counter = meta[0:1], meta[1:2] + meta[2:3]
        logits = self.model.prefill_continued_chunk(self._pf_ids[:length], meta, self.cache, self.rope, kv_len)
        self.first_logits.index_copy_(0, slot, logits)
        token = self.sample(logits, self.temperature.index_select(0, slot), self.top_p.index_select(0, slot),
                            self.seeds.index_select(0, slot), counter)  # fmt: skip
        self._pf_token.copy_(token)

    def _replay_continued(self, key: tuple[int, int], slot: int, ids: Sequence[int], start: int) -> int:
        length, n = key[0], len(ids)
        host_ids = self._pf_host_ids.numpy()
        host_ids[:n] = ids
        host_ids[n:length] = 0
        self._pf_host_meta.numpy()[:] = (slot, start, n)
        self._pf_ids[:length].copy_(self._pf_host_ids[:length], non_blocking=True)
        self._pfc_meta.copy_(self._pf_host_meta, non_blocking=True)
        self.continued_graphs[key].replay()
        return self._graph_token()

    def _graph_token(self) -> int:
        """The token a replayed prefill graph sampled, through the pinned host buffer (waits for that copy only)."""
        event = self._pf_event
        if event is None:  # graphs are captured only on CUDA, where the host buffers are pinned
            raise RuntimeError("a prefill graph was replayed without pinned host buffers")
        self._pf_host_token.copy_(self._pf_token, non_blocking=True)
        event.record()
        event.synchronize()
        return int(self._pf_host_token[0])

    def _replay_prefill(self, length: int, slot: int, ids: Sequence[int]) -> int:
        n = len(ids)
        host_ids = self._pf_host_ids.numpy()
        host_ids[:n] = ids
        host_ids[n:length] = 0  # padding (any valid id: causal attention keeps it out of the prompt)
        self._pf_host_meta.numpy()[:] = (slot, n - 1, n)
        self._pf_ids[:length].copy_(self._pf_host_ids[:length], non_blocking=True)
        self._pf_meta.copy_(self._pf_host_meta, non_blocking=True)
        self.prefill_graphs[length].replay()
        return self._graph_token()

    # --- decode -------------------------------------------------------------------------------------
    def _step(self, b: int, kv_len: int) -> None:
        """One decode step over rows ``:b``; it also leaves the inputs of the next step in place
        (each busy row's new token, its position + 1), so steps can be chained on the device."""
        positions, slots = self.positions[:b], self.row_slots[:b]
        logits = self.model.decode(self.tokens[:b], positions, self.cache, self.rope, kv_len, slots)
        token = self.sample(logits, self.temperature.index_select(0, slots), self.top_p.index_select(0, slots),
                            self.seeds.index_select(0, slots), positions + 1)  # fmt: skip
        self.next_tokens[:b].copy_(token)
        self.tokens[:b].copy_(token)
        positions.copy_(torch.where(positions >= self.scratch, positions, positions + 1))

    def shape_for(self, rows: Sequence[DecodeRow]) -> tuple[int, int, bool]:
        """(batch rows, attention length, replay a graph?) for a decode step over ``rows``."""
        longest = max(row.position for row in rows) + 1
        if self.cuda_graphs:
            b, kv_len = _cover(self.batch_sizes, len(rows)), _cover(self.kv_lengths, longest)
            if b is not None and kv_len is not None and (b, kv_len) in self.graphs:
                return b, kv_len, True
        return len(rows), longest, False

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> list[int]:
        """One new token for each row (same order), synchronously."""
        if not rows:
            return []
        return self.collect(self.launch(rows))

    @torch.inference_mode()
    def launch(self, rows: Sequence[DecodeRow], after: Launch | None = None) -> Launch:
        """Start a decode step and return at once (the device works on). With ``after`` (a step
        over the same rows, still running or not yet collected) the step continues from that
        step's outputs on the device: each row's input is the token it drew, one position further;
        ``rows`` then only give slots and the positions before ``after``. Row j of the batch is
        ``rows[j]`` (any slots, each at most once)."""
        if not rows:
            raise ValueError("a decode step needs at least one row")
        if len({row.slot for row in rows}) != len(rows) or len(rows) > self.max_slots:
            raise ValueError("a decode step takes each slot at most once")
        if after is not None:
            rows = [DecodeRow(row.slot, -1, row.position + 1) for row in after.rows]
        b, kv_len, replay = self.shape_for(rows)
        for row in rows:
            if not 0 <= row.position < self.max_seq_len:
                raise ValueError(f"slot {row.slot}: position {row.position} outside the cache")
        if after is None:
            tokens_np, positions_np, slots_np = self._tokens_np, self._positions_np, self._slots_np
            positions_np[:b] = self.scratch  # padding rows: slot 0's scratch position
            slots_np[:b] = 0
            for j, row in enumerate(rows):
                tokens_np[j], positions_np[j], slots_np[j] = row.token, row.position, row.slot
            self.tokens[:b].copy_(self._host_tokens[:b], non_blocking=True)
            self.positions[:b].copy_(self._host_positions[:b], non_blocking=True)
            self.row_slots[:b].copy_(self._host_slots[:b], non_blocking=True)
        elif after.b != b:
            raise ValueError("a chained step must cover the same slots")
        if replay:
            self.graphs[(b, kv_len)].replay()
        else:
            self._step(b, kv_len)
        self._parity ^= 1
        out, event = self._outputs[self._parity], self._events[self._parity]
        out[:b].copy_(self.next_tokens[:b], non_blocking=True)
        if event is not None:
            event.record()
        return Launch(tuple(rows), b, out, event)

    def collect(self, launch: Launch) -> list[int]:
        """Wait for a launched step; its new token for each row (same order)."""
        if launch.event is not None:
            launch.event.synchronize()
        values = launch.out.numpy()
        return [int(values[j]) for j in range(len(launch.rows))]

    # --- warm-up and graph capture ------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every code path once (compiles, kernel selection), then capture the decode graphs."""
        started = time.perf_counter()
        warm_ids = list(range(1, 9))
        self.prefill(0, warm_ids, 0, sample=True)
        self.prefill(0, warm_ids[:1], len(warm_ids), sample=True)
        self.positions.fill_(self.scratch)
        self._host_positions.fill_(self.scratch)
        self.row_slots.zero_()
        if not self.cuda_graphs:
            for b in sorted({1, 2, self.max_slots}):
                self._step(min(b, self.max_slots), self.kv_lengths[0])
            logger.info("warm-up (no CUDA graphs) took %.1f s", time.perf_counter() - started)
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in self.batch_sizes:
                for kv_len in self.kv_lengths:
                    self._step(b, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = self.graph_pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.batch_sizes):
            for kv_len in reversed(self.kv_lengths):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(b, kv_len)
                self.graphs[(b, kv_len)] = graph
        torch.cuda.synchronize(self.device)
        self._capture_prefill_graphs(pool)
        logger.info("warm-up: %d decode graphs (batch %s x attention length %s), prefill graphs %s, %d continuation "
                    "prefill graphs in %.1f s", len(self.graphs), self.batch_sizes, self.kv_lengths,
                    self.prefill_graph_lengths, len(self.continued_graphs), time.perf_counter() - started)  # fmt: skip

    def continued_graph_shapes(self) -> list[tuple[int, int]]:
        """(padded chunk length, attention length) pairs with a continuation graph: every prefill
        graph length below every attention length."""
        if not self._want_continued_graphs:
            return []
        return [(n, k) for n in self.prefill_graph_lengths for k in self.kv_lengths if n < k]

    def _capture_prefill_graphs(self, pool) -> None:
        if not self.prefill_graph_lengths:
            return
        self._pf_meta.copy_(torch.tensor([0, 0, 1]))  # slot 0 (free during warm-up), row 0
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for length in self.prefill_graph_lengths:
                self._prefill_step(length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for length in reversed(self.prefill_graph_lengths):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._prefill_step(length)
            self.prefill_graphs[length] = graph
        torch.cuda.synchronize(self.device)
        shapes = self.continued_graph_shapes()
        if not shapes:
            return
        # slot 0 is free during warm-up: one real id at position 1, the padding to its scratch position
        self._pfc_meta.copy_(torch.tensor([0, 1, 1]))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for length, kv_len in shapes:
                self._continued_step(length, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for length, kv_len in reversed(shapes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._continued_step(length, kv_len)
            self.continued_graphs[(length, kv_len)] = graph
        torch.cuda.synchronize(self.device)
