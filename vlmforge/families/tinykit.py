"""The tiny-model kit: a deterministic byte-level BPE tokenizer trained locally (no download) for test models.

Every family's ``make_tiny`` builds its tokenizer here, so special-token ids are the same in every family.
Importing this module imports ``tokenizers`` and ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS: tuple[str, ...] = (
    "Question: which city is this? Answer: Paris.",
    "Question: what color is the car? Answer: red.",
    "Question: how many cats are there? Answer: two.",
    "A photo of a cat sitting on a red couch.",
    "A picture of two dogs playing in the snow near a tree.",
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A city street with a stop sign.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "# Introduction\n\nWe propose a model for optical character recognition of $x^2 + y^2 = z^2$.",
    "\\begin{equation} E = mc^2 \\end{equation} [1] Table 2: results (%).",
)
"""Text the tiny models' byte-level BPE is trained on (prompts, captions, markup)."""

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
"""Special tokens of every tiny tokenizer; their ids 0..4 are the same in every family."""
BOS_ID, PAD_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

Template = Literal["bos", "eos", "none"]
"""Post-processing of a single sequence: ``<s> $A`` (LLaMA, OPT), ``$A </s>`` (T5) or nothing."""


def pil_image_processor(name: str, **settings: Any) -> Any:
    """transformers' PIL image processor ``name`` (e.g. ``CLIPImageProcessor``): ``<name>Pil`` in transformers 5,
    ``<name>`` itself in 4.57 (NVIDIA's TensorRT-LLM 1.2 image, where the trtllm selftest makes a tiny model)."""
    import transformers

    processor_class = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return processor_class(**settings)


def train_bpe_tokenizer(vocab_size: int = 320, template: Template = "bos", corpus: Sequence[str] = CORPUS) -> Tokenizer:
    """A byte-level BPE trained on ``corpus`` (deterministic: same vocab and merges every time)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    if template == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    elif template == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
        )
    return tok


def make_fast_tokenizer(
    template: Template = "bos", vocab_size: int = 320, image_token: bool = True, corpus: Sequence[str] = CORPUS,
    **kwargs: Any,
) -> PreTrainedTokenizerFast:
    """The trained BPE wrapped as a transformers fast tokenizer (saved as ``TokenizersBackend``).

    ``image_token`` registers ``<image>`` as the tokenizer's ``image_token`` attribute (LLaVA's
    processor reads it; BLIP-2's processor must own it instead). ``corpus``: what the BPE is trained on
    (a family with a long chat template adds it, so its prompts take as many tokens as a real tokenizer's would).
    """
    extra = {"image_token": "<image>"} if image_token else {}
    kwargs.setdefault("model_input_names", ["input_ids", "attention_mask"])  # LLaMA's, OPT's and T5's tokenizers;
    # transformers 4.57's default adds token_type_ids, which the models' generate() refuses
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(vocab_size, template, corpus),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        **kwargs,
    )
