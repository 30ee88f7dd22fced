"""Target phrases are located on token boundaries with the real CLIP tokenizer."""

from __future__ import annotations

import pytest

from realcustom.phrases import (
    MAX_PROMPT_TOKENS,
    PhraseNotFoundError,
    PromptTooLongError,
    check_prompt_length,
    locate_phrase,
    target_token_indicator,
)
from realcustom.tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_tokenizer_gives_real_clip_ids(tokenizer) -> None:
    # Reference ids of CLIP's tokenizer for this sentence.
    assert tokenizer("a photo of a dog")["input_ids"] == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_bigg_tokenizer_pads_with_exclamation_mark() -> None:
    ids = load_clip_tokenizer(pad_token="!")("a dog", padding="max_length", max_length=6)["input_ids"]
    assert ids == [49406, 320, 1929, 49407, 0, 0]


@pytest.mark.parametrize(
    ("prompt", "phrase", "expected"),
    [
        ("This dog is wearing a spacesuit in space", "dog", [2]),  # the official example
        ("a hotdog next to a dog", "dog", [6]),  # not inside "hotdog" (the official substring bug)
        ("a dog and another dog", "dog", [2, 5]),  # every occurrence
        ("a Dog in the snow", "dog", [2]),  # CLIP lower-cases, so matching does too
        ("a dog with the pink hat sits", "dog with the pink hat", [2, 3, 4, 5, 6]),  # multi-word
        ("a dog  with   the pink hat", "dog with the pink hat", [2, 3, 4, 5, 6]),  # any whitespace
        ("a stuffed animal on the beach", "stuffed animal", [2, 3]),
        ("a teapot, on a table", "teapot", [2]),  # punctuation is a boundary
    ],
)
def test_locate_phrase(tokenizer, prompt: str, phrase: str, expected: list[int]) -> None:
    assert locate_phrase(tokenizer, prompt, phrase) == expected


def test_multi_token_word_marks_all_its_tokens(tokenizer) -> None:
    prompt = "a photo of a supercalifragilistic creature"
    indices = locate_phrase(tokenizer, prompt, "supercalifragilistic")
    assert len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1))


def test_several_phrases_in_one_prompt(tokenizer) -> None:
    prompt = "a cat sitting next to a can on the grass"
    assert locate_phrase(tokenizer, prompt, "cat") == [2]
    assert locate_phrase(tokenizer, prompt, "can") == [7]


@pytest.mark.parametrize(
    ("prompt", "phrase"), [("a hotdog on a plate", "dog"), ("a cat", "dog"), ("a cat", "  ")]
)
def test_missing_phrase_is_a_clear_error(tokenizer, prompt: str, phrase: str) -> None:
    with pytest.raises(PhraseNotFoundError, match=r"prompt|empty"):
        locate_phrase(tokenizer, prompt, phrase)


def test_indicator_is_the_official_tau(tokenizer) -> None:
    tau = target_token_indicator(tokenizer, "a red dog sits on grass", "red dog")
    assert len(tau) == 77 and [i for i, v in enumerate(tau) if v] == [2, 3]


def test_prompt_too_long(tokenizer) -> None:
    prompt = " ".join(["dog"] * (MAX_PROMPT_TOKENS + 1))
    with pytest.raises(PromptTooLongError, match="at most 75"):
        check_prompt_length(tokenizer, prompt)
    check_prompt_length(tokenizer, " ".join(["dog"] * MAX_PROMPT_TOKENS))


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("two dogs near a doghouse and a dog", [9]),  # neither "dogs" nor "doghouse" is "dog"
        ("a dog, dogs and dogged dogs", [2]),
    ],
)
def test_phrase_must_end_on_a_word_boundary(tokenizer, prompt: str, expected: list[int]) -> None:
    assert locate_phrase(tokenizer, prompt, "dog") == expected


@pytest.mark.parametrize("prompt", ["a doghouse in the garden", "three dogs on grass"])
def test_phrase_inside_a_longer_word_is_not_found(tokenizer, prompt: str) -> None:
    with pytest.raises(PhraseNotFoundError, match="whole words"):
        locate_phrase(tokenizer, prompt, "dog")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a,dog on grass", [3]), ("(dog) on grass", [2]), ("a cat.dog", [4]), ("a red,dog", [4])],
)
def test_phrase_right_after_punctuation(tokenizer, prompt: str, expected: list[int]) -> None:
    assert locate_phrase(tokenizer, prompt, "dog") == expected


def test_phrase_ending_at_the_last_token_the_encoder_reads(tokenizer) -> None:
    # BOS, 74 one-token words, "dog" = token 75: the last prompt token of the 77 (BOS + 75 + EOS).
    prompt = " ".join(["a"] * 74 + ["dog"])
    assert locate_phrase(tokenizer, prompt, "dog") == [75]
    assert target_token_indicator(tokenizer, prompt, "dog")[75] == 1.0


@pytest.mark.parametrize(
    ("words", "phrase"),
    [(["a"] * 75 + ["dog"], "dog"), (["a"] * 74 + ["red", "dog"], "red dog")],
    ids=["token 76", "straddles 75/76"],
)
def test_phrase_past_the_last_token_is_a_clear_error(tokenizer, words: list[str], phrase: str) -> None:
    with pytest.raises(PromptTooLongError, match="beyond the 75 tokens"):
        locate_phrase(tokenizer, " ".join(words), phrase)
