"""Import a GGUF file (llama.cpp's format) as a standard Hugging Face model folder.

`import_gguf(gguf_path, out_dir)` writes `config.json`, `model.safetensors` (dequantized, HF tensor
names), `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, so the folder loads
with `mlx_lm.load`, `mlx_rft.models.load_model` and transformers' `AutoConfig`/`AutoTokenizer`.

One module per piece recovered from the file: `header` (metadata and tensor table), `tensors`
(dequantized data), `config` (the HF config.json), `tokenizer` (tokenizer.json and its config),
`weights` (HF names, llama.cpp's fix-ups undone, safetensors shards) and `importer` (all of it,
written into a temporary sibling folder and renamed into place, so a failed or interrupted import
leaves nothing behind).
"""

from .config import SUPPORTED_ARCHITECTURES, hf_config
from .header import GGUFHeader, TensorInfo, read_gguf_header
from .importer import import_gguf
from .tensors import iter_tensors
from .tokenizer import tokenizer_files

__all__ = [
    "GGUFHeader",
    "SUPPORTED_ARCHITECTURES",
    "TensorInfo",
    "hf_config",
    "import_gguf",
    "iter_tensors",
    "read_gguf_header",
    "tokenizer_files",
]
