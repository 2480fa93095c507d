"""Data: raw files -> checked records -> token files on disk -> sharded, resumable batches.

    kinds.py          the data kinds (pretrain, sft, pref), declared in one place
    text.py           pretrain: documents -> one token stream, read as fixed-length windows
    conversations.py  sft: conversations in the common shapes -> labelled sequences
    pairs.py          pref: preference pairs -> a chosen and a rejected sequence each
    chat.py           messages -> the chat template's text -> labelled tokens (the trained-token rule)
    columns.py        --columns mappings for records in a shape of their own
    files.py          raw file readers with file:line errors
    prepare.py        raw files -> a prepared directory, once, keyed by contents (writer.py writes it)
    format.py         what a prepared directory holds, and reading it back
    sources.py        --data entries: kinds, files and mixing weights
    collate.py        examples -> micro-batches (stack, pad, pack)
    loader.py         mixtures, the sharded resumable sampler, this rank's batches, validation batches

All loss masking happens while the data is prepared (labels are IGNORE_INDEX everywhere but the
tokens trained on); the collators only pad or pack.
"""
