"""Offline checkpoint tools: reading DeepSpeed checkpoints without DeepSpeed's engine, and writing
what they hold as models and adapters.

    ds_layout.py     what a DeepSpeed tag folder holds: the pickle allowlist, stage, ranks, dtype, completeness
    ds_weights.py    its weights, as sources read one tensor at a time (the fp32 masters of every ZeRO stage)
    pth_io.py        tensor files read and written one tensor at a time (.pth, .safetensors, HF dirs)
    peft_names.py    LoRA in PEFT's tensor names: folding pairs into base weights, the adapter file layout
    consolidate.py   `zerotrain consolidate`, and the HF-directory pieces the adapter commands share
    adapters.py      `zerotrain extract-adapter` and `merge-adapter`
    inspect.py       `zerotrain inspect`
"""
