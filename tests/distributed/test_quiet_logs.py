"""A 2-rank run prints one copy of its output: the libraries' warnings, logs and progress bars
come from rank 0 alone, each once; --verbose brings every rank's back."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.helpers import SAMPLES, cli_flags, run_launcher

pytestmark = pytest.mark.distributed

TIMESTAMP = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] ")  # DeepSpeed's log prefix: equal lines, other times


def repeated_lines(output: str) -> dict[str, int]:
    """Lines printed more than once, leaving out zerotrain's own lines, progress bars (redrawn with
    \\r) and the source line Python prints under a warning (its header line is counted)."""
    lines = [TIMESTAMP.sub("", line) for line in output.splitlines()]
    counted = [line for line in lines if line.strip() and "[zerotrain]" not in line and "\r" not in line
               and not line.startswith(" ")]
    return {line: n for line, n in Counter(counted).items() if n > 1}


def sft_output(base_model_dir, out, *extra: str) -> str:
    """stdout + stderr of a short LoRA run, tied embeddings in modules_to_save (peft warns about
    those) and a merged model at the end (peft is called again: its warnings come again)."""
    proc = run_launcher("sft.py", cli_flags({
        "init-from": base_model_dir, "data": SAMPLES / "sharegpt_identity_500.json", "output-dir": out,
        "max-steps": 2, "seq-len": 32, "micro-batch-size": 2, "eval-interval": 2, "eval-samples": 4,
        "lora-r": 4, "lora-modules-to-save": "embed_tokens,lm_head", "merge-lora-at-end": "true"}) + list(extra))
    return proc.stdout + proc.stderr


def test_ranks_print_one_copy_and_verbose_brings_them_back(base_model_dir, tmp_path):
    quiet = sft_output(base_model_dir, tmp_path / "quiet")
    assert repeated_lines(quiet) == {}, quiet
    assert quiet.count("Setting accelerator") <= 1, quiet
    assert len(re.findall(r"Loading weights:\s+0%", quiet)) <= 1, quiet  # transformers' bar, rank 0's only
    assert "ensure_weight_tying" not in quiet, quiet  # separate trained copies are meant, not a mistake

    verbose = sft_output(base_model_dir, tmp_path / "verbose", "--verbose")
    assert repeated_lines(verbose), verbose
    assert len(re.findall(r"Loading weights:\s+0%", verbose)) >= 2, verbose
