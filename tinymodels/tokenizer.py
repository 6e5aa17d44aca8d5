"""A tiny byte-level BPE tokenizer, trained locally, with a ChatML chat template.

The tokenizer is trained with the `tokenizers` library on a small English corpus that is
generated in code (no downloads), wrapped as a transformers ``PreTrainedTokenizerFast`` and
saved with ``save_pretrained``.  It is byte-level (GPT-2 style), so any text round-trips, and
it can be described in a GGUF file (``tokenizer.ggml.model = "gpt2"``).

Special tokens always get the same ids:

====  ==================
id    token
====  ==================
0     ``<pad>``
1     ``<s>`` (bos)
2     ``</s>`` (eos)
3     ``<unk>``
4     ``<|im_start|>``
5     ``<|im_end|>``
====  ==================
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START, IM_END)
"""Special tokens, in id order (``<pad>`` is 0)."""

PAD_ID, BOS_ID, EOS_ID, UNK_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

MODEL_MAX_LENGTH = 256

CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- generation -%}\n"
    "{{- message['content'] + '<|im_end|>' -}}\n"
    "{%- endgeneration -%}\n"
    "{{- '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)
"""ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

Assistant content is wrapped in ``{% generation %}`` markers so TRL's ``assistant_only_loss``
works; rendering is otherwise identical to the plain ChatML template.
"""

_SUBJECTS = (
    "the cat",
    "a dog",
    "my friend",
    "the model",
    "our team",
    "the old man",
    "a small bird",
    "the teacher",
    "this server",
    "the river",
    "a young girl",
    "the robot",
    "the city",
    "your sister",
    "the engineer",
    "a farmer",
)
_VERBS = (
    "runs",
    "sees",
    "likes",
    "builds",
    "reads",
    "writes",
    "finds",
    "follows",
    "helps",
    "answers",
    "loads",
    "sends",
    "keeps",
    "opens",
    "paints",
    "remembers",
)
_OBJECTS = (
    "the ball",
    "a long letter",
    "the red house",
    "some water",
    "the answer",
    "a new song",
    "the blue sky",
    "every request",
    "the green field",
    "a warm meal",
    "the small boat",
    "a quiet room",
    "the last train",
    "a good book",
    "the morning light",
    "the data",
)
_ENDINGS = (
    "today",
    "in the morning",
    "after lunch",
    "every day",
    "with care",
    "very quickly",
    "at night",
    "before the rain",
    "without a word",
    "again and again",
    "near the sea",
    "for a while",
)
_QUESTIONS = (
    "What is the capital of France?",
    "How are you today?",
    "Can you help me?",
    "Why is the sky blue?",
    "Where does the river go?",
    "Who wrote this book?",
    "What time is it?",
    "How many cats are there?",
    "Is it going to rain?",
    "What do you think about the model?",
    "Could you write a short poem?",
    "Please summarize the text.",
    "Tell me a story about a robot.",
)
_ANSWERS = (
    "Paris is the capital of France.",
    "I am fine, thank you.",
    "Of course, I can help.",
    "The sky is blue because of the light.",
    "The river goes to the sea.",
    "A famous writer wrote it.",
    "It is nine o'clock.",
    "There are 3 cats.",
    "Yes, it will rain tomorrow.",
    "The model is small but real.",
    "Roses are red, the sky is blue.",
    "The text is about a cat and a dog.",
    "Once upon a time, a robot learned to paint.",
)


def build_corpus(num_sentences: int = 400, seed: int = 0) -> list[str]:
    """Return a small deterministic English corpus (sentences, Q&A pairs, numbers, code)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(num_sentences):
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
        )
        lines.append(sentence[0].upper() + sentence[1:])
    for question, answer in itertools.product(_QUESTIONS, _ANSWERS[:4]):
        lines.append(f"Q: {question} A: {answer}")
    lines.extend(_ANSWERS)
    for question, answer in zip(_QUESTIONS, _ANSWERS, strict=True):
        lines.append(f"system\nYou are a helpful assistant.\nuser\n{question}\nassistant\n{answer}\n")
    lines.extend(f"{i} + {i + 1} = {2 * i + 1}" for i in range(0, 100, 7))
    lines.extend(
        [
            "def hello(name):\n    return 'Hello, ' + name",
            "for i in range(10):\n    print(i)",
            '{"key": "value", "number": 42}',
            "User: hello\nAssistant: Hi! How can I help you?",
        ]
    )
    return lines


def train_backend_tokenizer(vocab_size: int = 512, seed: int = 0) -> Tokenizer:
    """Train the raw ``tokenizers.Tokenizer`` (byte-level BPE) on :func:`build_corpus`.

    The final vocabulary may be smaller than ``vocab_size`` if the corpus runs out of merges.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(byte_alphabet) + len(SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(build_corpus(seed=seed), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} did not get id {token_id}")
    return tokenizer


def train_llama_backend_tokenizer(vocab_size: int = 512, seed: int = 0) -> Tokenizer:
    """Train a Llama-style tokenizer: BPE over ``▁``-marked words with byte fallback.

    The shape of Llama 2's and Mistral's ``tokenizer.json`` (a ``▁`` prepended and spaces
    replaced by ``▁``, ``<0x00>``..``<0xFF>`` byte tokens after the special tokens, a
    ``Sequence`` decoder), which llama.cpp's converter turns into a ``llama`` (SentencePiece)
    GGUF vocabulary without knowing the tokenizer in advance; the byte-level one needs its
    pre-tokenizer registered in the converter.
    """
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    if vocab_size < len(byte_tokens) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(byte_tokens) + len(SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Words are split only while training (merges stay inside a word), as SentencePiece does.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *byte_tokens],
        show_progress=False,
    )
    tokenizer.train_from_iterator(build_corpus(seed=seed), trainer=trainer)
    tokenizer.pre_tokenizer = None
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} did not get id {token_id}")
    return tokenizer


def make_tokenizer(vocab_size: int = 512, seed: int = 0, style: str = "byte_level"):
    """Return an in-memory ``PreTrainedTokenizerFast`` (trained + chat template).

    ``style`` is ``"byte_level"`` (GPT-2 style, the default) or ``"llama"``
    (:func:`train_llama_backend_tokenizer`: what llama.cpp's GGUF converter reads as is).
    """
    from transformers import PreTrainedTokenizerFast

    if style == "llama":
        backend = train_llama_backend_tokenizer(vocab_size=vocab_size, seed=seed)
    elif style == "byte_level":
        backend = train_backend_tokenizer(vocab_size=vocab_size, seed=seed)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    *,
    seed: int = 0,
    separate_chat_template_file: bool = False,
) -> Path:
    """Train a tiny byte-level BPE tokenizer and save it to ``out_dir``.

    Writes ``tokenizer.json`` and ``tokenizer_config.json``.  The ChatML chat template goes
    into ``tokenizer_config.json`` (key ``chat_template``) by default; with
    ``separate_chat_template_file=True`` it is written to ``chat_template.jinja`` instead
    (this is what transformers 5's ``save_pretrained`` does by default).

    Args:
        out_dir: directory to create/fill.
        vocab_size: target vocabulary size (including the 6 special tokens and 256 bytes);
            the real size may be a little smaller, read it with ``len(tokenizer)``.
        seed: seed for the generated corpus.
        separate_chat_template_file: write ``chat_template.jinja`` instead of embedding it.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size=vocab_size, seed=seed)
    save_tokenizer(tokenizer, out, separate_chat_template_file=separate_chat_template_file)
    return out


def save_tokenizer(tokenizer, out_dir: Path, *, separate_chat_template_file: bool = False) -> None:
    """Save ``tokenizer`` with the chat template embedded or in ``chat_template.jinja``."""
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=separate_chat_template_file)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if separate_chat_template_file:
        config.pop("chat_template", None)
    else:
        (out_dir / "chat_template.jinja").unlink(missing_ok=True)
        config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
