"""Tensor + expert parallel layouts: one definition for `v4hal plan` and the running model.

`Layout(tp, ep, pp, dp)`: `tp` splits attention heads (V4: query heads, the grouped output
projection by whole groups, the indexer heads; V3.2 / V3: MLA heads), the shared experts and
V3's dense MLPs (column then row parallel) and the vocabulary (embedding and head); `ep` splits
the routed experts by index (with `ep = 1` and `tp > 1` each expert's width is split instead);
`dp` replicates what tp holds and splits the batch; `pp` splits the layers (planned, not run).
V4's single KV head and V3.2's MLA latent stay whole on every rank, so each rank holds the whole
cache of its sequences.

The running model (`model.build(..., layout=...)`) places ranks as `rank = dp_index * tp +
tp_index`; the routed experts run in one of three ways (`Parallel.experts`):

    "width"      ep = 1, tp > 1: every rank holds 1/tp of every expert's intermediate columns
    "local"      ep = tp, dp = 1: every rank holds E/ep whole experts and runs them for all its
                 (replicated) tokens; the partial sums meet in the tensor-parallel all-reduce
    "all_to_all" ep = dp, tp = 1: every rank holds E/ep experts and its own tokens, which travel
                 to their experts and back (`expert_parallel.AllToAll`)

`shard(name, ...)` says which slice of each checkpoint tensor a rank holds, for the loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from v4hal.model.collectives import SOLO, Collectives


class LayoutError(ValueError):
    """A layout that does not fit the model (the message names the setting)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def expert_split(self) -> int:
        """Into how many pieces the routed experts' weights are cut (by index, then by width)."""
        return self.ep * max(1, (self.tp * self.dp) // self.ep)

    @property
    def engram_split(self) -> int:
        """Into how many pieces V4.1's Engram tables are cut by hash columns (every tp and dp rank)."""
        return self.tp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} ep={self.ep} pp={self.pp} dp={self.dp}"

    def check(self, args) -> None:
        """Raise LayoutError unless every split this layout makes of `args`' model is even."""
        for name in ("tp", "ep", "pp", "dp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"layout {self}: {name} must be >= 1")
        splits = [("tp", self.tp, args.num_attention_heads, "attention heads (num_attention_heads)"),
                  ("tp", self.tp, args.vocab_size, "vocabulary entries (vocab_size)"),
                  ("ep", self.ep, args.n_routed_experts, "routed experts (n_routed_experts)")]
        layers = range(args.num_hidden_layers)
        if args.is_v4:
            splits.append(("tp", self.tp, args.o_groups, "output projection groups (o_groups)"))
        if args.is_v32 or args.shares_compressed_caches or args.is_v4 and any(args.compress_ratio(i) == 4 for i in layers):
            splits.append(("tp", self.tp, args.index_n_heads, "indexer heads (index_n_heads)"))
        if any(args.is_moe_layer(i) for i in layers) and args.n_shared_experts:
            splits.append(("tp", self.tp, args.n_shared_experts * args.moe_intermediate_size,
                           "shared expert columns (n_shared_experts * moe_intermediate_size)"))
        if not all(args.is_moe_layer(i) for i in layers):
            splits.append(("tp", self.tp, args.intermediate_size, "dense MLP columns (intermediate_size)"))
        if self.ep == 1 and self.tp * self.dp > 1:
            splits.append(("tp*dp", self.tp * self.dp, args.moe_intermediate_size,
                           "expert columns (moe_intermediate_size; ep=1 splits each expert's width)"))
        if args.is_v41:
            splits.append(("tp", self.tp, (args.hc_mult + 1) * args.hidden_size,
                           "Engram kv_proj outputs ((hc_mult + 1) * hidden_size)"))
        for setting, n, total, what in splits:
            if total % n:
                raise LayoutError(f"layout {self}: {setting}={n} must divide the {total} {what}")
        if args.is_v41:
            self._check_engram_columns(args)
        if self.ep > self.tp * self.dp:
            raise LayoutError(f"layout {self}: ep={self.ep} cannot exceed tp*dp={self.tp * self.dp} "
                              f"(experts live inside one pipeline stage)")

    def _check_engram_columns(self, args) -> None:
        """vLLM's column split gives each of the tp * dp ranks ceil(columns / (tp * dp)) hash
        columns: every rank needs some."""
        from v4hal.model.engram import EngramArgs

        columns, n = EngramArgs(args).columns, self.engram_split
        if (n - 1) * -(-columns // n) >= columns:
            setting = f"tp={self.tp}" if self.dp == 1 else f"tp*dp={n}"
            raise LayoutError(f"layout {self}: {setting} leaves ranks without Engram hash columns: "
                              f"{columns} ((engram_max_ngram_size - 1) * engram_n_heads) in pieces of "
                              f"{-(-columns // n)}")

    def check_runnable(self, args) -> None:
        """`check`, and that the model can run this layout (not only plan it)."""
        self.check(args)
        if self.pp != 1:
            raise LayoutError(f"layout {self}: pipeline parallelism (pp={self.pp}) is planned only, not run")
        if self.dp == 1 and self.ep not in (1, self.tp):
            raise LayoutError(f"layout {self}: with dp=1, ep must be 1 or tp={self.tp}, got ep={self.ep}")
        if self.dp > 1 and (self.tp != 1 or self.ep != self.dp):
            raise LayoutError(f"layout {self}: with dp={self.dp} the model runs tp=1 and ep=dp only")


class Parallel:
    """A rank's place in a running layout: its tensor-parallel collectives (`tp`), its
    data-parallel ones (`dp`: the ranks running other tokens, the whole world when dp > 1), the
    expert group (`ep_group`, the whole world when ep > 1) and how the routed experts run (`experts`)."""

    def __init__(self, layout: Layout, tp: Collectives = SOLO, ep_group=None, ep_rank: int = 0,
                 dp: Collectives = SOLO):
        self.layout, self.tp, self.ep_group, self.ep_rank, self.dp = layout, tp, ep_group, ep_rank, dp
        if layout.ep > 1:
            self.experts = "all_to_all" if layout.dp > 1 else "local"
        else:
            self.experts = "width" if layout.tp > 1 else "whole"

    @classmethod
    def create(cls, layout: Layout, args, timeout_s: float | None = None) -> "Parallel":
        """The groups of `layout` over the default process group (every rank must call this, in
        the same order); a one-device layout needs no process group. `timeout_s` bounds the
        groups' creation and collectives (None: torch's default, 30 minutes for gloo)."""
        layout.check_runnable(args)
        if layout.devices == 1:
            return cls(layout)
        if not dist.is_initialized():
            raise LayoutError(f"layout {layout}: needs torch.distributed initialised with {layout.devices} "
                              f"processes (run under torchrun)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.devices:
            raise LayoutError(f"layout {layout}: needs {layout.devices} processes, the process group has {world}")
        tp = SOLO
        if layout.tp > 1:
            # new_group is collective: every rank creates every tensor-parallel group.
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            groups = [dist.new_group(list(range(d * layout.tp, (d + 1) * layout.tp)), timeout=timeout)
                      for d in range(layout.dp)]
            tp = Collectives(groups[rank // layout.tp])
        dp = Collectives() if layout.dp > 1 else SOLO  # check_runnable: dp > 1 runs tp = 1, so all ranks
        return cls(layout, tp, dist.group.WORLD if layout.ep > 1 else None, rank if layout.ep > 1 else 0, dp)


SOLO_PARALLEL = Parallel(Layout())


DEVICE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # device type -> process-group backend


def process_group_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for tensors on `device`'s type."""
    # A plain string is split by hand: "npu" only parses as a torch.device once torch_npu is loaded.
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind not in DEVICE_BACKENDS:
        raise LayoutError(f"no process-group backend known for device type {kind!r}; known: {DEVICE_BACKENDS}")
    return DEVICE_BACKENDS[kind]


@dataclass(frozen=True)
class Placement:
    """Where a rank runs: its process-group `backend` and its `device` ("cpu", "cuda:1", "npu:0";
    a string, as "npu" parses as a torch.device only once torch_npu is loaded)."""

    backend: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend} on {self.device}"


def place(device_type: str, local_rank: int, local_devices: int, requested: str = "auto") -> Placement:
    """The placement of the process with `local_rank` on its node, for a model on `device_type`
    (the backend's device: cpu, cuda or npu) with `local_devices` such devices on the node:
    gloo on the CPU, nccl on `cuda:{local_rank}`, hccl on `npu:{local_rank}`. `requested` (auto or
    a backend name) must be the device's backend; a mismatch, or more processes on the node than
    devices, raises LayoutError saying which setting to change."""
    backend = process_group_backend(device_type)
    if requested not in ("auto", backend):
        needs = next((d for d, b in DEVICE_BACKENDS.items() if b == requested), None)
        raise LayoutError(f"--dist-backend {requested}: the model runs on {device_type}, whose process-group "
                          f"backend is {backend}" + (f"; {requested} needs {needs} devices" if needs else
                                                      f"; known: {sorted(DEVICE_BACKENDS.values())}"))
    if device_type == "cpu":
        return Placement(backend, "cpu")
    if not 0 <= local_rank < local_devices:
        raise LayoutError(f"local rank {local_rank} needs {device_type}:{local_rank}, but this node has "
                          f"{local_devices} {device_type} device(s): start at most {local_devices} processes per "
                          f"node (torchrun --nproc-per-node), or restrict the visible devices accordingly")
    return Placement(backend, f"{device_type}:{local_rank}")


def local_placement(device: torch.device, requested: str = "auto") -> Placement:
    """`place` for this process under torchrun (LOCAL_RANK), `device` being the backend's device
    (`registry.backend_module(b).device()`), counting the node's devices of its type."""
    kind = device.type
    count = {"cuda": lambda: torch.cuda.device_count(),
             "npu": lambda: torch.npu.device_count()}.get(kind, lambda: 0)()  # torch.npu: torch_npu's
    return place(kind, int(os.environ.get("LOCAL_RANK", "0")), count, requested)


def join(layout: Layout, placement: Placement, timeout_s: float) -> None:
    """Initialise the default process group from torchrun's environment for `layout`, on this
    rank's `placement` (its device made the current one); a world of another size, a backend
    this torch lacks, or ranks that do not all join within `timeout_s`, raise LayoutError naming
    the layout (never a hang). `timeout_s` also bounds every later collective on the default
    group (pass it to `build` too, for the groups a layout creates)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != layout.devices:
        raise LayoutError(f"layout {layout}: needs {layout.devices} processes, torchrun started {world} "
                          f"(--nproc-per-node {layout.devices})")
    if not dist.is_backend_available(placement.backend):
        raise LayoutError(f"layout {layout}: process-group backend {placement.backend} (for {placement.device}) "
                          f"is not available in this torch {torch.__version__}")
    kind, _, index = placement.device.partition(":")
    if index:  # nccl / hccl address the current device of each process
        getattr(torch, kind).set_device(int(index))
    try:
        dist.init_process_group(placement.backend, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as exc:  # DistStoreError: "... 1/2 clients joined."
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise LayoutError(f"layout {layout}: not every one of the {layout.devices} processes joined within "
                          f"{timeout_s:g} s (a rank died before joining or never started): {first}") from None

# Tensor-parallel splits, by the module a weight belongs to: column parallel (split output rows,
# dim 0) or row parallel (split input columns, dim 1, the sum completed by an all-reduce).
# (V4's compressors have a `gate_proj` too: attention and MLP names are told apart by their layer part.)
# V4.1's Engram `kv_proj` is column parallel (vLLM's `wkv`); its table is split by hash columns
# (`model.engram.ColumnShard`, sliced by the loader, which knows the primes).
_SPLIT = {"self_attn": ({"q_b_proj", "kv_b_proj", "o_a_proj", "wq_b", "weights_proj"}, {"o_b_proj", "o_proj"}),
          "mlp": ({"gate_proj", "up_proj"}, {"down_proj"}),
          "engram": ({"kv_proj"}, set())}


def shard(name: str, shape: tuple[int, ...], par: Parallel) -> tuple[int, list[tuple[int, int]]] | None:
    """Which part of the full tensor `name` (a state-dict / checkpoint name, `shape` its full
    shape) this rank holds: (dim, [(start, stop), ...] concatenated along dim), or None for all
    of it. Scales are sliced by the loader from their weight's split."""
    parts = name.split(".")
    leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
    tp = par.tp
    if len(parts) > 3 and parts[-4] == "experts" and par.experts != "width":
        return None  # one expert of a checkpoint that stores them apart: whole where it is held
    if module == "experts":  # stacked routed experts [E, 2I, H] / [E, H, I]
        if par.experts in ("local", "all_to_all"):
            return 0, [_even(shape[0], par.layout.ep, par.ep_rank)]
        if par.experts == "width":
            if leaf == "gate_up_proj":  # gate rows then up rows: the same columns of each
                half = shape[1] // 2
                start, stop = _even(half, tp.size, tp.rank)
                return 1, [(start, stop), (half + start, half + stop)]
            return 2, [_even(shape[2], tp.size, tp.rank)]
        return None
    if tp.size == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, [_even(shape[0], tp.size, tp.rank)]
    if leaf == "sinks":
        return 0, [_even(shape[0], tp.size, tp.rank)]
    if leaf != "weight":
        return None
    part = next((p for p in parts if p in _SPLIT), None)
    if part is None:
        return None
    column, row = _SPLIT[part]
    if module in column:
        return 0, [_even(shape[0], tp.size, tp.rank)]
    if module in row:
        return 1, [_even(shape[1], tp.size, tp.rank)]
    return None


def _even(n: int, parts: int, index: int) -> tuple[int, int]:
    if n % parts:
        raise LayoutError(f"cannot split {n} evenly into {parts} parts")
    per = n // parts
    return index * per, (index + 1) * per


def take(tensor, split: tuple[int, list[tuple[int, int]]] | None):
    """The part of `tensor` (a torch tensor, or anything sliceable the same way) `split` names."""
    if split is None:
        return tensor
    dim, ranges = split
    pieces = [tensor[(slice(None),) * dim + (slice(a, b),)] for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


FP8_BLOCK = 128


def scale_split(name: str, split, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], fp8: bool,
                layout: Layout):
    """The part of a quantized weight's scale that goes with the part `split` of the weight (both
    in stored units): FP8's 128 x 128 blocks, MXFP4's 1 x 32 (16 bytes) and int8's per-row scales
    alike. A split that cuts through a scale block is refused (LayoutError naming the tensor)."""
    if split is None:
        return None
    dim, ranges = split
    if dim >= len(scale_shape) or not fp8 and scale_shape[dim] == 1 < weight_shape[dim]:
        return None  # one scale across the whole dimension (int8's per-row scale under a column split)
    full = weight_shape[dim]
    block = FP8_BLOCK if fp8 else full // scale_shape[dim]
    out = []
    for a, b in ranges:
        if a % block or (b % block and b != full):
            raise LayoutError(f"{name}: layout {layout} cuts dimension {dim} at [{a}, {b}), inside its "
                              f"{block}-wide quantization blocks; choose a layout whose split is a multiple "
                              f"of {block} (or a dequantized checkpoint)")
        out.append((a // block, -(-b // block)))
    return dim, out


def local_expert(name: str, n_experts: int, par: Parallel) -> str | None:
    """A checkpoint name of one routed expert (`...experts.17.gate_proj.weight`) renumbered to
    this rank's experts, None if another rank holds it; any other name as it is."""
    parts = name.split(".")
    if par.experts not in ("local", "all_to_all") or len(parts) < 4 or parts[-4] != "experts":
        return name
    e = int(parts[-3])
    start, stop = _even(n_experts, par.layout.ep, par.ep_rank)
    if not start <= e < stop:
        return None
    return ".".join(parts[:-3] + [str(e - start)] + parts[-2:])
