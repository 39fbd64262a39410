"""Names shared by conf.toml and the code that acts on them: one place each.

Import-free, as timm's `data/constants.py` is: the config checks values
against these tuples, the modules that act on a name look it up in a
registry keyed by the same names, and a test holds each registry to its
tuple. Adding a choice starts here.
"""

# [data]
DECODE_MODES = ("fast", "full")
FINGERPRINTS = ("stat", "content")

# [backbone]
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

# [extract] and [finetune]
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
ENGINES = ("auto", "torch", "onnxruntime")
DECODERS = ("auto", "pillow", "nvjpeg")
# Poolings: these, and grid:K for spatial maps (features.pooling parses them).
SPATIAL_POOLINGS = ("avg", "max", "avg+max")
TOKEN_POOLINGS = ("cls", "patch_avg", "cls+patch_avg")

# [train]
CLASSIFIERS = ("logistic", "linear_svm", "svm", "sgd")
PREPROCESS_STEPS = ("standardize", "l2", "pca")
CLASS_WEIGHTS = ("none", "balanced")
SCORINGS = ("accuracy", "balanced_accuracy", "f1_macro")
TRAIN_VIEWS = ("first", "all")

# [finetune]
INITS = ("pretrained", "scratch")
# The new head: "probe" starts it from a linear probe on the top-layer codes
# (LP-FT), "random" from the usual initialisation, "auto" probe when pretrained.
HEAD_INITS = ("auto", "probe", "random")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("auto", "standard", "trivialaugment", "none")
# BatchNorm statistics while fine-tuning: updated ("train") or kept from the
# pretrained network ("frozen"); "auto": frozen with a probe head (LP-FT).
BATCHNORMS = ("auto", "train", "frozen")
MONITORS = ("accuracy", "balanced_accuracy", "loss")
LR_SCALINGS = ("none", "linear")

# [export]
INPUT_DTYPES = ("uint8", "float32")
INT8_MODES = ("none", "static", "dynamic")

# [run]
MODEL_KINDS = ("codes", "finetune")
MODEL_CHOICES = ("latest", *MODEL_KINDS)
LOG_LEVELS = ("debug", "info", "warning", "error")
# run.strategy: "auto" (the advisor picks), a case number, or its name.
STRATEGIES = {
    "auto": "auto",
    "1": "1",
    "2": "2",
    "3": "3",
    "4": "4",
    "linear_top": "1",
    "linear_early": "2",
    "finetune": "3",
    "scratch": "4",
}
