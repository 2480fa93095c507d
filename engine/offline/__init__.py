"""Offline checkpoint tools: reading DeepSpeed checkpoints without DeepSpeed's engine, and writing
what they hold as models and adapters.

    ds_layout.py     DeepSpeed checkpoint folders: the pickle allowlist, what a tag holds, its weights
    pth_io.py        tensor files read and written one tensor at a time (.pth, .safetensors, HF dirs)
    peft_names.py    LoRA in PEFT's tensor names: folding pairs into base weights, the adapter file layout
    consolidate.py   `zerotrain consolidate`, and the HF-directory pieces the adapter commands share
    adapters.py      `zerotrain extract-adapter` and `merge-adapter`
    inspect.py       `zerotrain inspect`
"""
