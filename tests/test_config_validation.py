"""Bad engine configs and sampling parameters fail when built, with the field and the value in the message."""

import math

import pytest

from jaxpage.config import EngineConfig
from jaxpage.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -1),
        ("seed", -1),
        ("seed", 2**32),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
        ("logprobs", -1),
        ("logprobs", 1.5),
        ("prompt_logprobs", -2),
        ("prompt_logprobs", 0.5),
        ("min_p", math.nan),
        ("repetition_penalty", -1.0),
        ("presence_penalty", math.nan),
        ("frequency_penalty", 2.01),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("min_tokens", -1),
        ("min_tokens", 17),  # above max_tokens (16)
        ("n", 0),
        ("n", 1.0),
        ("best_of", 0),
        ("length_penalty", math.nan),
        ("early_stopping", 1),
        ("stop", 5),
        ("stop_token_ids", "7"),
    ],
)
def test_bad_sampling_param_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"^{field} ") as error:
        SamplingParams(**{field: value})
    # Lists are shown as the tuple they are stored as.
    shown = repr(tuple(value)) if isinstance(value, list) else repr(value)
    assert shown in str(error.value)


def test_best_of_below_n_is_refused():
    with pytest.raises(ValueError, match=r"^best_of must be None or an int in \[n \(3\), 1024\], got 2"):
        SamplingParams(n=3, best_of=2)
    assert SamplingParams(n=2, best_of=4).num_samples == 4 and SamplingParams(n=3).num_samples == 3


@pytest.mark.parametrize("field, value", [("temperature", 0.7), ("top_p", 0.9), ("top_k", 5), ("min_p", 0.1)])
def test_beam_search_refuses_sampling_parameters(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .* with use_beam_search, got {value}"):
        SamplingParams(use_beam_search=True, **{"temperature": 0, field: value})
    assert SamplingParams(use_beam_search=True, temperature=0, best_of=3).use_beam_search


def test_sampling_params_accept_convenient_spellings():
    params = SamplingParams(stop="\n", stop_token_ids=[7], logprobs=True)
    assert params.stop == ("\n",) and params.stop_token_ids == (7,) and params.logprobs == 0
    assert SamplingParams(stop=["a", "b"], logprobs=False).stop == ("a", "b")
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int8"}, "dtype"),
        ({"page_size": 0}, "page_size"),
        ({"num_pages": 1}, "num_pages"),
        ({"kv_cache_memory_fraction": 0.0}, "kv_cache_memory_fraction"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
        ({"kv_cache_gib": 0}, r"kv_cache_gib .*, got 0$"),
        ({"kv_cache_gib": -2.0}, r"kv_cache_gib .*, got -2.0$"),
        ({"kv_cache_gib": math.inf}, r"kv_cache_gib .*, got inf$"),
        ({"kv_cache_gib": True}, r"kv_cache_gib .*, got True$"),
        ({"kv_cache_gib": "4"}, r"kv_cache_gib .*, got '4'$"),
        ({"compilation_cache_dir": ""}, "compilation_cache_dir"),
        ({"checkpoint_cache_dir": 3}, "checkpoint_cache_dir"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"token_buckets": (64, 16)}, "token_buckets"),
        ({"token_buckets": ()}, "token_buckets"),
        ({"max_num_batched_tokens": 1024}, "largest token bucket"),
        ({"max_num_seqs": 128}, "largest seq bucket"),
        ({"max_model_len": 100_000}, "largest page bucket"),
        ({"max_bucket_tokens_per_row": 0}, r"max_bucket_tokens_per_row .*, got 0$"),
        ({"max_bucket_tokens_per_row": 2.5}, r"max_bucket_tokens_per_row .*, got 2.5$"),
        ({"decode_steps": 0}, r"decode_steps must be an int in \[1, 64\], got 0$"),
        ({"decode_steps": 65}, r"decode_steps .*, got 65$"),
        ({"decode_steps": True}, r"decode_steps .*, got True$"),
        ({"attention_backend": "cuda"}, "attention_backend"),
        ({"seed": -3}, "seed"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
        ({"preemption_mode": "drop"}, "preemption_mode"),
        ({"swap_space_gib": -1}, "swap_space_gib"),
        ({"max_logprobs": -1}, "max_logprobs"),
        ({"warmup_prompt_logprobs": 1}, "warmup_prompt_logprobs"),
    ],
)
def test_bad_engine_config_names_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_page_buckets_must_cover_the_longest_request():
    config = EngineConfig(page_size=16, page_buckets=(8, 64))
    assert config.pages_per_seq(1025) == 64
    config.check_page_buckets(1025)
    with pytest.raises(ValueError, match="page bucket"):
        config.check_page_buckets(1026)
