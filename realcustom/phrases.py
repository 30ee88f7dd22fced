"""Locate target phrases ("the real words") in a prompt, on token boundaries.

The official code finds a phrase with a plain substring search, so "dog" also hits inside
"hotdog". Here a phrase matches only where it starts and ends on word boundaries, case-insensitive
(CLIP lower-cases text anyway), and every occurrence is marked. Token indices count the BOS
token as index 0, as in the text encoder's 77-token sequence. Torch-free.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from realcustom.tokenizer import CLIP_CONTEXT_LENGTH

# Tokens available to prompt text: the context minus BOS and EOS.
MAX_PROMPT_TOKENS = CLIP_CONTEXT_LENGTH - 2


class PhraseNotFoundError(ValueError):
    """The target phrase does not occur in the prompt as whole words."""


class PromptTooLongError(ValueError):
    """The prompt needs more tokens than the text encoder reads."""


def count_prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Number of BPE tokens of the prompt text, without BOS/EOS."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def check_prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> None:
    count = count_prompt_tokens(tokenizer, prompt)
    if count > MAX_PROMPT_TOKENS:
        raise PromptTooLongError(
            f"the prompt is {count} tokens long; the text encoder reads at most {MAX_PROMPT_TOKENS}. "
            "Shorten the prompt."
        )


def _phrase_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    words = phrase.split()
    if not words:
        raise PhraseNotFoundError("the target phrase is empty; give a word of the prompt, e.g. 'dog'")
    # Whole words only, any run of whitespace between the phrase's words.
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in words) + r"(?!\w)"
    return [match.span() for match in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def locate_phrase(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str) -> list[int]:
    """Indices (BOS = 0) of every token covered by every whole-word occurrence of `phrase`."""
    spans = _phrase_spans(prompt, phrase)
    if not spans:
        raise PhraseNotFoundError(
            f"target phrase {phrase!r} does not occur as whole words in the prompt {prompt!r}; "
            "use a word or words that appear in the prompt"
        )
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    indices = sorted(
        {
            token_index + 1  # +1: BOS precedes the prompt tokens
            for start, end in spans
            for token_index, (token_start, token_end) in enumerate(offsets)
            if token_start < end and token_end > start
        }
    )
    if not indices or indices[-1] > MAX_PROMPT_TOKENS:
        raise PromptTooLongError(
            f"target phrase {phrase!r} lies beyond the {MAX_PROMPT_TOKENS} tokens the text encoder reads; "
            "move it earlier or shorten the prompt"
        )
    return indices


def target_token_indicator(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str) -> list[float]:
    """The official τ vector: 1.0 at the phrase's tokens, 0.0 elsewhere, length 77."""
    indicator = [0.0] * CLIP_CONTEXT_LENGTH
    for index in locate_phrase(tokenizer, prompt, phrase):
        indicator[index] = 1.0
    return indicator
