"""The Llama-3-shaped speed configs: they parse, have the published shapes (parameter counts), and their
tokenizer directory, written from the embedded GGUF, is the same tokenizer."""

import jax
import pytest

from jaxpage import gin_config
from jaxpage.tokenizer import Tokenizer
from models.default_model import default_model_path
from models.llama import init_params


@pytest.mark.parametrize("name, billions", [("llama3_8b", 8.03), ("llama3_1b", 1.24), ("llama3_70b", 70.55)])
def test_config_has_the_published_shapes(name, billions):
    setup = gin_config.parse([f"configs/{name}.gin"], [])
    model = setup.random_model
    assert model.vocab_size == 128256 and setup.engine.dtype == "bfloat16"
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert num_params / 1e9 == pytest.approx(billions, abs=0.01)
    setup.engine.check_page_buckets(setup.engine.max_model_len)


def test_the_tokenizer_directory_is_the_same_tokenizer(tmp_path):
    gguf = Tokenizer.from_gguf(default_model_path())
    gguf.save_hf_dir(tmp_path)
    written = Tokenizer.from_hf_dir(tmp_path)
    assert written.vocab_size == gguf.vocab_size and written.eos_token_ids == gguf.eos_token_ids
    for text in ["Hello world 123  45", "é数据 <|im_start|>user\n"]:
        assert written.encode(text) == gguf.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert written.encode_chat(chat) == gguf.encode_chat(chat)
