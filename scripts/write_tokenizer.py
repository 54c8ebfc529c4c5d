"""Writes the embedded SmolLM2 tokenizer as an HF tokenizer directory (tokenizer.json and two small configs).

Random-weight speed runs (configs/llama3_8b.gin, configs/llama3_1b.gin) read their tokenizer from such a
directory: 3.5 MB, where the GGUF it comes from is 98 MB. The SmolLM2 tokenizer is fine for speed; its 49,152
ids are a prefix of the model's 128,256, whose other rows the engine never samples.

  python scripts/write_tokenizer.py --output_dir .cache/tokenizers/smollm2
"""

from absl import app, flags

from jaxpage.tokenizer import Tokenizer
from models.default_model import default_model_path

flags.DEFINE_string("output_dir", ".cache/tokenizers/smollm2", "Directory to write the tokenizer into.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    Tokenizer.from_gguf(default_model_path()).save_hf_dir(FLAGS.output_dir)
    print(f"wrote {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
