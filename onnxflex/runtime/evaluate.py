"""The logic behind ``onnxflex eval``: run a model (and optionally a reference) over data, report metrics.

* Image folders are streamed in batches, so evaluating a large folder never holds it all in memory.
  Labels come from ``labels.csv`` (columns ``file,class_index``; ``file`` relative to the folder) --
  by default ``<folder>/labels.csv`` when it exists.
* A ``.txt`` file (one text per line) is tokenized with ``tokenizer`` (a Hugging Face tokenizer folder).
* ``.npy``/``.npz`` data (or an iterable of feed dicts / a :class:`CalibrationSet`) are loaded with the
  calibration loader, so they are validated the same way; labels are then a ``.npy`` of class indices.
* The first float model output is scored unless ``output`` names another.  A 2-D output is a *classifier* when
  labels are given or its width is a known class count; anything else is an *embedding*.
  Classifiers get top-1/top-5 (with labels) and top-1 agreement, SQNR, KL, cosine (with ``ref``);
  embeddings get SQNR and cosine vs ``ref``.
* 1001-way outputs (TF models whose class 0 is "background") are scored after dropping column 0 when all
  labels are < 1000, so ImageNet 0-999 labels line up.
* ``latency_ms`` is model run time per sample (image decoding excluded), averaged over the batches.
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from ..calib import (
    CalibrationSet,
    Preprocess,
    iter_images,
    list_images,
    load_calibration,
    resolve_image_input,
    to_layout,
)
from ..calib.images import no_images_error
from ..errors import OnnxflexError
from . import metrics
from .session import _summarize, input_specs, make_session

CLASS_COUNTS = (10, 100, 1000, 1001, 21841, 21843)  # widths treated as classifiers even without labels


@dataclass
class EvalReport:
    """Results of one evaluation; ``None`` means "not measured" (no labels, no ref, or not meaningful)."""

    num_samples: int
    top1: float | None
    top5: float | None
    agreement: float | None
    sqnr_db: float | None
    cosine: float | None
    kl: float | None
    model: str
    ref: str | None
    latency_ms: float | None
    output: str | None = None  # which model output was scored
    kind: str | None = None  # classifier | embedding

    def to_dict(self) -> dict:
        """JSON-safe dict: infinities become the strings "inf"/"-inf", NaN becomes None."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                if math.isnan(v):
                    d[k] = None
                elif math.isinf(v):
                    d[k] = "inf" if v > 0 else "-inf"
        return d

    def format_table(self) -> str:
        """Two aligned columns, measured rows only (what the CLI prints)."""
        rows: list[tuple[str, str]] = [("model", self.model)]
        if self.ref is not None:
            rows.append(("reference", self.ref))
        if self.output is not None:
            rows.append(("output", f"{self.output} ({self.kind})" if self.kind else self.output))
        rows.append(("samples", str(self.num_samples)))

        def pct(v):
            return f"{100 * v:.2f} %"

        for label, v, f in (
            ("top-1", self.top1, pct),
            ("top-5", self.top5, pct),
            ("top-1 agreement", self.agreement, pct),
            ("SQNR", self.sqnr_db, lambda x: ("inf" if math.isinf(x) and x > 0 else f"{x:.2f}") + " dB"),
            ("cosine", self.cosine, lambda x: f"{x:.5f}"),
            ("KL", self.kl, lambda x: f"{x:.5f}"),
            ("latency", self.latency_ms, lambda x: f"{x:.3f} ms/sample"),
        ):
            if v is not None:
                rows.append((label, f(v)))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _name(m: Any) -> str:
    if isinstance(m, (str, os.PathLike)):
        return str(m)
    if isinstance(m, onnx.ModelProto):
        return m.graph.name or "<ModelProto>"
    return "<in-memory model>"


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """labels.csv -> {file (relative posix path as written): class_index}."""
    path = Path(path)
    if not path.is_file():
        raise OnnxflexError(f"labels file {path} does not exist; pass --labels with a CSV that has columns file,class_index")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("file", "class_index") if c not in cols]
            if missing:
                raise OnnxflexError(
                    f"labels file {path} has no column {', '.join(missing)} (found: {', '.join(cols) or 'none'}); "
                    "it needs a header with columns file,class_index"
                )
            out: dict[str, int] = {}
            for i, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                try:
                    out[Path(row["file"]).as_posix()] = int(row["class_index"])
                except ValueError:
                    raise OnnxflexError(
                        f"labels file {path} line {i}: class_index {row['class_index']!r} is not an integer; fix that row"
                    ) from None
    except OSError as e:
        raise OnnxflexError(f"cannot read labels file {path} ({e.strerror}); check the path and permissions") from None
    except UnicodeDecodeError:
        raise OnnxflexError(f"labels file {path} is not UTF-8 text; pass a CSV with columns file,class_index") from None
    if not out:
        raise OnnxflexError(f"labels file {path} has no rows; add one row per image (file,class_index)")
    return out


def _labels_for_files(files: Sequence[Path], folder: Path, table: dict[str, int], src: Path) -> np.ndarray:
    by_base: dict[str, int | None] = {}
    for k, v in table.items():
        b = k.rsplit("/", 1)[-1]
        by_base[b] = v if b not in by_base else None  # None marks an ambiguous base name
    out, missing = [], []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        v = table.get(rel)
        if v is None:
            v = by_base.get(f.name)
        if v is None:
            missing.append(rel)
        out.append(-1 if v is None else v)
    if missing:
        raise OnnxflexError(
            f"{len(missing)} image(s) have no row in {src}, e.g. {missing[0]}; add them to the labels file or remove them from the folder"
        )
    return np.asarray(out, dtype=np.int64)


def _load_npy_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, (str, os.PathLike)):
        p = Path(labels)
        if not p.is_file():
            raise OnnxflexError(f"labels file {p} does not exist; check the path")
        if p.suffix.lower() != ".npy":
            raise OnnxflexError(f"labels for .npy/.npz data must be a .npy array of class indices, got {p.name}")
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise OnnxflexError(f"cannot read labels {p.name} ({type(e).__name__}); re-save it with numpy.save") from None
        where = p.name
    else:
        arr, where = np.asarray(labels), "labels"
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise OnnxflexError(f"{where} must hold integer class indices, got {arr.dtype}; save them as an int array")
    return arr.astype(np.int64)


def _feeds_from_images(img, files, limit, batch: int, used: list) -> Iterator[dict[str, np.ndarray]]:
    buf = []
    for p, x in iter_images(files, img.preprocess, limit, chunk=max(batch, 8)):
        buf.append(to_layout(x, img.preprocess.layout).astype(img.dtype, copy=False))
        used.append(p)
        if len(buf) == batch:
            yield {img.name: np.stack(buf)}
            buf = []
    if buf:
        if img.batch is not None:
            del used[len(used) - len(buf) :]
            warnings.warn(f"model has a fixed batch of {img.batch}; the last {len(buf)} image(s) are not evaluated", stacklevel=2)
        else:
            yield {img.name: np.stack(buf)}


def _as_2d(y: np.ndarray) -> np.ndarray:
    """[N, C, 1, 1] -> [N, C]; other ranks unchanged."""
    if y.ndim > 2 and all(d == 1 for d in y.shape[2:]):
        return y.reshape(y.shape[0], y.shape[1])
    return y


def evaluate(
    model: Any,
    data: Any,
    labels: str | Path | None = None,
    ref: Any = None,
    preprocess: Preprocess | None = None,
    batch_size: int = 32,
    providers: Sequence[str] | str = ("cpu",),
    limit: int | None = None,
    threads: int | None = None,
    output: str | None = None,
    optimization: str = "disable",
    tokenizer: str | Path | None = None,
    max_length: int = 128,
) -> EvalReport:
    """Evaluate ``model`` on ``data``; see the module docstring for what is measured when.

    ``optimization`` defaults to ORT's basic level, which runs Q/DQ as written (the arithmetic
    TensorRT deploys). At "all", ORT-CPU fuses Q/DQ into its own int8 kernels, whose u8s8 path
    saturates on x86 CPUs without VNNI and can lose accuracy that the model itself does not.
    """
    if batch_size < 1:
        raise OnnxflexError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise OnnxflexError(f"--limit must be at least 1, got {limit}")
    sess = make_session(model, providers, threads, optimization=optimization)
    specs = input_specs(sess)
    rsess = None
    if ref is not None:
        rsess = make_session(ref, providers, threads, optimization=optimization)
        rspecs = input_specs(rsess)
        if sorted(rspecs) != sorted(specs):
            raise OnnxflexError(
                f"reference model inputs ({', '.join(rspecs)}) differ from the model's ({', '.join(specs)}); "
                "compare models with the same inputs"
            )
    outs = [o.name for o in sess.get_outputs()]
    floats = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(float16)")]
    out_name = output or (floats[0] if floats else outs[0])
    if out_name not in outs:
        raise OnnxflexError(f"model has no output {out_name!r}; its outputs are {', '.join(outs)}")
    if rsess is not None:
        routs = [o.name for o in rsess.get_outputs()]
        # same output name in the reference, else the output at the same position
        i = outs.index(out_name)
        ref_out = out_name if out_name in routs else (routs[i] if i < len(routs) else None)
        if ref_out is None:
            raise OnnxflexError(f"reference model has no output matching {out_name!r}; its outputs are {', '.join(routs)}")

    # ---- data -> batches of feeds, labels
    y_true: np.ndarray | None = None
    used: list[Path] = []
    folder: Path | None = None
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        folder = Path(data)
        img = resolve_image_input(specs, preprocess)
        files = list_images(folder)
        if not files:
            raise no_images_error(folder)
        label_path = Path(labels) if labels is not None else (folder / "labels.csv")
        table = None
        if labels is not None or label_path.is_file():
            if label_path.suffix.lower() != ".csv" and labels is not None:
                raise OnnxflexError(f"labels for an image folder must be a CSV with columns file,class_index, got {label_path.name}")
            table = read_labels_csv(label_path)
            # check up front (before any inference) that the images to be scored have labels
            _labels_for_files(files[: limit or len(files)], folder, table, label_path)
        bs = img.batch or batch_size
        feeds: Iterator[dict[str, np.ndarray]] = _feeds_from_images(img, files, limit, bs, used)
    else:
        if isinstance(data, (str, os.PathLike)) and not Path(data).exists():
            raise OnnxflexError(f"data path {data} does not exist; check the path")
        cs = load_calibration(data, specs, size=limit, tokenizer=tokenizer, max_length=max_length)
        if isinstance(data, CalibrationSet) and limit is not None:
            cs = CalibrationSet(cs.samples[:limit], cs.input_names, cs.source, cs.files, cs.static_batch, cs.input_specs)
        if labels is not None:
            y_true = _load_npy_labels(labels)
            if y_true.shape[0] < cs.num_samples or (limit is None and y_true.shape[0] != cs.num_samples):
                raise OnnxflexError(f"{y_true.shape[0]} labels for {cs.num_samples} samples; pass one label per sample")
            y_true = y_true[: cs.num_samples]
        feeds = cs.batches(batch_size)
        table = None

    # ---- run
    ys, rys = [], []
    run_s, n = 0.0, 0
    for fd in feeds:
        t0 = time.perf_counter()
        try:
            y = sess.run([out_name], fd)[0]
        except Exception as e:
            raise OnnxflexError(f"the model failed on the data: {_summarize(e)}; check the data matches the model inputs") from None
        run_s += time.perf_counter() - t0
        n += next(iter(fd.values())).shape[0]
        ys.append(np.asarray(y))
        if rsess is not None:
            try:
                rys.append(np.asarray(rsess.run([ref_out], fd)[0]))
            except Exception as e:
                raise OnnxflexError(f"the reference model failed on the data: {_summarize(e)}; check it takes the same inputs") from None
    if n == 0:
        raise OnnxflexError("no samples were evaluated; check the data (and --limit / fixed batch size)")
    y = _as_2d(np.concatenate(ys, axis=0))
    ry = _as_2d(np.concatenate(rys, axis=0)) if rys else None
    if table is not None and folder is not None:
        y_true = _labels_for_files(used, folder, table, Path(labels) if labels is not None else folder / "labels.csv")
    if y_true is not None and y_true.shape[0] != y.shape[0]:
        y_true = y_true[: y.shape[0]]  # fixed-batch remainder dropped
    if ry is not None and ry.shape != y.shape:
        raise OnnxflexError(f"model output {list(y.shape)} and reference output {list(ry.shape)} differ in shape; compare matching models")

    # ---- metrics
    is_cls = y.ndim == 2 and (y_true is not None or y.shape[1] in CLASS_COUNTS)
    top1 = top5 = agree = sqnr = cos = kl = None
    if is_cls:
        logits, rlogits = y, ry
        if y_true is not None:
            if y.shape[1] == 1001 and y_true.size and y_true.max() < 1000:
                logits = y[:, 1:]
                rlogits = None if ry is None else ry[:, 1:]
            C = logits.shape[1]
            bad = y_true[(y_true < 0) | (y_true >= C)]
            if bad.size:
                raise OnnxflexError(f"label {int(bad[0])} is out of range for a {C}-class output; "
                                    "check the labels match the model's classes")
            top1 = metrics.topk_accuracy(logits, y_true, 1)
            top5 = metrics.topk_accuracy(logits, y_true, 5) if C > 5 else None
        if ry is not None:
            agree = metrics.top1_agreement(logits, rlogits)
            kl = metrics.kl_divergence(rlogits, logits)
    if ry is not None:
        sqnr = metrics.sqnr_db(ry, y)
        cos = metrics.cosine_similarity(ry, y)
    if not is_cls and y_true is not None:
        warnings.warn(f"output {out_name!r} of shape {list(y.shape)} is not [N, classes]; labels are ignored", stacklevel=2)
    if y_true is None and ry is None:
        warnings.warn("no labels and no reference model: only latency is measured; pass labels or --ref", stacklevel=2)
    return EvalReport(
        num_samples=int(n),
        top1=top1,
        top5=top5,
        agreement=agree,
        sqnr_db=sqnr,
        cosine=cos,
        kl=kl,
        model=_name(model),
        ref=None if ref is None else _name(ref),
        latency_ms=1000.0 * run_s / n,
        output=out_name,
        kind="classifier" if is_cls else "embedding",
    )
