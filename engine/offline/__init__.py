"""Offline checkpoint tools: reading DeepSpeed checkpoints without DeepSpeed's engine, and writing
what they hold as models and adapters.

    ds_layout.py     what a DeepSpeed tag folder holds: the pickle allowlist, stage, ranks, dtype, completeness
    ds_weights.py    its weights, as sources read one tensor at a time (the fp32 masters of every ZeRO stage)
    tensors.py       tensors one at a time: entries to write, sources read by byte range, scratch buffers
    safetensors_io.py  .safetensors files, written and read tensor by tensor
    pth_io.py        torch.save files: allowlisted unpickling, where each tensor lies, the streaming writer
    model_files.py   any state-dict file or model directory read as entries; OUTPUT checked and written
    peft_names.py    LoRA in PEFT's tensor names: folding pairs into base weights, the adapter file layout
    hf_dir.py        the rest of an HF model directory: transformers config, generation config, tokenizer
    consolidate.py   `zerotrain consolidate`
    adapters.py      `zerotrain extract-adapter` and `merge-adapter`
    inspect.py       `zerotrain inspect`
"""
