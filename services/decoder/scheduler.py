"""Who runs this step: admission by KV budget and slots, and the per-step token budget.

nano-vllm style bookkeeping with plain counters (no tensors): `waiting` (FIFO), `prefilling`
(admitted, prompt not finished) and `running` (decoding). A request is admitted, FIFO and
never skipping the head, when a slot is free and its whole KV (prompt + max_tokens) fits, so
nothing is ever preempted. Each step spends `max_num_batched_tokens`: one per decoding row,
the rest on prefill chunks, oldest admitted first.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Schedulable(Protocol):
    prompt_len: int
    reserved: int  # KV tokens this request may hold: prompt + max_tokens
    prefilled: int  # prompt tokens already in its KV
    slot: int


class KVBudget:
    """Tokens of KV in use, counted as the batch cache holds them: right-padded rows, so
    `rows x the longest reservation` (a long request costs every row its length)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0  # kept current by allocate/free, so other threads read a plain int
        self._held: dict[int, int] = {}  # slot -> reserved tokens

    def footprint(self, extra: int = 0) -> int:
        rows = len(self._held) + (1 if extra else 0)
        return rows * max(max(self._held.values(), default=0), extra)

    def can_allocate(self, tokens: int) -> bool:
        return self.footprint(tokens) <= self.capacity

    def allocate(self, slot: int, tokens: int) -> None:
        self._held[slot] = tokens
        self.used = self.footprint()

    def free(self, slot: int) -> None:
        self._held.pop(slot, None)
        self.used = self.footprint()


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_tokens: int,
        on_admit: Callable[[Schedulable], None] | None = None,
    ) -> None:
        """on_admit: called as a request is admitted; it may advance `prefilled` (prefix
        caching), so the first chunk starts after what is already cached."""
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise a full batch of decoding rows would leave no token for any prefill.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv = KVBudget(kv_tokens)
        self.on_admit = on_admit
        self.waiting: deque[Schedulable] = deque()
        self.prefilling: deque[Schedulable] = deque()
        self.running: dict[int, Schedulable] = {}  # slot -> sequence
        self._free_slots = list(range(max_num_seqs))  # a heap: the lowest slot first, which
        # keeps the batch's rows (0..highest slot) dense

    @property
    def num_admitted(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, seq: Schedulable) -> None:
        self.waiting.append(seq)

    def schedule(self, decoding: int) -> list[tuple[Schedulable, int]]:
        """Prefill chunks `(sequence, tokens)` for this step, given `decoding` rows."""
        budget = self.max_num_batched_tokens - decoding
        chunks: list[tuple[Schedulable, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                return chunks
            take = min(seq.prompt_len - seq.prefilled, budget)
            chunks.append((seq, take))
            budget -= take
        while budget > 0 and self.waiting and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.prefilling.append(seq)
            take = min(seq.prompt_len - seq.prefilled, budget)
            chunks.append((seq, take))
            budget -= take
        return chunks

    def _admit(self, seq: Schedulable) -> bool:
        if not self._free_slots or not self.kv.can_allocate(seq.reserved):
            return False
        seq.slot = heapq.heappop(self._free_slots)
        self.kv.allocate(seq.slot, seq.reserved)
        if self.on_admit is not None:
            self.on_admit(seq)
        return True

    def prefill_done(self, seq: Schedulable) -> None:
        self.prefilling.remove(seq)
        self.running[seq.slot] = seq

    def free(self, seq: Schedulable) -> None:
        """Forget a sequence wherever it is; its slot and KV are available at once."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            return
        self.kv.free(seq.slot)
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = -1
