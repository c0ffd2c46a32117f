"""The server serves other model families the way it serves the tiny GPT-2: any Hugging Face causal
LM directory, loaded, prompted and decoded the same way.

Real users serve Llama-, Qwen2- and Phi-3-family models (Llama 3.2, SmolLM, Qwen2.5, Phi-3-mini),
which differ from GPT-2 in the places a hand-written decoding loop can go wrong: rotary positions and
grouped-query attention in the KV cache, a sliding attention window whose cache keeps only the
window (Phi-3), a tokenizer that adds a BOS token, a chat template that writes the BOS itself (so
encoding its text must not add a second), several end-of-sequence ids in `generation_config.json`
(and sampling advice there), untied output embeddings, and the context length in
`max_position_embeddings`. Real checkpoints cannot be downloaded here, so each family is a small
model of its real architecture class with random weights (seeded) and the tiny model's trained
byte-level BPE vocabulary plus the family's special tokens, saved with `save_pretrained` as an
ordinary model directory.

The reference for every generated token is transformers' own `generate()` on the same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from slm_server.generation.transformers_engine import TransformersEngine
from slm_server.generation.types import GenerationResult, SamplingParams
from slm_server.settings import Settings

from .conftest import generate_staggered, generate_together, serve, sse_events

CONTEXT = 384
PROMPT = "Return a new list of the items in the order given"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does it return?"}]

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "classes": ("LlamaConfig", "LlamaForCausalLM"),
        # Llama 3: the tokenizer adds <|begin_of_text|>; the chat template writes it too.
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
        "tied": False,
        # As Llama 3.2 Instruct's generation_config.json advises.
        "sampling": {"temperature": 0.6, "top_p": 0.9},
    },
    "qwen2": {
        "classes": ("Qwen2Config", "Qwen2ForCausalLM"),
        # Qwen2.5: no BOS anywhere; ChatML; attention biases.
        "bos": None,
        "eos": "<|im_end|>",
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        # Qwen2.5's small checkpoints tie them, but with random weights a tied model's greedy answer
        # is its last token repeated forever (each position's state is mostly its own token's
        # embedding); the tiny GPT-2 covers tied embeddings.
        "tied": False,
        # As Qwen2.5 Instruct's generation_config.json advises.
        "sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
    },
    "phi3": {
        "classes": ("Phi3Config", "Phi3ForCausalLM"),
        # Phi-3 (DESIGN.md's example model): sliding-window attention, whose KV cache keeps only the
        # window; a window of 16 here, so that generations run past it. Fused QKV projections.
        "bos": "<s>",
        "eos": "<|end|>",
        "specials": ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
        "tied": False,
        "sampling": {},  # Phi-3-mini's generation_config.json advises none
        "config": {"sliding_window": 16},
    },
}


def _tokenizer(tiny_model_dir: Path, family: dict[str, Any]):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tok.add_special_tokens(family["specials"])
    bos = family["bos"]
    if bos is not None:  # as Llama 3's tokenizer.json does it
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=family["eos"], pad_token=family["eos"]
    )
    fast.chat_template = family["chat_template"]
    return fast


def _model(tokenizer, family: dict[str, Any]):
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in family["classes"])
    eos_id = tokenizer.convert_tokens_to_ids(family["eos"])
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as both families use
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=family["tied"],
        **family.get("config", {}),
    )
    torch.manual_seed(5)
    return model_class(config).eval()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, ending on the ids of the model's generation config: the reference."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A model directory of the family: its `generation_config.json` lists two end-of-sequence ids,
    the family's own and a token its greedy answer to PROMPT reaches after a few tokens (so the test
    sees the second id end a generation)."""
    name = request.param
    family = FAMILIES[name]
    tokenizer = _tokenizer(tiny_model_dir, family)
    model = _model(tokenizer, family)
    ids = tokenizer.encode(PROMPT)
    model.generation_config.eos_token_id = None
    free_run = _greedy(model, ids, 24)
    stop_at = next(i for i in range(3, len(free_run)) if free_run[i] not in free_run[:i])
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(family["eos"]), free_run[stop_at]]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if family["sampling"]:
        model.generation_config.do_sample = True
        for key, value in family["sampling"].items():
            setattr(model.generation_config, key, value)
    target = tmp_path_factory.mktemp(name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "expected.json").write_text(json.dumps({"family": name, "stop_at": stop_at, "free_run": free_run}))
    return target


@pytest.fixture(scope="module")
def family_engine(family_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(Settings(model=str(family_dir), served_model_name="family"))
    engine.load()
    return engine


@pytest.fixture
def family_server(family_engine: TransformersEngine, family_dir: Path):
    with serve(family_engine, Settings(model=str(family_dir), served_model_name="family")) as srv:
        yield srv


def _expected(family_dir: Path) -> dict[str, Any]:
    return json.loads((family_dir / "expected.json").read_text())


def test_loads_with_the_family_context_and_chat_template(family_engine, family_dir):
    info = family_engine.info
    assert info.max_context == CONTEXT
    assert info.has_chat_template
    config = json.loads((family_dir / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[_expected(family_dir)["family"]]["classes"][1]]
    assert info.parameters == sum(p.numel() for p in family_engine.model.parameters())


def test_greedy_tokens_are_transformers_own_and_any_listed_eos_ends_the_generation(family_server, family_engine):
    expected = _expected(Path(family_engine.settings.model))
    ids = family_engine.encode(PROMPT)
    reference = _greedy(family_engine.model, ids, 24)

    r = family_server.client.post(
        "/generate", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["token_ids"] == reference
    # The generation ended on the second end-of-sequence id of generation_config.json, not the first.
    assert body["token_ids"] == expected["free_run"][: expected["stop_at"] + 1]
    assert body["finish_reason"] == "stop"


def _teacher_forced_perplexity(model, prompt_ids: list[int], output_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + output_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


def _teacher_forced_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + output_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return logprobs.gather(1, torch.tensor(output_ids).unsqueeze(1)).squeeze(1).tolist()


def test_generations_in_one_batch_get_transformers_own_tokens(family_engine):
    """Rotary positions in a left-padded batch: each generation's positions are its own. A random-
    weight model's greedy tokens barely depend on positions (its attention is nearly uniform); each
    token's log-probability does, by ~1e-3 with the positions of the padded cache instead (tried),
    against ~5e-7 of rounding."""
    assert family_engine.info.batching == "continuous"
    prompts = [PROMPT, "Be", "What does it return to the caller when the list of items is empty and", "Hi there"]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=0)
    together = generate_together(family_engine, [(prompt, params) for prompt in prompts])
    for prompt, result in zip(prompts, together, strict=True):
        assert isinstance(result, GenerationResult), result
        prompt_ids = family_engine.encode(prompt)
        assert result.token_ids == _greedy(family_engine.model, prompt_ids, 24), prompt
        expected = _teacher_forced_logprobs(family_engine.model, prompt_ids, result.token_ids)
        assert result.token_logprobs == pytest.approx(expected, abs=1e-5), prompt


def test_generations_joining_and_leaving_a_batch_at_other_steps_get_transformers_own_tokens(family_engine):
    """Joins pad the running cache, leaves trim it; with Phi-3 past its 16-token window too."""
    prompts = [
        ("Hi there", 40, 0),
        ("What does it return to the caller when the list of items is empty and", 12, 3),
        ("Be", 30, 6),
        (PROMPT, 8, 9),
        ("Return the file", 20, 15),
    ]
    jobs = [(prompt, SamplingParams(max_tokens=n, temperature=0, logprobs=0), start) for prompt, n, start in prompts]
    for (prompt, params, _), result in zip(jobs, generate_staggered(family_engine, jobs), strict=True):
        assert isinstance(result, GenerationResult), result
        prompt_ids = family_engine.encode(prompt)
        assert result.token_ids == _greedy(family_engine.model, prompt_ids, params.max_tokens), prompt
        expected = _teacher_forced_logprobs(family_engine.model, prompt_ids, result.token_ids)
        assert result.token_logprobs == pytest.approx(expected, abs=1e-5), prompt


def test_prompts_fed_in_chunks_get_transformers_own_tokens(family_dir):
    """Chunked prefill: prompts of up to ~60 tokens fed 5 tokens per pass (Phi-3: a chunk sees the
    16-token window's cached part and its own tokens), alone, together and joining a running batch."""
    engine = TransformersEngine(Settings(model=str(family_dir), served_model_name="family", prefill_chunk_tokens=5))
    engine.load()
    model = engine.model  # the reference's, after the engine is closed
    long_prompt = " ".join([PROMPT, "when the list of items is empty and the caller asks for it"] * 3)
    prompts = [
        (long_prompt, 30, 0),
        ("What does it return to the caller when the list of items is empty and", 12, 0),
        (long_prompt[:90], 10, 4),
        ("Be", 8, 9),
    ]
    jobs = [(prompt, SamplingParams(max_tokens=n, temperature=0, logprobs=0), start) for prompt, n, start in prompts]
    try:
        results = generate_staggered(engine, jobs)
    finally:
        engine.close()
    for (prompt, params, _), result in zip(jobs, results, strict=True):
        assert isinstance(result, GenerationResult), result
        prompt_ids = engine.encode(prompt)
        assert result.token_ids == _greedy(model, prompt_ids, params.max_tokens), prompt
        expected = _teacher_forced_logprobs(model, prompt_ids, result.token_ids)
        assert result.token_logprobs == pytest.approx(expected, abs=1e-5), prompt


def test_prefix_caching_is_on_where_every_layer_keeps_its_past_and_a_hit_gets_transformers_own_tokens(
    family_engine, family_dir
):
    """Llama and Qwen2 keep every past position; Phi-3's sliding window keeps only the last ones, which
    no shorter prefix can be cut from, so it runs without prefix caching."""
    sliding = "sliding_window" in FAMILIES[_expected(family_dir)["family"]].get("config", {})
    assert family_engine.info.prefix_caching == ("unsupported" if sliding else "on")
    if sliding:
        return
    stats = family_engine.prefix_cache_stats()
    assert stats is not None
    hits_before = stats[1]
    shared = " ".join([PROMPT] * 3)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0)
    for ending in (" first", " and then the second"):
        prompt_ids = family_engine.encode(shared + ending)
        result = family_engine.generate(prompt_ids, params)
        assert result.token_ids == _greedy(family_engine.model, prompt_ids, 12)
        expected = _teacher_forced_logprobs(family_engine.model, prompt_ids, result.token_ids)
        assert result.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert family_engine.prefix_cache_stats()[1] > hits_before  # type: ignore[index]  # the second hit


def test_perplexity_equals_exp_loss_of_a_teacher_forced_pass(family_server, family_engine):
    r = family_server.client.post(
        "/generate", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 7, "return_token_ids": True}
    )
    body = r.json()
    expected = _teacher_forced_perplexity(family_engine.model, family_engine.encode(PROMPT), body["token_ids"])
    assert body["perplexity"] == pytest.approx(expected, rel=1e-3)


def test_prompt_tokens_have_exactly_the_family_bos(family_server, family_engine):
    tokenizer = family_engine.tokenizer
    bos = tokenizer.bos_token_id
    completion = family_server.client.post(
        "/v1/completions", json={"model": "family", "prompt": PROMPT, "max_tokens": 1}
    )
    chat = family_server.client.post(
        "/v1/chat/completions", json={"model": "family", "messages": MESSAGES, "max_tokens": 1}
    )
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)

    assert completion.json()["usage"]["prompt_tokens"] == len(tokenizer(PROMPT)["input_ids"])
    assert chat.json()["usage"]["prompt_tokens"] == len(templated)
    if bos is not None:
        assert templated.count(bos) == 1 and templated[0] == bos
    else:
        assert len(tokenizer(PROMPT)["input_ids"]) == len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])


def test_a_streamed_chat_says_what_the_whole_answer_says(family_server):
    body = {"model": "family", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = family_server.client.post("/v1/chat/completions", json=body).json()
    events, _ = sse_events(family_server.client, "/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_context_comes_from_max_position_embeddings(family_server):
    r = family_server.client.post("/generate", json={"prompt": PROMPT, "max_tokens": CONTEXT})
    assert r.status_code == 400, r.text
    assert f"context is {CONTEXT} tokens" in r.text


def test_sampling_a_request_leaves_out_is_the_model_generation_config(family_server, family_engine, json_records):
    """As vLLM does: an instruct model's advised temperature, top_p and top_k, unless the request says."""
    sampling = FAMILIES[_expected(Path(family_engine.settings.model))["family"]]["sampling"]
    advised = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **sampling}
    body = {"prompt": PROMPT, "max_tokens": 12, "seed": 3, "return_token_ids": True}

    implicit = family_server.client.post("/generate", json=body).json()
    explicit = family_server.client.post("/generate", json={**body, **advised})
    chat = family_server.client.post("/v1/chat/completions", json={"model": "family", "messages": MESSAGES})

    assert implicit["token_ids"] == explicit.json()["token_ids"]
    assert chat.status_code == 200
    logged = [
        {key: line.get(f"gen_ai.request.{key}", 0) for key in ("temperature", "top_p", "top_k")}
        for line in json_records("request")
    ]
    assert logged == [advised] * 3


def test_a_generation_config_value_the_api_refuses_is_not_a_default():
    from transformers import GenerationConfig

    from slm_server.generation.transformers_engine import _sampling_defaults

    config = GenerationConfig(do_sample=True, temperature=5.0, top_p=0.5, top_k=-3)
    assert _sampling_defaults(config) == {"default_top_p": 0.5}
    assert _sampling_defaults(GenerationConfig(do_sample=True, top_k=20)) == {"default_top_k": 20}
    assert _sampling_defaults(GenerationConfig()) == {}
