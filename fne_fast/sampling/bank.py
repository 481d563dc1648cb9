"""MemoryBank: a ring buffer of momentum features with identity ids, one process's or sharded across a process
group (docs/DESIGN.md §3, §3.1).

The ring is global, so the bank's contents do not depend on the number of processes W: each step's global batch
(the ranks' local batches in rank order) is written at the global pointer, and rank r stores the rows of the
ring in ``[r·n, (r+1)·n)``, ``n = size / W``. The pointer and the fill count are plain host integers on every
rank: they are deterministic (the number of rows enqueued so far), so keeping them costs no synchronisation.

``sample`` runs the fused op on every rank's shard for all the global batch's anchors (with the global anchor row
as ``row_offset`` and the shard's first row as ``col_offset``), gathers the ranks' candidates, merges them exactly
with ``merge_candidates`` and fetches the chosen rows from their owners: the same indices as one call over the
whole bank. ``enqueue`` and ``sample`` are collective when sharded: every rank calls them, in the same order, with
its own local batch (of any size, 0 included).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from fne_fast.ops import BACKENDS, SamplerOptions, merge_candidates, sample_negatives_with_options
from fne_fast.ops.checks import EMBEDDING_DTYPES, dtype_name
from fne_fast.sampling import distributed

__all__ = ["MemoryBank", "BankSample", "sharded_traffic", "remote_rows"]

_DEFAULTS = SamplerOptions()


class BankSample(NamedTuple):
    """What ``MemoryBank.sample`` returns: the op's four outputs for the anchors, the chosen rows and ids, and the
    exceedance counts when asked."""

    index: torch.Tensor  # [B, k] int64 global bank indices, -1 where invalid
    sim: torch.Tensor  # [B, k] float32 similarity of each chosen row
    valid: torch.Tensor  # [B, k] bool
    key: torch.Tensor  # [B, k] float32 race key (-inf for fallbacks and invalid slots)
    rows: torch.Tensor  # [B, k, dim] the chosen rows in the bank's dtype, zeros where invalid
    ids: torch.Tensor  # [B, k] int64 identities of the chosen rows, -1 where invalid
    above: torch.Tensor | None = None  # [B] int64: candidates above fn_thresholds (count_above), over the whole bank


class MemoryBank:
    """``size`` rows of ``dim`` features in ``dtype`` with an int64 id per row (-1 where never written).

    Rows are written in ring order starting at row 0, so the global rows ``[0, filled)`` are the written ones
    until the first wrap-around, and all rows after it. With a process ``group`` of W > 1 ranks this process
    holds ``features`` and ``ids`` of its rows ``[row_begin, row_begin + size / W)`` only; ``size`` must divide by
    W, and every rank must build the bank with the same size, dim and dtype (checked, collectively).
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", group=None):
        self.group = group
        self.world_size, self.rank = distributed.world_size(group), distributed.rank(group)
        self.device = torch.device(device)
        problem = None
        if size < 1 or dim < 1:
            problem = f"size and dim must be >= 1, got size={size}, dim={dim}"
        elif dtype not in EMBEDDING_DTYPES:
            problem = f"dtype must be one of {', '.join(dtype_name(d) for d in EMBEDDING_DTYPES)}, got {dtype}"
        elif size % self.world_size:
            problem = f"size must divide by the number of processes {self.world_size}, got size={size}"
        if self.world_size > 1:
            table = distributed.agree("MemoryBank", [size, dim, distributed.dtype_code(dtype)], problem, group,
                                      self.device)
            distributed.require_same("MemoryBank", table, ("size", "dim", "dtype"),
                                     lambda line: (line[0], line[1], distributed.dtype_code_name(line[2])))
        elif problem is not None:
            raise ValueError(problem)
        self.size, self.dim, self.dtype = size, dim, dtype
        self.shard_size = size // self.world_size
        self.row_begin = self.rank * self.shard_size
        self.features = torch.zeros(self.shard_size, dim, dtype=dtype, device=self.device)
        self.ids = torch.full((self.shard_size,), -1, dtype=torch.int64, device=self.device)
        self.pointer = 0  # the global ring's next row
        self.filled = 0  # global rows written so far, at most size

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for the bank (features and ids)."""
        return self.features.nbytes + self.ids.nbytes

    # --- writing -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor, *, counts: list[int] | None = None) -> None:
        """Writes the global batch at the pointer, wrapping around; a batch larger than the bank keeps its last
        rows. Collective when sharded: ``features`` [B, dim] and ``ids`` [B] are this rank's local batch;
        ``counts``, every rank's B where the caller knows them (a training loop does), skips the agreement and its
        host synchronisation: they must be the same list on every rank (not checked), and a bad argument then
        raises on its own rank alone."""
        problem = None
        if features.dim() != 2 or features.shape[1] != self.dim:
            problem = f"features must be [B, {self.dim}], got shape {tuple(features.shape)}"
        elif ids.shape != (features.shape[0],):
            problem = f"ids must be [B] = [{features.shape[0]}], got shape {tuple(ids.shape)}"
        features = features.detach().to(device=self.device, dtype=self.dtype) if problem is None else features
        ids = ids.to(device=self.device, dtype=torch.int64) if problem is None else ids
        if self.sharded and counts is not None:
            counts = distributed.check_counts("MemoryBank.enqueue", counts, self.group, features.shape[0], problem)
        elif self.sharded:
            table = distributed.agree("MemoryBank.enqueue", [features.shape[0]], problem, self.group, self.device)
            counts = [line[0] for line in table]
        if self.sharded:
            features = distributed.all_gather_rows(features, counts, self.group, "ring")
            ids = distributed.all_gather_rows(ids, counts, self.group, "ring")
        elif problem is not None:
            raise ValueError(problem)
        self._write(features, ids)

    def next_positions(self, rows: int) -> tuple[int, torch.Tensor]:
        """Where the next ``enqueue`` of a global batch of ``rows`` rows writes them: the first row it keeps (a
        batch longer than the ring keeps its last ``size``) and the global ring positions of the rows from there."""
        skipped = max(0, rows - self.size)
        return skipped, (self.pointer + skipped + torch.arange(rows - skipped)) % self.size

    def _write(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        """Writes the global batch's rows that fall into this process's rows, as at most two slices (the ring
        segment before and after the wrap-around), each cut to this process's range."""
        rows = features.shape[0]
        if rows > self.size:
            # Only the last `size` rows survive a write longer than the ring.
            skipped = rows - self.size
            self.pointer = (self.pointer + skipped) % self.size
            features, ids, rows = features[skipped:], ids[skipped:], self.size
        first_part = min(rows, self.size - self.pointer)
        for ring_begin, batch_begin, length in ((self.pointer, 0, first_part), (0, first_part, rows - first_part)):
            begin = max(ring_begin, self.row_begin)
            end = min(ring_begin + length, self.row_begin + self.shard_size)
            if begin < end:
                source = slice(batch_begin + begin - ring_begin, batch_begin + end - ring_begin)
                self.features[begin - self.row_begin:end - self.row_begin] = features[source]
                self.ids[begin - self.row_begin:end - self.row_begin] = ids[source]
        self.pointer = (self.pointer + rows) % self.size
        self.filled = min(self.size, self.filled + rows)

    # --- sampling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, anchors: torch.Tensor, positive_sim: torch.Tensor, anchor_ids: torch.Tensor,
               stats: torch.Tensor, options: SamplerOptions = _DEFAULTS, *, seed: int = 0, step: int = 0,
               backend: str = "auto", check_finite: bool = True, counts: list[int] | None = None,
               fn_thresholds: torch.Tensor | None = None, count_above: bool = False) -> BankSample:
        """``fne_fast.sample_negatives`` of ``anchors`` [B, D] over the whole bank, with the chosen rows.

        Args:
            anchors: [B, dim] floating point, cast to the bank's dtype for the draw (it is not differentiated).
            positive_sim: [B] float32; anchor_ids: [B] int64; stats: the op's [5] float32 statistics.
            options: the sampler's options; seed, step, backend, check_finite: the op's (the bank sets ``filled``
                and the offsets).
            fn_thresholds: optional [B] float32 per-anchor thresholds, the op's; count_above: also count each
                anchor's candidates above its threshold, over the whole bank (the shards' counts added).

        Returns:
            A ``BankSample``: ``index`` [B, k] global bank indices, ``sim``, ``valid`` and ``key`` as the op's, and
            ``rows`` [B, k, dim] (the chosen rows in the bank's dtype, zeros where invalid) and ``ids`` [B, k] (their
            identities, -1 where invalid), and with ``count_above`` ``above`` [B] int64.

        Collective when sharded: each rank passes its local anchors (any number, 0 included) and the same options,
        counters and ``stats``; the anchors' global rows (ranks in order) are the op's rows, so the result is, index
        for index, one call over the whole bank with the gathered anchors. ``counts``, every rank's B where the
        caller knows them and guarantees the rest alike (a training loop does), skips the agreement of sizes,
        options and ``stats`` and its host synchronisations: the same list on every rank (not checked); a bad
        argument then raises on its own rank alone.
        """
        problem = _sample_problem(anchors, positive_sim, anchor_ids, stats, self.dim, options, seed, step, backend,
                                  fn_thresholds, count_above)
        call = dict(seed=seed, step=step, backend=backend, check_finite=check_finite, count_above=count_above)
        if not self.sharded:
            if problem is not None:
                raise ValueError(problem)
            index, sim, valid, key, *above = sample_negatives_with_options(
                anchors.to(self.dtype), self.features, positive_sim, anchor_ids, self.ids, stats, options,
                fn_thresholds=fn_thresholds, filled=self.filled, **call)
            rows = torch.where(valid.unsqueeze(-1), self.features[index.clamp(min=0)], 0)
            chosen_ids = torch.where(valid, self.ids[index.clamp(min=0)], -1)
            return BankSample(index, sim, valid, key, rows, chosen_ids, above[0] if count_above else None)

        if counts is not None:
            counts = distributed.check_counts("MemoryBank.sample", counts, self.group, anchors.shape[0], problem)
        else:
            metadata = [0] * 7 if problem is not None else [anchors.shape[0],
                                                            *_fingerprint(options, stats, call, fn_thresholds)]
            table = distributed.agree("MemoryBank.sample", metadata, problem, self.group, self.device)
            distributed.require_same("MemoryBank.sample", [line[1:] for line in table],
                                     ("k", "mode", "seed", "step", "other options", "stats"))
            counts = [line[0] for line in table]
        if sum(counts) == 0:
            return _empty_sample(options.k, self.dim, self.dtype, self.device, count_above)

        # Every rank scores all the global batch's anchors against its shard, the anchors in the bank's dtype as one
        # process passes them, so that every rank's call runs one process's GEMM: a bf16 bank's anchors sent as
        # float32 took the op's float32-anchor path, whose sums round otherwise, and flipped candidates at the
        # cut-down and at ties. The ids and the float32 bits of the positive similarities (and thresholds) travel
        # as int64 columns.
        all_anchors = distributed.all_gather_rows(anchors.to(self.dtype), counts, self.group, "anchors")
        scalars = [anchor_ids.to(torch.int64), _float_bits(positive_sim)]
        if fn_thresholds is not None:
            scalars.append(_float_bits(fn_thresholds))
        all_scalars = distributed.all_gather_rows(torch.stack(scalars, dim=1), counts, self.group, "anchors")
        all_ids, all_positive_sim = all_scalars[:, 0], _bits_float(all_scalars[:, 1])
        all_thresholds = _bits_float(all_scalars[:, 2]) if fn_thresholds is not None else None
        local_filled = min(max(self.filled - self.row_begin, 0), self.shard_size)
        shard_index, shard_sim, _, shard_key, *shard_above = sample_negatives_with_options(
            all_anchors, self.features, all_positive_sim, all_ids.contiguous(), self.ids, stats, options,
            fn_thresholds=all_thresholds, row_offset=0, col_offset=self.row_begin, filled=local_filled, **call)
        above = None
        if count_above:
            # The shards' counts add up; this rank keeps its anchors'.
            offset = sum(counts[:self.rank])
            above = distributed.all_reduce(shard_above[0], self.group, "counts")[offset:offset + counts[self.rank]]
        # ... then each anchor's candidates go to the rank that owns the anchor only, which merges them and fetches
        # the winning rows from the ranks that hold them.
        index, sim, valid, key = merge_candidates(*self._candidates_of_my_anchors(shard_index, shard_sim, shard_key,
                                                                                  counts), k=options.k)
        rows, chosen_ids = self._fetch_rows(index, valid)
        return BankSample(index, sim, valid, key, rows, chosen_ids, above)

    def _candidates_of_my_anchors(self, index, sim, key, counts: list[int]):
        """This rank's anchors' candidates from every rank's shard, side by side [B, W·k] in rank order: each rank
        sends the candidates of each anchor (16 bytes: index, sim, key; an invalid slot is index -1) to the
        anchor's rank only, so a rank sends (G − B)·k candidates however large W is."""
        k, mine = index.shape[1], counts[self.rank]
        packed = torch.cat([index.unsqueeze(-1), torch.stack([sim, key], dim=-1).view(torch.int64)], dim=-1)
        received = distributed.all_to_all_rows(packed, counts, [mine] * self.world_size, self.group, "candidates")
        received = received.view(self.world_size, mine, k, 2).transpose(0, 1).reshape(mine, self.world_size * k, 2)
        all_index = received[..., 0]
        # (cloned to fresh strides: an empty slice keeps its parent's, which a dtype view refuses)
        sim_and_key = received[..., 1].clone(memory_format=torch.contiguous_format).view(torch.float32)
        sim_and_key = sim_and_key.view(mine, self.world_size * k, 2)
        return all_index, sim_and_key[..., 0], all_index >= 0, sim_and_key[..., 1]

    def _fetch_rows(self, index, valid):
        """The chosen rows [B, k, dim] and ids [B, k] of this rank's anchors: each chosen global row is asked of the
        rank whose shard holds it (8 bytes a request), which answers with the row and its id packed as bytes;
        both exchanges are all_to_alls sized by one exchange of counts."""
        wanted = index[valid]
        owner = torch.div(wanted, self.shard_size, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts, receive_counts = distributed.exchange_counts(
            torch.bincount(owner, minlength=self.world_size), self.group)
        asked = distributed.all_to_all_rows(wanted[order], send_counts, receive_counts, self.group, "requests")
        asked -= self.row_begin
        answer = torch.cat([self.features[asked].view(torch.uint8), self.ids[asked].unsqueeze(1).view(torch.uint8)],
                           dim=1)
        answered = distributed.all_to_all_rows(answer, receive_counts, send_counts, self.group, "rows")
        row_bytes = self.dim * self.features.element_size()
        features = self.features.new_empty((wanted.shape[0], self.dim))
        features[order] = answered[:, :row_bytes].contiguous().view(self.dtype)
        ids = torch.empty_like(wanted)
        ids[order] = answered[:, row_bytes:].contiguous().view(torch.int64).squeeze(1)
        rows = self.features.new_zeros((*index.shape, self.dim))
        rows[valid] = features
        chosen_ids = torch.full_like(index, -1)
        chosen_ids[valid] = ids
        return rows, chosen_ids

    # --- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """The whole bank's state, which does not depend on W (load it with any number of processes).
        Collective when sharded: the shards are gathered to rank 0, which returns the state; the other ranks
        return None."""
        state = {"pointer": self.pointer, "filled": self.filled}
        if not self.sharded:
            return {"features": self.features.clone(), "ids": self.ids.clone(), **state}
        features = distributed.gather_to_first(self.features, self.group, "checkpoint")
        ids = distributed.gather_to_first(self.ids, self.group, "checkpoint")
        return None if features is None else {"features": torch.cat(features), "ids": torch.cat(ids), **state}

    def shard_state(self) -> dict:
        """This process's rows (``rows``: their global range) without the ring counters: what a rank writes into
        its own checkpoint file (``fne_fast.runs.shards``). Not collective."""
        return {"features": self.features, "ids": self.ids, "rows": [self.row_begin, self.row_begin + self.shard_size]}

    def load_state_dict(self, state: dict) -> None:
        """Loads a whole bank's state (from ``state_dict`` with any number of processes), of which this process
        keeps its rows, or this process's rows alone (``row_begin`` given, as ``fne_fast.runs.shards`` reads
        them)."""
        rows = slice(self.row_begin, self.row_begin + self.shard_size)
        expected = (self.size, self.dim) if "row_begin" not in state else (self.shard_size, self.dim)
        if tuple(state["features"].shape) != expected:
            raise ValueError(f"bank state has shape {tuple(state['features'].shape)}, this bank's "
                             f"{'rows are' if 'row_begin' in state else 'is'} {expected}")
        if "row_begin" in state:
            if int(state["row_begin"]) != self.row_begin:
                raise ValueError(f"bank state holds rows from {int(state['row_begin'])}, this process's start at "
                                 f"{self.row_begin}")
            rows = slice(0, self.shard_size)
        self.features = state["features"][rows].to(device=self.device, dtype=self.dtype).clone()
        self.ids = state["ids"][rows].to(self.device).clone()
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])


def sharded_traffic(counts: list[int], rank: int, k: int, dim: int, element_bytes: int, *, rows_fetched: int,
                    rows_served: int) -> dict[str, int]:
    """The bytes rank ``rank`` of a sharded bank sends for one ``enqueue`` and one ``sample`` of a step, by kind
    (docs/DESIGN.md §3.1; the small agreement rows and row counts aside). ``counts``: every rank's local batch (the
    anchors and the ring are padded to the largest); ``k``: negatives per anchor; ``element_bytes``: the bank's
    dtype's; ``rows_fetched``: chosen rows of this rank's anchors that other ranks hold; ``rows_served``: rows of
    this rank's shard chosen for other ranks' anchors (each about B·k·(W − 1)/W when the chosen rows spread
    evenly over the shards)."""
    others, largest, row_bytes = len(counts) - 1, max(counts), dim * element_bytes
    return {"anchors": others * largest * (row_bytes + 16), "candidates": 16 * k * (sum(counts) - counts[rank]),
            "requests": 8 * rows_fetched, "rows": (row_bytes + 8) * rows_served,
            "ring": others * largest * (row_bytes + 8)}


def remote_rows(counts: list[int], index: torch.Tensor, valid: torch.Tensor,
                shard_size: int) -> tuple[list[int], list[int]]:
    """``sharded_traffic``'s data-dependent terms for every rank, from a step's chosen rows ``index``, ``valid``
    [G, k] of the global batch (the ranks' anchors in rank order): (chosen rows of each rank's anchors that
    other ranks hold, rows of each rank's shard that other ranks' anchors chose)."""
    owner = torch.where(valid, index, 0) // shard_size
    anchor_rank = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:, None].expand_as(index)
    remote = valid & (owner != anchor_rank)
    return (torch.bincount(anchor_rank[remote], minlength=len(counts)).tolist(),
            torch.bincount(owner[remote], minlength=len(counts)).tolist())


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.int32).to(torch.int64)


def _bits_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _sample_problem(anchors, positive_sim, anchor_ids, stats, dim: int, options, seed, step, backend,
                    fn_thresholds=None, count_above=False) -> str | None:
    """What is wrong with ``sample``'s arguments on this rank (None when nothing is), found before any
    collective; the op checks the rest where it runs."""
    if not isinstance(options, SamplerOptions):
        return f"options must be a SamplerOptions, got {type(options).__name__}"
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    if not isinstance(seed, int) or not isinstance(step, int):
        return "seed and step must be integers"
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or anchors.shape[1] != dim:
        return f"anchors must be a [B, {dim}] tensor, got {getattr(anchors, 'shape', type(anchors).__name__)}"
    if not anchors.is_floating_point():
        return f"anchors must be floating point, got {anchors.dtype}"
    rows = anchors.shape[0]
    for name, tensor, dtype in (("positive_sim", positive_sim, torch.float32), ("anchor_ids", anchor_ids,
                                                                                torch.int64)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (rows,) or tensor.dtype != dtype:
            return (f"{name} must be a [{rows}] {str(dtype).replace('torch.', '')} tensor, got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)} {getattr(tensor, 'dtype', '')}")
    if not isinstance(stats, torch.Tensor) or stats.shape != (5,) or stats.dtype != torch.float32:
        return "stats must be a [5] float32 tensor"
    if fn_thresholds is not None and (not isinstance(fn_thresholds, torch.Tensor) or fn_thresholds.shape != (rows,)
                                      or fn_thresholds.dtype != torch.float32):
        return (f"fn_thresholds must be a [{rows}] float32 tensor, got "
                f"{getattr(fn_thresholds, 'shape', type(fn_thresholds).__name__)} "
                f"{getattr(fn_thresholds, 'dtype', '')}")
    if count_above and fn_thresholds is None:
        return "count_above counts the candidates above fn_thresholds, which were not given"
    return None


def _fingerprint(options: SamplerOptions, stats: torch.Tensor, call: dict, fn_thresholds) -> list[int]:
    """Integers that equal on every rank exactly when the ranks pass the same options, counters and statistics
    (and all give thresholds, or none; their values are each anchor's own)."""
    seed = call["seed"] % 2**64
    rest = repr((options.as_kwargs(), call["backend"], call["check_finite"], call["count_above"],
                 fn_thresholds is None))
    stats_bits = zlib.crc32(stats.detach().float().cpu().numpy().tobytes())
    return [options.k, zlib.crc32(options.mode.encode()), seed - 2**64 if seed >= 2**63 else seed,
            call["step"], zlib.crc32(rest.encode()), stats_bits]


def _empty_sample(k: int, dim: int, dtype, device, count_above: bool) -> BankSample:
    return BankSample(torch.empty(0, k, dtype=torch.int64, device=device), torch.empty(0, k, device=device),
                      torch.empty(0, k, dtype=torch.bool, device=device), torch.empty(0, k, device=device),
                      torch.empty(0, k, dim, dtype=dtype, device=device),
                      torch.empty(0, k, dtype=torch.int64, device=device),
                      torch.empty(0, dtype=torch.int64, device=device) if count_above else None)
