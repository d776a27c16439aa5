"""What crosses between yagg's stages, each in the one module that both the writing and the reading side import.

    records.py       the training record: one example's bytes (pipeline writes, train and eval read)
    dataset.py       dataset_info.json as a typed `DatasetInfo`, and the facts sampling needs (`DataFacts`)
    conditioning.py  captions -> the text condition arrays, exactly as records store them (pipeline, samplers)
    media.py         model space <-> uint8 pixels, and GIFs at a frame rate (train, eval, inference, serve)
    checkpoint.py    a training workdir's checkpoints: item names, the writer, a read-only reader (train; readers)
    export.py        an exported model folder (`yagg export` writes; inference and serve read)
    scores.py        the eval job's metrics.jsonl (eval writes; its gallery and `yagg export` read)
    storage.py       the path layer every user-given path goes through: local paths and gs:// alike

Nothing here imports a stage (pipeline, train, eval, inference, serve); tests/test_imports.py enforces it.
"""
