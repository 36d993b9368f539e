"""Hugging Face Llama and SmolLM3 checkpoints <-> nopejax workdirs.

  python -m nopejax.convert from-hf --hf_dir DIR --workdir OUT [--nope] [--tokenizer PATH] [--compute_dtype bfloat16]
  python -m nopejax.convert to-hf --workdir W --hf_dir OUT [--layout auto|smollm3|llama] [--dtype bfloat16]
      [--fold_temperatures] [--max_shard_mb 4096]

from-hf makes a new workdir of a Hugging Face Llama or SmolLM3 directory: its config.json, and its
weights as a weights-only checkpoint that `nopejax.load`, evaluation, a search (`search.base=OUT`)
and continued pretraining read. Head-scale models' `scale_param` become the temperatures; a
SmolLM3's `no_rope_layers` become model.position and model.rope_layers (NoPE, RoPE or a hybrid).
to-hf writes the latest model of a workdir (pretrain or search). --layout=auto (the default) writes
NoPE and hybrid models as a SmolLM3 (per-layer `no_rope_layers`, temperatures folded into q_proj),
which transformers' AutoModelForCausalLM loads with no patch, and RoPE models as a Llama;
--layout=llama writes the paper's NoPE Llama, temperatures as scale_param or folded
(--fold_temperatures), which transformers runs only with its rotation patched out.
See docs/huggingface.md.

  layout             the tensor names and layouts of the two sides, and the two configs
  smollm3            the SmolLM3 config: per-layer RoPE flags, --layout
  safetensors_files  the safetensors files of a Hugging Face directory (one, or shards with an index)
  hf                 from_hf and to_hf_dir
and `__main__` the command line on top.
"""
from nopejax.convert.safetensors_files import SafetensorsFile, checkpoint_files, write_safetensors
from nopejax.convert.hf import DTYPES, SOURCE_FILE, conversion_mesh, from_hf, read_hf_state, to_hf_dir
from nopejax.convert.layout import config_from_hf, hf_config_of, hf_layout
