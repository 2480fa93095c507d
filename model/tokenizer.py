"""Tokenizers: train a byte-level BPE (MiniMind convention), extend one with new text's pieces
(Chinese-LLaMA-Alpaca-2's vocabulary extension), load one, fingerprint one."""

import hashlib
import io
import json
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, generate_merges

from common.errors import ZerotrainError
from common.publish import publishing

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2
MODEL_MAX_LENGTH = 32768
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "default_tokenizer"
"""Shipped with zerotrain (built by scripts/make_default_tokenizer.py): a run from scratch without --tokenizer."""

# ChatML. Each message renders on its own, so rendering messages[:i] with the generation prompt is
# a prefix of rendering messages[:i + 1] when message i is the assistant's: the engine finds the
# assistant spans to train on that way (engine.data.chat, whose fast path follows this rule).
# Reasoning models: an assistant message's non-empty `reasoning_content` renders before its reply
# as `<think>\n...\n</think>\n`, for every turn (Qwen3's template drops earlier turns' reasoning,
# which would break that prefix rule), unless the reply already starts with `<think>`. The thinking
# switch is Qwen3's: `enable_thinking=False` closes an empty think block after the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set reasoning = message['reasoning_content'] if message['role'] == 'assistant' else none %}"
    "{%- if reasoning is string and reasoning and not message['content'].startswith('<think>') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n<think>\\n' + reasoning + '\\n</think>\\n' + message['content']"
    " + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n' }}{%- endif %}"
    "{%- endif %}"
)
# The template before reasoning: tokenizers saved earlier (run directories, train-tokenizer's output)
# carry it. It renders messages without reasoning exactly as CHAT_TEMPLATE does.
CHATML_WITHOUT_REASONING = (
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


@dataclass
class Extension:
    """What extend_tokenizer did: the extended tokenizer, and the input's token counts before and after."""

    tokenizer: PreTrainedTokenizerBase
    base_size: int
    added: int
    characters: int
    tokens_before: int
    tokens_after: int


def extend_tokenizer(base: str, texts: Iterable[str], add_vocab: int, output_dir: str) -> Extension:
    """Learn up to `add_vocab` new tokens from `texts` and append them to `base`, every id of `base`
    kept (its vocabulary is a prefix of the result), special tokens and chat template included; save
    the result to `output_dir` (save_pretrained, plus tokenizer.model for a sentencepiece base).

    `base` is a byte-level BPE tokenizer directory (new merges after the base's) or a sentencepiece
    `.model` file (a model of `add_vocab` pieces trained on `texts`, the pieces the base lacks merged
    into its proto as Chinese-LLaMA-Alpaca-2's merge_tokenizers.py does).
    """
    if add_vocab < 1:
        raise ZerotrainError(f"--add-vocab must be a positive number of new tokens, got {add_vocab}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ZerotrainError(f"tokenizer output_dir {output} is a file; give a directory path.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ZerotrainError("the input holds no text to learn new tokens from")
    old = load_tokenizer(base)
    with publishing(output, directory=True) as staging:
        if Path(base).is_file():  # load_tokenizer took it, so a sentencepiece .model
            model_file = staging / "tokenizer.model"
            model_file.write_bytes(_merge_sentencepiece(Path(base), texts, add_vocab))
            new = load_tokenizer(str(model_file))
        else:
            new = _extend_byte_level_bpe(old, texts, add_vocab, base)
        new.save_pretrained(staging)
    return Extension(new, len(old), len(new) - len(old), sum(len(t) for t in texts),
                     _count_tokens(old, texts), _count_tokens(new, texts))


def id_changes(base: PreTrainedTokenizerBase, extended: PreTrainedTokenizerBase) -> list[str]:
    """The tokens of `base` that `extended` lacks or gives another id, as `'tok' 5 -> 7`, in id order;
    empty when `extended` keeps every id of `base`."""
    new = extended.get_vocab()
    return [f"{token!r} {i} -> {new.get(token, 'absent')}"
            for token, i in sorted(base.get_vocab().items(), key=lambda item: item[1]) if new.get(token) != i]


# A base token id as one character for the merge learner: code points from U+10000 on are never
# whitespace (which separates words) nor surrogates.
_FIRST_SYMBOL = 0x10000


def _spelled_in_base_tokens(backend: Tokenizer, texts: list[str]) -> Iterable[str]:
    """Each text as the base tokenizer splits it: its words separated by spaces, each word its base
    tokens, one symbol a token (added tokens left out: they never merge)."""
    added = set(backend.get_added_tokens_decoder())
    for start in range(0, len(texts), 1024):
        for encoding in backend.encode_batch(texts[start:start + 1024], add_special_tokens=False):
            words: dict[int, list[str]] = {}
            for token_id, word in zip(encoding.ids, encoding.word_ids):
                if word is not None and token_id not in added:
                    words.setdefault(word, []).append(chr(_FIRST_SYMBOL + token_id))
            yield " ".join("".join(word) for word in words.values())


def _count_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    return sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))


def _extend_byte_level_bpe(old: PreTrainedTokenizerBase, texts: list[str], add_vocab: int,
                           where: str) -> PreTrainedTokenizerFast:
    """`add_vocab` merges learned from `texts` appended after the base's merges, each new token taking
    the next free id.

    Appended merges rank after every merge of the base, so encoding applies the base's first: a merge
    can only fire on the base's segmentation of a word. So tokenizers' BpeTrainer learns them there:
    on the words of `texts` spelled in base tokens, one symbol a token.
    """
    spec = json.loads(old.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if model["type"] != "BPE" or "ByteLevel" not in kinds:
        raise ZerotrainError(f"tokenizer {where} is a {model['type']} model with a {pre.get('type')} pre-tokenizer; "
                             "extend-tokenizer extends byte-level BPE tokenizer directories (train-tokenizer's, "
                             "GPT-2's) and sentencepiece .model files: pass its tokenizer.model if it has one")
    spelled = list(_spelled_in_base_tokens(old.backend_tokenizer, texts))
    symbols = set("".join(spelled)) - {" "}
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    learner.train_from_iterator(spelled, trainers.BpeTrainer(vocab_size=len(symbols) + add_vocab, min_frequency=2,
                                                             show_progress=False))
    vocab = old.get_vocab()  # added tokens included: a new token never takes their text or id
    token_of = {i: token for token, i in vocab.items()}

    def spell(word: str) -> str:
        return "".join(token_of[ord(symbol) - _FIRST_SYMBOL] for symbol in word)

    next_id = max(vocab.values()) + 1
    # In the order learned, so each merge's parts are base tokens or earlier merges' results.
    for left, right in json.loads(learner.to_str())["model"]["merges"]:
        left, right = spell(left), spell(right)
        token = left + right
        if token in vocab or left not in model["vocab"] or right not in model["vocab"]:
            continue  # the base spells this text another way already
        vocab[token] = model["vocab"][token] = next_id
        model["merges"].append([left, right])
        next_id += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=old.bos_token,
        eos_token=old.eos_token,
        unk_token=old.unk_token,
        pad_token=old.pad_token,
        extra_special_tokens=old.extra_special_tokens,
        chat_template=old.chat_template,
        model_max_length=old.model_max_length,
        clean_up_tokenization_spaces=old.clean_up_tokenization_spaces,
    )


def _merge_sentencepiece(model_file: Path, texts: list[str], add_vocab: int) -> bytes:
    """The serialized .model of `model_file` with the pieces it lacks of a sentencepiece model trained
    on `texts` (same model type and normalization, `add_vocab` pieces and an unk) appended."""
    from sentencepiece import SentencePieceTrainer
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    normalizer, spec = proto.normalizer_spec, proto.trainer_spec
    learned_bytes = io.BytesIO()
    try:
        SentencePieceTrainer.train(
            sentence_iterator=(line for text in texts for line in text.splitlines() if line.strip()),
            model_writer=learned_bytes, vocab_size=add_vocab + 1, hard_vocab_limit=False,
            model_type=model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower(),
            normalization_rule_name=normalizer.name or "identity", add_dummy_prefix=normalizer.add_dummy_prefix,
            remove_extra_whitespaces=normalizer.remove_extra_whitespaces, split_digits=spec.split_digits,
            bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise ZerotrainError(f"sentencepiece could not learn {add_vocab} pieces from the input to extend "
                             f"{model_file} (its vocab_size is --add-vocab + 1): {e}") from None
    learned = model_pb2.ModelProto()
    learned.ParseFromString(learned_bytes.getvalue())
    present = {p.piece for p in proto.pieces}
    lowest = min((p.score for p in proto.pieces), default=0.0)
    new = [p for p in learned.pieces if p.type == model_pb2.ModelProto.SentencePiece.NORMAL and p.piece not in present]
    for rank, piece in enumerate(new, start=1):
        # A BPE model merges by score, highest first: new pieces below every base piece, in learned
        # order, leave the base's merges their priority. A unigram model's scores are
        # log-probabilities: the new pieces keep those the new text gave them.
        score = lowest - rank if spec.model_type == model_pb2.TrainerSpec.BPE else piece.score
        proto.pieces.append(model_pb2.ModelProto.SentencePiece(piece=piece.piece, score=score))
    spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, *, chat_template: bool = True) -> str:
    """A sha256 hex digest of the vocabulary, merges, normalisation, special tokens and chat template
    (`chat_template=False`: of what maps text to ids alone, for models that must share ids but not
    how conversations are rendered: a teacher and its student).

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
    template = tokenizer.chat_template if chat_template else None
    blob = json.dumps([backend, special, template], sort_keys=True, ensure_ascii=False)
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
