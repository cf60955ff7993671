"""``onnxflex quantize | eval | inspect | check``: a thin click layer over the Python API.

User mistakes (OnnxflexError) print one line and exit 2, never a traceback.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .config import CALIB_METHODS, PRESETS, QuantConfig, REGION_MODES
from .methods import METHOD_NAMES as METHODS
from .targets import TARGETS
from .errors import InternalError, OnnxflexError


def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(parts) != 3:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return parts


def preprocess_options(f):
    """Image preprocessing flags shared by quantize and eval."""
    opts = [
        click.option("--preprocess", type=click.Choice(["torch", "tf"]), default="torch", show_default=True,
                     help="torch: ImageNet mean/std, bilinear, resize size*256/224; tf: (x-127)/128, bicubic, resize size+32"),
        click.option("--size", type=int, default=None, help="center-crop size (default: the model's input H/W)"),
        click.option("--resize", type=int, default=None, help="short side before cropping"),
        click.option("--mean", callback=_floats3, default=None, help="a,b,c on the 0-1 scale"),
        click.option("--std", callback=_floats3, default=None, help="a,b,c on the 0-1 scale"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def text_options(f):
    """Tokenizer flags shared by quantize and eval (text files as data)."""
    f = click.option("--seq-len", type=int, default=None,
                     help="decoder LMs: tokens per window; the .txt is one token stream cut into windows, "
                          "--calib-size of them (default: the model's fixed length, else 512)")(f)
    f = click.option("--max-length", type=int, default=128, show_default=True,
                     help="encoders: tokens per text (truncation; texts are padded to the longest)")(f)
    return click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
                        help="Hugging Face tokenizer folder (tokenizer.json or vocab.txt) for .txt data")(f)


def _preprocess(preprocess, size, resize, mean, std):
    from .calib import make_preprocess

    return make_preprocess(preprocess, size=size, resize=resize, mean=mean, std=std)


def user_errors(f):
    """Turn OnnxflexError into a one-line message and exit code 2."""

    @functools.wraps(f)
    def wrapper(*a, **k):
        try:
            return f(*a, **k)
        except OnnxflexError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except InternalError as e:  # an onnxflex bug: one line, the cause only with -v
            logging.getLogger("onnxflex").debug("internal error", exc_info=True)
            click.echo(str(e), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; no output written", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="onnxflex")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose):
    """onnxflex: FlexRound post-training quantization for ONNX models, written as standard QDQ."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", "calib", required=True, multiple=True,
              help="image folder, .npy/.npz file(s) (npz keys = input names), or a .txt file with one text "
                   "per line (needs --tokenizer); repeat for several files")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=True), help="output QDQ .onnx path")
@click.option("--method", type=click.Choice(METHODS), default="flexround", show_default=True)
@click.option("--weight-bits", type=click.Choice(["8", "4", "3", "2"]), default="8", show_default=True)
@click.option("--act-bits", type=click.Choice(["8", "16", "0"]), default="8", show_default=True,
              help="0 = weight-only")
@click.option("--granularity", type=click.Choice(["channel", "tensor"]), default="channel", show_default=True)
@click.option("--block-size", type=int, default=0, show_default=True,
              help="MatMul/Gemm weights: one scale per block of this many input rows (32, 64, 128; 0 = per channel); "
                   "blocked DequantizeLinear at opset 21, which onnxruntime runs as MatMulNBits")
@click.option("--asymmetric", is_flag=True,
              help="weight-only, --target ort-cpu: a zero point per channel/block (uint4/uint8 weights)")
@click.option("--regions", type=click.Choice(REGION_MODES), default="auto", show_default=True)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="fast", show_default=True,
              help="fast: 200 iters/region; default: 1000; paper: 20000 (BRECQ/QDrop)")
@click.option("--iters", type=int, default=None, help="iterations per region (overrides the preset)")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="learning rate of the rounding parameters")
@click.option("--act-lr", type=float, default=None, help="learning rate of the activation steps (LSQ); 0 = keep calibrated")
@click.option("--drop-prob", type=float, default=None, help="QDrop probability, in steps of 1/256 (default 0.5 with activations)")
@click.option("--calib-size", type=int, default=256, show_default=True, help="calibration samples used")
@click.option("--augment", type=int, default=0, show_default=True,
              help="extra random-crop views per calibration image (image folders)")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default="auto", show_default=True,
              help="activation ranges: auto = minmax in attention models (outliers carry meaning), "
                   "else the 99.99th percentile of |x|")
@click.option("--first-last-bits", type=int, default=8, show_default=True,
              help="bits of the first and last weighted op (0 = same as --weight-bits)")
@click.option("--exclude", multiple=True, help="node name to keep in FP32 (repeatable)")
@click.option("--cle", is_flag=True,
              help="cross-layer equalization of Conv -> Relu/ReLU6 -> Conv chains first, keeping the model's function "
                   "(off by default: on EfficientNet-Lite0 it lowered the output SQNR; see the README)")
@click.option("--awq", is_flag=True,
              help="activation-aware scaling (AWQ) of MatMul weights into the norm gain or up projection that feeds "
                   "them, keeping the model's function (off by default: on SmolLM2 W4 it raised RTN's perplexity; "
                   "see the README)")
@click.option("--quantize-attention", is_flag=True,
              help="also quantize activation x activation MatMuls (attention scores and context); FP by default")
@text_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--tf32", is_flag=True, help="CUDA: allow TF32 convolutions and matmuls (faster, less like a CPU run)")
@click.option("--max-memory", type=float, default=3.0, show_default=True,
              help="GiB of calibration activations kept in RAM; beyond it they go to files (read back exactly)")
@click.option("--stream-precision", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="how calibration activations are held between regions: float16 halves the memory, its rounding "
                   "lies far below 8-bit noise (bench/stream_precision.py); float32 keeps every bit")
@click.option("--target", type=click.Choice(TARGETS), default="tensorrt", show_default=True,
              help="runtime the output is for: tensorrt = symmetric int8 Q/DQ on weighted-op inputs; ort-cpu = "
                   "Q/DQ around every quantized op so onnxruntime's CPU int8 kernels run")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="--target ort-cpu, 8-bit activations: int8 weights on 7 bits ([-63, 63]) so onnxruntime's u8s8 "
                   "kernels do not saturate on x86 CPUs without VNNI (default: on when this machine is one)")
@click.option("--report", type=click.Path(), default=None, help="report JSON path (default: beside the output)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gptq-candidate/--no-gptq-candidate", default=None,
              help="the held-out judge also weighs GPTQ's rounding of each one-op region (default: yes, except decoder LMs)")
@click.option("--gptq-grid-search/--no-gptq-grid-search", default=True, show_default=True,
              help="GPTQ picks each output channel's grid among multiples of its initial scale by the layer's "
                   "output error on the calibration data")
@click.option("--gptq-damp", type=float, default=QuantConfig.gptq_damp, show_default=True,
              help="GPTQ's damping as a fraction of the mean diagonal of XᵀX (a ridge towards round-to-nearest)")
@click.option("--bias-correction/--no-bias-correction", default=False, show_default=True,
              help="a Conv/Gemm region's bias absorbs the mean output error of its rounded weights (kept where "
                   "held-out calibration samples confirm it; off by default, see the README)")
@click.option("--gram-positions", type=int, default=QuantConfig.gram_positions, show_default=True,
              help="output positions over all calibration samples a conv's Gram statistics read (every k-th row "
                   "of a larger map; 0: all)")
@click.option("--no-judge", is_flag=True, hidden=True, help="ablation: keep learned weights even where RTN does better held out")
@click.option("--no-row-guard", is_flag=True, hidden=True, help="ablation: learn weights with too few calibration rows too")
@click.option("--element-lr-scale", type=float, default=None,
              help="FlexRound's per-weight S2 learns at this multiple of --lr (preset: fast 1, default/paper 0.3)")
@click.option("--checks", type=int, default=None,
              help="held-out checks per region; the best point is kept (preset: fast 0, default 10, paper 20)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@preprocess_options
@user_errors
def quantize(model, calib, output, method, weight_bits, act_bits, granularity, block_size, asymmetric, regions, preset, iters, batch_size,
             lr, act_lr, drop_prob, calib_size, augment, calib_method, first_last_bits, exclude, cle, awq, quantize_attention,
             tokenizer, max_length, seq_len, device, tf32, max_memory, stream_precision,
             target, reduce_range, report, seed, gptq_candidate, gptq_grid_search, gptq_damp, bias_correction, gram_positions,
             no_judge, no_row_guard,
             element_lr_scale, checks, quiet,
             preprocess, size, resize, mean, std):
    """Quantize MODEL with calibration data and write a QDQ ONNX model."""
    from .api import quantize as run_quantize

    cfg = QuantConfig(method=method, weight_bits=int(weight_bits), act_bits=int(act_bits), granularity=granularity,
                      block_size=block_size, asymmetric=asymmetric, regions=regions, preset=preset, iters=iters,
                      batch_size=batch_size, lr=lr,
                      act_lr=act_lr, drop_prob=drop_prob,
                      calib_size=calib_size, augment=augment, calib_method=calib_method, first_last_bits=first_last_bits or None,
                      exclude=list(exclude), cle=cle, awq=awq, quantize_act_matmul=quantize_attention, device=device, tf32=tf32, seed=seed,
                      max_memory=max_memory, stream_precision=stream_precision, target=target,
                      reduce_range=reduce_range,
                      judge=not no_judge, row_guard=not no_row_guard, gptq_candidate=gptq_candidate,
                      gptq_grid_search=gptq_grid_search, gptq_damp=gptq_damp,
                      bias_correction=bias_correction,
                      gram_positions=gram_positions,
                      element_lr_scale=element_lr_scale,
                      checks=checks, progress=not quiet)
    source = calib[0] if len(calib) == 1 else list(calib)
    result = run_quantize(model, output, source, cfg, preprocess=_preprocess(preprocess, size, resize, mean, std),
                          tokenizer=tokenizer, max_length=max_length, seq_len=seq_len, report=report)
    click.echo(result.format_table())
    click.echo(f"wrote {result.output}  (report: {result.report_path})")


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True,
              help="image folder (with labels.csv), .npy/.npz feeds, or a .txt file (one text per line, with --tokenizer)")
@click.option("--labels", default=None, help="labels.csv (columns file, class_index); default DATA/labels.csv")
@click.option("--ref", default=None, help="FP32 reference model for agreement / SQNR / cosine")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate only the first N samples (windows with --perplexity)")
@click.option("--output", "output_name", default=None, help="model output to score (default: the first float output)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--perplexity", "ppl", is_flag=True,
              help="decoder LMs: perplexity over --seq-len windows of the .txt (one token stream); with --ref also "
                   "KL(ref||model) and top-1 next-token agreement")
@click.option("--ort-opt", type=click.Choice(["disable", "basic", "all"]), default="disable", show_default=True,
              help="ORT graph optimisation; 'all' fuses Q/DQ into ORT-CPU int8 kernels (see README)")
@text_options
@preprocess_options
@user_errors
def eval_cmd(model, data, labels, ref, batch_size, limit, output_name, as_json, ppl, ort_opt, tokenizer, max_length, seq_len,
             preprocess, size, resize, mean, std):
    """Top-1/top-5, agreement with a reference, output SQNR (or embedding cosine); --perplexity for decoder LMs."""
    from .runtime.evaluate import evaluate

    if ppl:
        from pathlib import Path

        from .calib.text import is_text_file
        from .runtime.perplexity import perplexity

        if not is_text_file(data):
            raise OnnxflexError(f"--perplexity needs a .txt corpus as --data, got {data}")
        res = perplexity(model, Path(data), tokenizer, seq_len=seq_len, ref=ref, limit_windows=limit, optimization=ort_opt)
        click.echo(json.dumps(res.to_dict(), indent=2) if as_json else res.format_table())
        return

    rep = evaluate(model, data, labels=labels, ref=ref, preprocess=_preprocess(preprocess, size, resize, mean, std),
                   batch_size=batch_size, limit=limit, optimization=ort_opt, tokenizer=tokenizer, max_length=max_length,
                   output=output_name)
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rep.format_table())


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--regions", type=click.Choice(REGION_MODES), default="auto", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="flexround", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@user_errors
def inspect(model, regions, method, device):
    """List the quantizable ops with their weight shapes, and the regions `quantize` would use."""
    from .inspect import inspect_model

    click.echo(inspect_model(model, regions, method, device))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(TARGETS), default="tensorrt", show_default=True)
@user_errors
def check(model, target):
    """Check a QDQ model against TensorRT (or ORT CPU) explicit-quantization rules; exit 1 on errors."""
    from .checks.tensorrt import check_qdq_model, format_violations
    from .passes.prepare import load_model

    violations = check_qdq_model(load_model(model), target)
    if violations:
        click.echo(format_violations(violations))
    if any(v.severity == "error" for v in violations):
        sys.exit(1)
    if not violations:
        click.echo(f"ok: no {target} rule violations")


if __name__ == "__main__":
    main()
