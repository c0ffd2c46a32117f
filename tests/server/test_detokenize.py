"""Streamed text is the tokens' text: incremental detokenization (slm_server.engine.TextTracker)
against decoding the whole output, for the two tokenizer designs real models use.

- byte-level BPE (GPT-2, Llama 3, Qwen2): the tiny model's own tokenizer; a character's bytes may
  span tokens.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3): built here, laid out as
  Llama 2's `tokenizer.json` is (`▁` for spaces, `<0xNN>` byte tokens, a decoder that strips the
  leading space of a decode); it is the design where decoding a window of the output differs
  from the same characters inside the whole output.

Each property feeds tokens one at a time, as the generation loop does, and checks what a client
sees: the deltas, joined, are the text of the whole output, cut at the stop string that ends
first when one is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_server.generation.detokenize import TextTracker

WORDS = ["the", "list", " of", "items", "é", "ü", "naïve", "漢字", "🙂", "👍🏽", "\n", "  ", ".", ",", "\t", "Return"]
texts = st.lists(st.sampled_from(WORDS) | st.text(max_size=3), max_size=30).map("".join)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sentencepiece_style(tiny_model_dir: Path):
    """A Llama 2-layout tokenizer: the tiny tokenizer's training corpus is not needed, its
    vocabulary's words become `▁` pieces; merges are learned on them with the tokenizers trainer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [
        t.replace("Ġ", " ").strip()
        for t in json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        if t.isascii()
    ]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainer_tok.train_from_iterator([" ".join(words)] * 3, trainer=trainer)
    spec = json.loads(trainer_tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["normalizer"] = json.loads(
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]).__getstate__()
    )
    spec["decoder"] = json.loads(
        decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        ).__getstate__()
    )
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tiny_model_dir):
    return _sentencepiece_style(tiny_model_dir)


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request, tiny_model_dir, sentencepiece_tokenizer):
    if request.param == "byte-level":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return sentencepiece_tokenizer


def _stream(tokenizer, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The deltas a client gets, token by token as the generation loop calls the tracker."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True)

    tracker = TextTracker(decode, stops)
    deltas, stopped, seen = [], False, []
    for token in ids:
        seen.append(token)
        delta, stopped = tracker.update(seen)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(tracker.finish(seen))
    return deltas, stopped


def _cut_at_first_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the stop string that is complete first (OpenAI's `stop`)."""
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    return text[: min(ends)[1]] if ends else text


def test_the_sentencepiece_style_tokenizer_behaves_like_llama_2s(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    ids = tokenizer.encode("Return the 漢字 list", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == "Return the 漢字 list"
    assert pieces[0].startswith("▁") and "<0xE6>" in pieces  # 漢 by byte fallback: its bytes span tokens
    # Decoding from a token that starts a word drops the word's space: why the tracker decodes windows.
    assert tokenizer.decode(ids[1:]) == "the 漢字 list"


@PROPERTY
@given(text=texts)
def test_the_streamed_text_is_the_whole_output_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stopped = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    assert not stopped


@PROPERTY
@given(ids=st.lists(st.integers(0, 1199), max_size=40))
def test_any_token_sequence_streams_as_its_text(tokenizer, ids):
    """What a degraded model emits: any tokens, special ones and lone bytes of a character included."""
    deltas, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@PROPERTY
@given(text=texts, stops=st.lists(st.sampled_from(["list", "\n", "漢", " of it", "🙂", "e"]), max_size=3))
def test_the_text_ends_before_the_first_stop_string_and_never_shows_it(tokenizer, text, stops):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stopped = _stream(tokenizer, ids, tuple(stops))
    whole = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    expected = _cut_at_first_stop(whole, tuple(stops))
    assert "".join(deltas) == expected
    assert stopped == (expected != whole)
