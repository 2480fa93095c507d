"""Checkpoints of a live run, and the run directory they live in.

    run_dir.py    what a run directory holds, how tags are named, what a path given as a model is
    save.py       saving a tag so `latest` only ever names a complete one; --keep-last
    resume.py     which tag to resume from, loading it back (another world size through universal)
    sidecar.py    zerotrain.json: what the shards do not say (config, data, LoRA, file manifest)
    checksums.py  whole-file digests of a tag, hashed in the background, checked on every read
    rng.py        the random state each rank saves
    export.py     final/ (HF model, tokenizer, adapter) from the live engine
"""
