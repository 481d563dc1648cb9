"""torch.distributed for the sharded bank and for training under torchrun (docs/DESIGN.md §3.1).

* Process groups: ``process_group_from_environment`` initialises the default group from torchrun's environment
  (gloo on CPU, NCCL on CUDA: the code is the same, only the backend name and the tensors' device differ). The
  default group waits long (``PATIENT_TIMEOUT``): it makes the first contact, when a rank may still be starting,
  and serves as ``patient_group`` for rank 0's long work (evaluating, loading); the group it yields for the steps
  gives up on a stalled peer after ``TIMEOUT`` (60 s, or ``FNE_FAST_COLLECTIVE_TIMEOUT`` seconds).
* Collectives: every exchange is one of torch.distributed's (``all_gather_single``, ``all_to_all_single``,
  ``gather``, ``all_reduce``, ``broadcast_object_list``). Each records the bytes this rank sends, computed from the
  tensors' sizes, while ``count_traffic()`` is active, and turns a failure into a ``PeerFailure`` that says what
  failed and why that usually happens (another rank raised, exited or stalled past the timeout).
* Agreement: ``agree`` exchanges a small metadata row and each rank's local problem (an argument error found by
  its own checks) before any data collective, so a bad argument on one rank is the same clear ``ValueError`` on
  every rank instead of a collective that waits forever for a rank that has left.
* The global batch: ``gather_batch`` gathers a step's online embeddings and ids from every rank, the local rows
  keeping their gradients (a plain all_gather would drop them: open_clip's pitfall).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["TIMEOUT", "PATIENT_TIMEOUT", "PeerFailure", "world_size", "rank", "process_group_from_environment",
           "patient_group", "count_traffic", "agree", "require_same", "all_gather_rows", "all_to_all_rows",
           "exchange_counts",
           "check_counts", "gather_to_first", "all_reduce", "broadcast_from_first", "first_rank_first", "GlobalBatch",
           "gather_batch", "dtype_code", "dtype_code_name"]

# A collective of the training steps that waits longer than this for a peer raises.
TIMEOUT = timedelta(seconds=float(os.environ.get("FNE_FAST_COLLECTIVE_TIMEOUT", "60")))
# Waits on rank 0 alone (evaluation, writing the checkpoint, encoding the features on a cold cache) can be long;
# a rank that dies instead closes its connections, which ends these waits at once.
PATIENT_TIMEOUT = timedelta(minutes=30)
# Room for one rank's problem text in the agreement row (longer messages are cut).
_MESSAGE_BYTES = 240


class PeerFailure(RuntimeError):
    """A collective failed: another rank raised, exited, or did not reach it within the timeout."""


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@contextlib.contextmanager
def process_group_from_environment(device: str):
    """Under torchrun (``WORLD_SIZE`` > 1) initialises the default process group from the environment and
    yields it, destroying it on exit; otherwise yields None. On CUDA each process takes the GPU of its
    ``LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    on_cuda = torch.device(device).type == "cuda"
    device_id = None
    if on_cuda:
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)
    # device_id binds NCCL to the process's GPU and connects it now, not at the first collective.
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=PATIENT_TIMEOUT, device_id=device_id)
    try:
        _test_hook_first_contact()
        _connect(dist.group.WORLD)  # the first contact: waits for every rank, however late one starts
        steps = dist.new_group(timeout=TIMEOUT)
        _connect(steps)
        _patient_groups[steps] = dist.group.WORLD
        yield steps
    finally:
        _patient_groups.clear()
        dist.destroy_process_group()


def _test_hook_first_contact() -> None:
    """Tests only: ``FNE_FAST_TEST_HOOK=first-contact:<rank>:sleep=<seconds>`` makes that rank start late."""
    point, _, rest = os.environ.get("FNE_FAST_TEST_HOOK", "").partition(":")
    if point == "first-contact":
        late_rank, _, action = rest.partition(":")
        if int(late_rank) == dist.get_rank() and action.startswith("sleep="):
            time.sleep(float(action[len("sleep="):]))


def _connect(group) -> None:
    """One small collective right after a group is made, while every rank is at the same point. Gloo connects
    when a group is made; NCCL connects at its first collective, and a first collective that comes late (rank 0
    encoding a cold feature cache while the others wait) would wait for rank 0's connection details past the
    store's timeout: connecting at once keeps both backends on one code path."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    with _collective("connecting the process group", group):
        dist.all_reduce(torch.zeros(1, device=device), group=group)


_patient_groups: dict = {}


def patient_group(group):
    """A group of ``group``'s ranks whose collectives wait up to ``PATIENT_TIMEOUT`` (None when unsharded); made
    once per group (making it is collective)."""
    if world_size(group) == 1:
        return None
    if group not in _patient_groups:
        patient = dist.new_group(ranks=dist.get_process_group_ranks(group), timeout=PATIENT_TIMEOUT)
        _connect(patient)
        _patient_groups[group] = patient
    return _patient_groups[group]


# --- traffic ---------------------------------------------------------------------------------------------------

_recorders: list[dict[str, int]] = []


@contextlib.contextmanager
def count_traffic():
    """Yields a dict {label: bytes this rank sent} that the collectives below fill while the block runs. The
    count is the data leaving this rank for other ranks, from the tensors' sizes: what any algorithm for the
    collective must send (an all_gather sends the local tensor to W - 1 ranks, a reduce-scatter W - 1 of its W
    chunks)."""
    record: dict[str, int] = defaultdict(int)
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def _sent(label: str, nbytes: int) -> None:
    for record in _recorders:
        record[label] += nbytes


@contextlib.contextmanager
def _collective(what: str, group):
    try:
        yield
    except RuntimeError as error:  # gloo's and NCCL's errors (DistBackendError, DistNetworkError, ...)
        raise PeerFailure(f"{what} failed on rank {rank(group)} of {world_size(group)}: another rank raised, "
                          "exited or did not reach this collective within the process group's timeout "
                          f"({error})") from error


# --- agreement -------------------------------------------------------------------------------------------------

def agree(what: str, values: list[int], problem: str | None, group, device,
          error: type[Exception] = ValueError) -> list[list[int]]:
    """Every rank's ``values`` (small integers), after one all_gather that also carries each rank's local
    ``problem`` (None when its arguments are fine). If any rank has a problem, every rank raises the same
    ``error`` naming each such rank, before any data collective could wait for a rank that has left."""
    message = (problem or "").encode()[:_MESSAGE_BYTES]
    text = torch.frombuffer(bytearray(message.ljust(_MESSAGE_BYTES, b"\0")), dtype=torch.int64)
    row = torch.cat([torch.tensor([problem is not None, len(message), *values], dtype=torch.int64), text])
    row = row.to(device)
    table = torch.empty(world_size(group) * row.numel(), dtype=torch.int64, device=device)
    with _collective(what, group):
        dist.all_gather_single(table, row, group=group)
    _sent("control", (world_size(group) - 1) * row.numel() * 8)
    table = table.view(world_size(group), -1).cpu()
    ranks_of_problem: dict[str, list[int]] = {}
    for other, line in enumerate(table):
        if line[0]:
            raw = bytes(line[2 + len(values):].contiguous().view(torch.uint8).tolist())[:int(line[1])]
            ranks_of_problem.setdefault(raw.decode(errors="replace"), []).append(other)
    if ranks_of_problem:
        raise error(f"{what}: " + "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}"
            for text, ranks in ranks_of_problem.items()))
    return table[:, 2:2 + len(values)].tolist()


def require_same(what: str, table: list[list[int]], names: tuple[str, ...], show=None,
                 error: type[Exception] = ValueError) -> None:
    """Raises ``error`` listing every rank's values when the ranks' rows of ``table`` (from ``agree``) differ.
    ``show`` turns a row into readable values (default: the numbers)."""
    if all(line == table[0] for line in table):
        return
    show = show or (lambda line: line)
    described = "; ".join(f"rank {other} has " + ", ".join(f"{name}={value}" for name, value in
                                                            zip(names, show(line)))
                          for other, line in enumerate(table))
    raise error(f"{what}: the ranks disagree on {', '.join(names)}: {described}")


# --- data collectives ------------------------------------------------------------------------------------------

def all_gather_rows(tensor: torch.Tensor, counts: list[int], group, label: str) -> torch.Tensor:
    """The ranks' tensors (rank r's has ``counts[r]`` rows) concatenated in rank order. The collective needs one
    shape, so each rank sends its rows padded to the largest count."""
    most = max(counts)
    if most == 0:
        return tensor.new_empty((0, *tensor.shape[1:]))
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = tensor.new_empty((len(counts) * most, *tensor.shape[1:]))
    with _collective(f"all_gather of {label}", group):
        dist.all_gather_single(gathered, padded, group=group)
    _sent(label, (len(counts) - 1) * padded.nbytes)
    return torch.cat([gathered[other * most:other * most + count] for other, count in enumerate(counts)])


def all_to_all_rows(tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group,
                    label: str) -> torch.Tensor:
    """Sends the first ``send_counts[0]`` rows of ``tensor`` to rank 0, the next ``send_counts[1]`` to rank 1, and
    so on; returns the rows received, ``receive_counts[r]`` from rank r, in rank order (no padding: every rank's
    counts must be the other ranks' view of the same exchange, as ``exchange_counts`` gives them)."""
    output = tensor.new_empty((sum(receive_counts), *tensor.shape[1:]))
    with _collective(f"all_to_all of {label}", group):
        dist.all_to_all_single(output, tensor.contiguous(), receive_counts, send_counts, group=group)
    row_bytes = tensor[:1].nbytes if tensor.shape[0] else 0
    _sent(label, (sum(send_counts) - send_counts[rank(group)]) * row_bytes)
    return output


def exchange_counts(send_counts: torch.Tensor, group) -> tuple[list[int], list[int]]:
    """``send_counts`` [W] (how many rows this rank will send each rank) -> (those counts, how many each rank will
    send this one), both on the host: one small all_to_all and one host synchronisation."""
    receive_counts = torch.empty_like(send_counts)
    with _collective("all_to_all of the row counts", group):
        dist.all_to_all_single(receive_counts, send_counts.contiguous(), group=group)
    _sent("control", (world_size(group) - 1) * send_counts[:1].nbytes)
    send, receive = torch.stack([send_counts, receive_counts]).tolist()
    return send, receive


def check_counts(what: str, counts, group, rows: int, problem: str | None = None) -> list[int]:
    """``counts`` of every rank's rows that a caller passes instead of agreeing on them, after this rank's own
    checks (its ``problem``, or counts that do not name its ``rows``): the ``ValueError`` names ``what``."""
    counts = [int(count) for count in counts]
    if problem is None and (len(counts) != world_size(group) or counts[rank(group)] != rows):
        problem = (f"counts must name every rank's rows ({world_size(group)} numbers), this rank's {rows} at "
                   f"position {rank(group)}; got {counts}")
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    return counts


def gather_to_first(tensor: torch.Tensor, group, label: str) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (one shape on every rank) on the group's rank 0, in rank order; None elsewhere."""
    first = rank(group) == 0
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))] if first else None
    with _collective(f"gather of {label}", group):
        dist.gather(tensor.contiguous(), parts, group=group, group_dst=0)
    _sent(label, 0 if first else tensor.nbytes)
    return parts


def all_reduce(tensor: torch.Tensor, group, label: str, op: str = "sum") -> torch.Tensor:
    """The elementwise ``op`` ("sum" or "min") of ``tensor`` over the ranks (in place; also returned)."""
    if world_size(group) > 1:
        with _collective(f"all_reduce of {label}", group):
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op], group=group)
        # Any all-reduce algorithm sends at least a reduce-scatter's and an all-gather's share.
        _sent(label, 2 * (world_size(group) - 1) * tensor.nbytes // world_size(group))
    return tensor


def broadcast_from_first(value, group, label: str):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size(group) == 1:
        return value
    box = [value]
    with _collective(f"broadcast of {label}", group):
        dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


@contextlib.contextmanager
def first_rank_first(group):
    """Runs the block on rank 0, then on the other ranks (which wait in a barrier of ``group`` meanwhile): for
    work whose result the others reuse, such as a feature cache."""
    if world_size(group) == 1:
        yield
        return
    if rank(group) != 0:
        with _collective("waiting for rank 0", group):
            dist.barrier(group=group)
    yield
    if rank(group) == 0:
        with _collective("waiting for the other ranks", group):
            dist.barrier(group=group)


# --- the global batch ------------------------------------------------------------------------------------------

@dataclass
class GlobalBatch:
    """A step's global batch: every rank's online embeddings and image ids, in rank order. The rows of this rank
    (``offset`` to ``offset + local_size``) are its own tensors with their gradients; the other ranks' rows are
    constants. A loss over the global batch then differentiates this rank's embeddings only, and the sum of the
    ranks' gradients (DDP averages them: scale the loss by ``world_size``) is the global loss's gradient.

    Nothing here builds the G × G in-batch matrix: ``similarity_blocks`` gives this rank's rows of it and its
    columns (B × G and G × B), from which the statistics and the in-batch loss are computed per rank."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    counts: tuple[int, ...]  # every rank's pairs, in rank order
    group: object = None

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def world_size(self) -> int:
        return len(self.counts)

    @property
    def offset(self) -> int:
        return sum(self.counts[:rank(self.group)])

    @property
    def local_size(self) -> int:
        return self.counts[rank(self.group)]

    @property
    def local(self) -> slice:
        return slice(self.offset, self.offset + self.local_size)

    def similarity_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's image rows × every text [B, G], every image × this rank's texts [G, B]) of the in-batch
        similarity matrix image × textᵀ, with autograd (the local rows' gradients). With one process both are the
        one [G, G] matrix."""
        rows = self.image[self.local] @ self.text.T
        if self.world_size == 1:
            return rows, rows
        return rows, self.image @ self.text[self.local].T

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` [B, ...] (one per local pair), concatenated in rank order: [G, ...]."""
        if self.world_size == 1:
            return local
        return all_gather_rows(local, list(self.counts), self.group, "batch")


def gather_batch(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, group,
                 counts: list[int] | None = None) -> GlobalBatch:
    """The global batch of ``image``, ``text`` [B, D] and ``ids`` [B] (B may differ between ranks, and be 0).
    ``counts``, every rank's B where the caller knows them (and that dim and dtype agree), skips the agreement and
    its host synchronisation."""
    local_size = ids.shape[0]
    if world_size(group) == 1:
        return GlobalBatch(image, text, ids, (local_size,), group)
    problem = None
    if image.dim() != 2 or text.shape != image.shape or ids.shape != (image.shape[0],):
        problem = (f"image and text must be [B, D] and ids [B], got {tuple(image.shape)}, {tuple(text.shape)} and "
                   f"{tuple(ids.shape)}")
    if counts is not None:
        counts = check_counts("gathering the global batch", counts, group, local_size, problem)
    else:
        table = agree("gathering the global batch", [local_size, image.shape[-1], dtype_code(image.dtype)], problem,
                      group, image.device)
        require_same("gathering the global batch", [line[1:] for line in table], ("dim", "dtype"))
        counts = [line[0] for line in table]
    offset = sum(counts[:rank(group)])
    embeddings = all_gather_rows(torch.cat([image.detach(), text.detach()], dim=1), counts, group, "batch")
    all_ids = all_gather_rows(ids, counts, group, "batch")
    dim = image.shape[1]

    def with_local_rows(gathered, local):
        return torch.cat([gathered[:offset], local, gathered[offset + local_size:]])

    return GlobalBatch(with_local_rows(embeddings[:, :dim], image), with_local_rows(embeddings[:, dim:], text),
                       all_ids, tuple(counts), group)


# The floating dtypes an agreement row can name: the banks' and float64 (a gradient check's embeddings).
_FLOATING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer for a floating dtype (for the agreement rows); -1 for any other."""
    return _FLOATING_DTYPES.index(dtype) if dtype in _FLOATING_DTYPES else -1


def dtype_code_name(code: int) -> str:
    """The name of the dtype ``dtype_code`` gave ``code``."""
    if not 0 <= code < len(_FLOATING_DTYPES):
        return "unsupported"
    return str(_FLOATING_DTYPES[code]).replace("torch.", "")
