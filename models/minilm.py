PREPROCESS = {}
def build_minilm(path, exporter="torchscript"):
    raise NotImplementedError
