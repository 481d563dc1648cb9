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

from typing import NamedTuple

import torch

from fne_fast.ops import SamplerOptions, merge_candidates, sample_negatives_with_options
from fne_fast.ops.checks import EMBEDDING_DTYPES, dtype_name
from fne_fast.sampling import distributed
from fne_fast.sampling.bank_arguments import fingerprint, guides_problem, sample_problem
from fne_fast.sampling.traffic import remote_rows, sharded_traffic

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
    """``size`` rows of ``dim`` features in ``dtype`` with an int64 id per row (-1 where never written), and with
    ``guide_dim`` > 0 a guide embedding of that many values per row (language guidance: the frozen text embedding
    of the row's caption, in ``dtype``), written with the row and read by ``sample`` when
    ``options.guide_threshold`` is set.

    Rows are written in ring order starting at row 0, so the global rows ``[0, filled)`` are the written ones
    until the first wrap-around, and all rows after it. With a process ``group`` of W > 1 ranks this process
    holds ``features`` and ``ids`` of its rows ``[row_begin, row_begin + size / W)`` only; ``size`` must divide by
    W, and every rank must build the bank with the same size, dim and dtype (checked, collectively).
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", group=None, guide_dim: int = 0):
        self.group = group
        self.world_size, self.rank = distributed.world_size(group), distributed.rank(group)
        self.device = torch.device(device)
        problem = None
        if size < 1 or dim < 1:
            problem = f"size and dim must be >= 1, got size={size}, dim={dim}"
        elif not (isinstance(guide_dim, int) and guide_dim >= 0):
            problem = f"guide_dim must be an integer >= 0, got {guide_dim!r}"
        elif dtype not in EMBEDDING_DTYPES:
            problem = f"dtype must be one of {', '.join(dtype_name(d) for d in EMBEDDING_DTYPES)}, got {dtype}"
        elif size % self.world_size:
            problem = f"size must divide by the number of processes {self.world_size}, got size={size}"
        if self.world_size > 1:
            table = distributed.agree("MemoryBank", [size, dim, distributed.dtype_code(dtype), guide_dim], problem,
                                      group, self.device)
            distributed.require_same("MemoryBank", table, ("size", "dim", "dtype", "guide_dim"),
                                     lambda line: (line[0], line[1], distributed.dtype_code_name(line[2]), line[3]))
        elif problem is not None:
            raise ValueError(problem)
        self.size, self.dim, self.dtype = size, dim, dtype
        self.shard_size = size // self.world_size
        self.row_begin = self.rank * self.shard_size
        self.features = torch.zeros(self.shard_size, dim, dtype=dtype, device=self.device)
        self.ids = torch.full((self.shard_size,), -1, dtype=torch.int64, device=self.device)
        self.guide_dim = guide_dim
        self.guides = torch.zeros(self.shard_size, guide_dim, dtype=dtype, device=self.device) if guide_dim else None
        self.pointer = 0  # the global ring's next row
        self.filled = 0  # global rows written so far, at most size

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for the bank (features, ids and guides)."""
        return self.features.nbytes + self.ids.nbytes + (self.guides.nbytes if self.guides is not None else 0)

    # --- writing -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor, *, guides: torch.Tensor | None = None,
                counts: list[int] | None = None) -> None:
        """Writes the global batch at the pointer, wrapping around; a batch larger than the bank keeps its last
        rows. Collective when sharded: ``features`` [B, dim], ``ids`` [B] and ``guides`` [B, guide_dim] (exactly
        when the bank has guides) are this rank's local batch;
        ``counts``, every rank's B where the caller knows them (a training loop does), skips the agreement and its
        host synchronisation: they must be the same list on every rank (not checked), and a bad argument then
        raises on its own rank alone."""
        problem = None
        if features.dim() != 2 or features.shape[1] != self.dim:
            problem = f"features must be [B, {self.dim}], got shape {tuple(features.shape)}"
        elif ids.shape != (features.shape[0],):
            problem = f"ids must be [B] = [{features.shape[0]}], got shape {tuple(ids.shape)}"
        else:
            problem = guides_problem("guides", guides, features.shape[0], self.guide_dim,
                                     "the bank was built with guide_dim")
        features = features.detach().to(device=self.device, dtype=self.dtype) if problem is None else features
        ids = ids.to(device=self.device, dtype=torch.int64) if problem is None else ids
        if problem is None and guides is not None:
            guides = guides.detach().to(device=self.device, dtype=self.dtype)
        if self.sharded and counts is not None:
            counts = distributed.check_counts("MemoryBank.enqueue", counts, self.group, features.shape[0], problem)
        elif self.sharded:
            table = distributed.agree("MemoryBank.enqueue", [features.shape[0]], problem, self.group, self.device)
            counts = [line[0] for line in table]
        if self.sharded:
            features = distributed.all_gather_rows(features, counts, self.group, "ring")
            ids = distributed.all_gather_rows(ids, counts, self.group, "ring")
            if guides is not None:
                guides = distributed.all_gather_rows(guides, counts, self.group, "ring")
        elif problem is not None:
            raise ValueError(problem)
        self._write(features, ids, guides)

    def next_positions(self, rows: int) -> tuple[int, torch.Tensor]:
        """Where the next ``enqueue`` of a global batch of ``rows`` rows writes them: the first row it keeps (a
        batch longer than the ring keeps its last ``size``) and the global ring positions of the rows from there."""
        skipped = max(0, rows - self.size)
        return skipped, (self.pointer + skipped + torch.arange(rows - skipped)) % self.size

    def _write(self, features: torch.Tensor, ids: torch.Tensor, guides: torch.Tensor | None) -> None:
        """Writes the global batch's rows that fall into this process's rows, as at most two slices (the ring
        segment before and after the wrap-around), each cut to this process's range."""
        rows = features.shape[0]
        if rows > self.size:
            # Only the last `size` rows survive a write longer than the ring.
            skipped = rows - self.size
            self.pointer = (self.pointer + skipped) % self.size
            features, ids, rows = features[skipped:], ids[skipped:], self.size
            guides = guides[skipped:] if guides is not None else None
        first_part = min(rows, self.size - self.pointer)
        for ring_begin, batch_begin, length in ((self.pointer, 0, first_part), (0, first_part, rows - first_part)):
            begin = max(ring_begin, self.row_begin)
            end = min(ring_begin + length, self.row_begin + self.shard_size)
            if begin < end:
                source = slice(batch_begin + begin - ring_begin, batch_begin + end - ring_begin)
                self.features[begin - self.row_begin:end - self.row_begin] = features[source]
                self.ids[begin - self.row_begin:end - self.row_begin] = ids[source]
                if guides is not None:
                    self.guides[begin - self.row_begin:end - self.row_begin] = guides[source]
        self.pointer = (self.pointer + rows) % self.size
        self.filled = min(self.size, self.filled + rows)

    # --- sampling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, anchors: torch.Tensor, positive_sim: torch.Tensor, anchor_ids: torch.Tensor,
               stats: torch.Tensor, options: SamplerOptions = _DEFAULTS, *, seed: int = 0, step: int = 0,
               backend: str = "auto", check_finite: bool = True, counts: list[int] | None = None,
               fn_thresholds: torch.Tensor | None = None, count_above: bool = False,
               anchor_guides: torch.Tensor | None = None) -> BankSample:
        """``fne_fast.sample_negatives`` of ``anchors`` [B, D] over the whole bank, with the chosen rows.

        Args:
            anchors: [B, dim] floating point, cast to the bank's dtype for the draw (it is not differentiated).
            positive_sim: [B] float32; anchor_ids: [B] int64; stats: the op's [5] float32 statistics.
            options: the sampler's options; seed, step, backend, check_finite: the op's (the bank sets ``filled``
                and the offsets).
            fn_thresholds: optional [B] float32 per-anchor thresholds, the op's; count_above: also count each
                anchor's candidates above its threshold, over the whole bank (the shards' counts added).
            anchor_guides: [B, guide_dim] the anchors' guide embeddings, exactly when ``options.guide_threshold``
                is set (language guidance against the bank's guides; the bank must have them).

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
        problem = sample_problem(anchors, positive_sim, anchor_ids, stats, self.dim, options, seed, step, backend,
                                 fn_thresholds, count_above)
        if problem is None and isinstance(options, SamplerOptions):
            problem = self._anchor_guides_problem(anchor_guides, anchors.shape[0], options)
        guided = problem is None and anchor_guides is not None
        call = dict(seed=seed, step=step, backend=backend, check_finite=check_finite, count_above=count_above)
        if not self.sharded:
            if problem is not None:
                raise ValueError(problem)
            index, sim, valid, key, *above = sample_negatives_with_options(
                anchors.to(self.dtype), self.features, positive_sim, anchor_ids, self.ids, stats, options,
                fn_thresholds=fn_thresholds, filled=self.filled,
                **self._guide_inputs(anchor_guides if guided else None), **call)
            rows = torch.where(valid.unsqueeze(-1), self.features[index.clamp(min=0)], 0)
            chosen_ids = torch.where(valid, self.ids[index.clamp(min=0)], -1)
            return BankSample(index, sim, valid, key, rows, chosen_ids, above[0] if count_above else None)

        if counts is not None:
            counts = distributed.check_counts("MemoryBank.sample", counts, self.group, anchors.shape[0], problem)
        else:
            metadata = [0] * 7 if problem is not None else [anchors.shape[0],
                                                            *fingerprint(options, stats, call, fn_thresholds)]
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
        all_guides = (distributed.all_gather_rows(anchor_guides.to(self.dtype), counts, self.group, "anchors")
                      if guided else None)
        local_filled = min(max(self.filled - self.row_begin, 0), self.shard_size)
        shard_index, shard_sim, _, shard_key, *shard_above = sample_negatives_with_options(
            all_anchors, self.features, all_positive_sim, all_ids.contiguous(), self.ids, stats, options,
            fn_thresholds=all_thresholds, row_offset=0, col_offset=self.row_begin, filled=local_filled,
            **self._guide_inputs(all_guides), **call)
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

    def _anchor_guides_problem(self, anchor_guides, rows: int, options: SamplerOptions) -> str | None:
        if options.guide_threshold is None:
            return None if anchor_guides is None else "anchor_guides are read only with options.guide_threshold"
        if self.guides is None:
            return "options.guide_threshold needs a bank built with guide_dim > 0 (it holds no guides)"
        return guides_problem("anchor_guides", anchor_guides, rows, self.guide_dim, "options.guide_threshold is set")

    def _guide_inputs(self, anchor_guides: torch.Tensor | None) -> dict:
        """The op's guide arguments: the anchors' guides in the bank's dtype (as the anchors are) and this
        process's rows' guides."""
        if anchor_guides is None:
            return {}
        return dict(anchor_guides=anchor_guides.to(self.dtype), bank_guides=self.guides)

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
            return {**{name: tensor.clone() for name, tensor in self._row_tensors().items()}, **state}
        parts = {name: distributed.gather_to_first(tensor, self.group, "checkpoint")
                 for name, tensor in self._row_tensors().items()}
        if parts["ids"] is None:
            return None
        return {**{name: torch.cat(tensors) for name, tensors in parts.items()}, **state}

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        """This process's per-row tensors by name: features, ids, and guides where the bank has them."""
        rows = {"features": self.features, "ids": self.ids}
        if self.guides is not None:
            rows["guides"] = self.guides
        return rows

    def shard_state(self) -> dict:
        """This process's rows (``rows``: their global range) without the ring counters: what a rank writes into
        its own checkpoint file (``fne_fast.runs.shards``). Not collective."""
        return {**self._row_tensors(), "rows": [self.row_begin, self.row_begin + self.shard_size]}

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
        if (self.guides is not None) != ("guides" in state):
            raise ValueError("bank state " + ("holds no guides, and this bank has" if self.guides is not None else
                                              "holds guides, and this bank has none") +
                             " (language guidance must be on or off in both)")
        if self.guides is not None and tuple(state["guides"].shape) != (expected[0], self.guide_dim):
            raise ValueError(f"bank state's guides have shape {tuple(state['guides'].shape)}, this bank's are "
                             f"{(expected[0], self.guide_dim)}")
        self.features = state["features"][rows].to(device=self.device, dtype=self.dtype).clone()
        self.ids = state["ids"][rows].to(self.device).clone()
        if self.guides is not None:
            self.guides = state["guides"][rows].to(device=self.device, dtype=self.dtype).clone()
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.int32).to(torch.int64)


def _bits_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _empty_sample(k: int, dim: int, dtype, device, count_above: bool) -> BankSample:
    return BankSample(torch.empty(0, k, dtype=torch.int64, device=device), torch.empty(0, k, device=device),
                      torch.empty(0, k, dtype=torch.bool, device=device), torch.empty(0, k, device=device),
                      torch.empty(0, k, dim, dtype=dtype, device=device),
                      torch.empty(0, k, dtype=torch.int64, device=device),
                      torch.empty(0, dtype=torch.int64, device=device) if count_above else None)
