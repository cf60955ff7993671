"""The two calibration streams of DESIGN §1 and how regions run on them.

FP stream: ONNX Runtime's FP32 outputs of each region (the targets). Q stream: the torch region
with its quantizers. Only tensors a later region reads are kept (TensorStore spills past a budget).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import numpy as np
import onnx
import torch

from ..context import Region
from ..graph import Graph, reads
from ..layout import Batching, Layout
from ..onnx_facts import cap_ir_version
from ..runtime.memory import trim
from ..store import TensorStore


@dataclass
class Streams:
    fp: TensorStore
    q: TensorStore
    n: int
    n_train: int  # samples [0, n_train) train; the rest are held out to judge each region
    mask: Optional[np.ndarray] = None  # [n, seq] token mask (text): padded positions are not fitted
    batching: Batching = field(default_factory=Batching)  # where each tensor keeps its samples

    def layout(self, name: str) -> Layout:
        return self.batching.layout(name)

    def spans(self, samples: range, batch: int) -> Iterator[tuple[int, int]]:
        """[start, stop) sample spans of at most ``batch`` (exactly the unit of a locked graph)."""
        step = self.batching.batch(batch)
        for s in range(samples.start, samples.stop, step):
            yield s, min(s + step, samples.stop)

    def feed(self, store: TensorStore, names: list, start: int, stop: int) -> list:
        return [self.layout(t).slice(store[t], start, stop) for t in names]

    def take(self, store: TensorStore, name: str, idx):
        return self.layout(name).take(store[name], idx)

    def shuffled(self, rng, count: int, batch: int) -> list:
        """Random sorted index batches covering samples [0, count) (whole units of a locked graph)."""
        unit = self.batching.locked_unit
        if unit:
            return [np.arange(c * unit, c * unit + unit) for c in rng.permutation(count // unit)]
        order = rng.permutation(count)
        return [np.sort(order[s:s + batch]) for s in range(0, count, batch)]

    def random_batch(self, rng, count: int, batch: int) -> np.ndarray:
        unit = self.batching.locked_unit
        if unit:
            c = int(rng.integers(count // unit))
            return np.arange(c * unit, c * unit + unit)
        return np.sort(rng.choice(count, batch, replace=False))

    def first(self, m: int) -> "Streams":
        """The same stores seen through their first ``m`` samples (held-out share kept)."""
        if m >= self.n:
            return self
        hold = min(self.n - self.n_train, m // 8)
        return replace(self, n=m, n_train=m - hold, mask=None if self.mask is None else self.mask[:m])

    def keep_only(self, names: set) -> None:
        self.fp.keep_only(names)
        self.q.keep_only(names)

    def close(self) -> None:
        self.fp.close()
        self.q.close()


def later_inputs(regions: list) -> list:
    """later[i]: the tensors the regions after region i read (graph outputs not included)."""
    later, out = set(), [set() for _ in regions]
    for r in reversed(regions):
        out[r.index] = set(later)
        later |= set(r.inputs)
    return out


def needed_after(graph: Graph, regions: list) -> list:
    """needed[i]: the tensors some region after region i (or the graph output) reads."""
    return [s | set(graph.output_names) for s in later_inputs(regions)]


#: bytes of one region's outputs held at once when nothing later reads them (a decoder's logits are
#: 100 MB per 512-token window: 128 windows would need 13 GB per stream)
OUTPUT_BUDGET = 512 << 20


def samples_within(graph: Graph, sizes: dict, outputs, n: int, unit: int = 1, budget: float | None = None) -> int:
    """How many of ``n`` samples keep ``outputs`` within ``budget`` bytes (default OUTPUT_BUDGET; whole
    units, at least one)."""
    budget = OUTPUT_BUDGET if budget is None else budget
    per_sample = sum(sizes.get(o, 0) * _itemsize(graph.elem_types.get(o, onnx.TensorProto.FLOAT)) for o in outputs)
    if per_sample * n <= budget:
        return n
    return min(n, max(1, int(budget // max(per_sample * unit, 1))) * unit)


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def region_model(graph: Graph, region: Region, outputs: list, input_dtypes: dict) -> onnx.ModelProto:
    """A standalone ONNX model holding only this region's nodes, for ONNX Runtime FP32 targets."""
    h = onnx.helper
    inputs = [h.make_tensor_value_info(t, h.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[t])), None)
              for t in region.inputs]
    outs = [h.make_tensor_value_info(t, graph.elem_types.get(t, onnx.TensorProto.FLOAT), None) for t in outputs]
    used = {i for n in region.nodes for i in reads(n) if i in graph.initializers}
    g = h.make_graph(region.nodes, f"region_{region.index}", inputs, outs,
                     initializer=[graph.initializers[i] for i in sorted(used)])
    return cap_ir_version(h.make_model(g, opset_imports=list(graph.model.opset_import)))


def collect(streams: Streams, dest: TensorStore, outputs: list, batches) -> dict:
    """Write each batch's outputs into ``dest`` as they come (``batches`` yields ((start, stop), arrays)),
    so a region's outputs are never held twice (a list of batches plus their join); return name ->
    stored array. Tensors whose samples are not rows of axis 0 (a locked graph's units, shape
    arithmetic) are joined per layout as before."""
    sinks, parts = {}, {o: [] for o in outputs}
    for (s, e), outs in batches:
        for o, v in zip(outputs, outs):
            lay = streams.layout(o)
            rows = (not lay.stacked and lay.axis == 0 and getattr(v, "ndim", 0) >= 1
                    and v.shape[0] == (e - s) * lay.per_sample and v.dtype != object)
            sink = sinks.get(o)
            if sink is not None and (not rows or v.shape[1:] != sink.shape[1:]):
                parts[o] = [sink[:s * lay.per_sample]]  # the shape changed: back to joining
                del sinks[o]
                dest.drop(o)
                sink = None
            if rows and sink is None and not parts[o]:
                sink = sinks[o] = dest.allocate(o, (streams.n * lay.per_sample,) + tuple(v.shape[1:]), v.dtype)
            if sink is not None:
                sink.write(s * lay.per_sample, v)
            else:
                parts[o].append(v)
    for o in outputs:
        if o not in sinks:
            dest.put(o, streams.layout(o).join(parts[o]))
    trim()  # the batches' buffers would stay in the heap (runtime/memory.py)
    return {o: dest[o] for o in outputs}


def ort_outputs(sess, streams: Streams, store: TensorStore, inputs: list, outputs: list, batch: int,
                dest: TensorStore) -> dict:
    """The region's outputs on every sample, run by ONNX Runtime in batches, written into ``dest``."""
    def runs():
        for s, e in streams.spans(range(streams.n), batch):
            feed = {i: np.asarray(x) for i, x in zip(inputs, streams.feed(store, inputs, s, e))}
            yield (s, e), sess.run(outputs, feed)
    return collect(streams, dest, outputs, runs())


def to_torch(a, device):
    if isinstance(a, torch.Tensor):
        return a.to(device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def stage(a: np.ndarray, device, chunk: int = 64) -> torch.Tensor:
    """A region's calibration tensor for training: on the CPU the array itself (numpy or stored, read
    batch by batch, never copied whole); on a GPU, copied once into device memory in pinned, batched
    host-to-device copies (then indexed on the device)."""
    if a.dtype == object:  # a locked graph's per-unit arrays of different shapes: indexed as they are
        return a
    if device.type != "cuda":  # numpy and stored arrays are indexed batch by batch as they are
        return a
    out = torch.empty(a.shape, dtype=torch.from_numpy(np.asarray(a[:1])).dtype, device=device)
    for s in range(0, a.shape[0], chunk):
        out[s:s + chunk].copy_(torch.from_numpy(np.ascontiguousarray(a[s:s + chunk])).pin_memory(), non_blocking=True)
    torch.cuda.synchronize(device)
    return out


@torch.no_grad()
def torch_outputs(module, streams: Streams, store: TensorStore, inputs: list, outputs: list, batch: int, device,
                  dest: TensorStore) -> dict:
    """The lifted region's outputs on every sample, in batches, written into ``dest``."""
    def runs():
        for s, e in streams.spans(range(streams.n), batch):
            outs = module(*[to_torch(x, device) for x in streams.feed(store, inputs, s, e)])
            yield (s, e), [outs[o].detach().cpu().numpy() for o in outputs]
    return collect(streams, dest, outputs, runs())
