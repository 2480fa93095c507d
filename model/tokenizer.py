"""Tokenizers: train a byte-level BPE (MiniMind convention), load one, fingerprint one."""

import hashlib
import json
import types
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, generate_merges

from common.errors import ZerotrainError
from common.publish import publishing

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2
MODEL_MAX_LENGTH = 32768

# ChatML. Each message renders on its own, so rendering messages[:i] with the generation prompt is
# a prefix of rendering messages[:i + 1] when message i is the assistant's: the engine finds the
# assistant spans to train on that way.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it (save_pretrained) to `output_dir`.

    Every byte is in the initial alphabet, so any text round-trips exactly and there is no unknown
    token. The special tokens take ids 0 (pad), 1 (bos), 2 (eos); encoding adds none of them.
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ZerotrainError(f"tokenizer output_dir {output} is a file; give a directory path.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )

    # Saved under a temporary name and put in place once complete: an interrupted run never
    # leaves a half-written tokenizer (or destroys the previous one).
    with publishing(output, directory=True) as staging:
        wrapped.save_pretrained(staging)
    return wrapped


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """An HF tokenizer directory or a sentencepiece `.model` file, with a pad token (falling back
    to eos, then unk) and a chat template (ChatML unless it has one) set."""
    p = Path(path)
    if p.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ZerotrainError(f"cannot load a tokenizer from directory {p}: {e}") from e
    elif p.is_file() and p.suffix == ".model":
        tokenizer = _from_sentencepiece(p)
    elif p.exists():
        raise ZerotrainError(
            f"tokenizer {p} is neither a tokenizer directory (save_pretrained) "
            f"nor a sentencepiece .model file."
        )
    else:
        raise ZerotrainError(
            f"tokenizer {p} does not exist; check the path, or train a tokenizer first "
            f"(zerotrain train-tokenizer)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 hex digest of the vocabulary, merges, normalisation, special tokens and chat template.

    Padding and truncation settings are left out: transformers changes them on the backend when
    asked to pad or truncate, which does not change the ids a text encodes to.
    """
    if hasattr(tokenizer, "backend_tokenizer"):
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("padding", None)
        backend.pop("truncation", None)
    else:
        backend = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token]
    blob = json.dumps([backend, special, tokenizer.chat_template], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class _MergesFromScores:
    """What SpmConverter expects of its extractor for BPE models: the vocab and merges ordered by
    score. (The extractor transformers 5 gives it has a different signature and fails.)"""

    def __init__(self, model_file: str):
        pass

    def extract(self, vocab_scores: list[tuple[str, float]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
        vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
        return vocab, generate_merges(vocab, vocab_scores)


class _SentencePieceConverter(SpmConverter):
    """transformers' generic sentencepiece converter, following the .model file's own settings
    (unigram or BPE, byte fallback, dummy prefix, whitespace folding) so ids match sentencepiece's."""

    SpmExtractor = _MergesFromScores
    handle_byte_fallback = True  # set per model in __init__; True here only silences a warning

    def __init__(self, model_file: Path):
        super().__init__(types.SimpleNamespace(vocab_file=str(model_file)))
        self.handle_byte_fallback = self.proto.trainer_spec.byte_fallback
        self.original_tokenizer.add_prefix_space = self.proto.normalizer_spec.add_dummy_prefix

    def normalizer(self, proto):
        spec = proto.normalizer_spec
        steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
        if spec.remove_extra_whitespaces:
            steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
        return normalizers.Sequence(steps)

    def decoder(self, replacement, add_prefix_space):
        steps = [decoders.Replace(replacement, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        return decoders.Sequence(steps)


def _from_sentencepiece(model_file: Path) -> PreTrainedTokenizerFast:
    # transformers 5 can only read .model files through protobuf; without it AutoTokenizer falls
    # back to tiktoken and fails, and LlamaTokenizerFast(vocab_file=...) silently builds an empty vocab.
    try:
        converter = _SentencePieceConverter(model_file)
    except ImportError as e:
        raise ZerotrainError(f"reading sentencepiece {model_file} needs protobuf: pip install protobuf") from e
    except Exception as e:  # protobuf's DecodeError and the like
        raise ZerotrainError(f"{model_file} is not a readable sentencepiece model: {e}") from e
    spec = converter.proto.trainer_spec
    pieces = converter.proto.pieces

    def piece(token_id: int) -> str | None:  # sentencepiece marks a token it lacks with id -1
        return pieces[token_id].piece if token_id >= 0 else None

    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        unk_token=piece(spec.unk_id),
        bos_token=piece(spec.bos_id),
        eos_token=piece(spec.eos_id),
        pad_token=piece(spec.pad_id),
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
